"""Ground one spoken referring expression in one image from the command line.

    python -m csref_model ground --config base --checkpoint csref_refcoco_speech.pth \
        --image scene.jpg --audio utterance.wav --json [--top-k 5] [--save-vis out.png]

Prints {"box_xyxy": [x1, y1, x2, y2], "score": s, "image_size": [w, h], "candidates": [{"box_xyxy":
..., "score": ...}, ...]} with --json (candidates: the top-k cells, best first; the first is the box).
Bad input (missing files, unreadable image/audio, a mismatched checkpoint) exits with code 2 and
a one-line message on stderr.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

from csref_model.audio import load_audio
from csref_model.cli import USER_ERROR
from csref_model.grounder import Grounder
from csref_model.visualize import DrawnBox, draw_boxes, save_picture


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m csref_model ground", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="official .pth file or our checkpoint directory")
    parser.add_argument("--config", default=None,
                        help="model config: base, tiny or a YAML path (default: the one stored in our checkpoint directory)")
    parser.add_argument("--image", required=True, help="image file (anything OpenCV reads)")
    parser.add_argument("--audio", required=True, help="audio file (WAV/FLAC/OGG, any sample rate, mono or averaged to mono)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--top-k", type=int, default=1,
                        help="also report this many candidates (the head's best cells, near-duplicates left out), best first")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--save-vis", default=None, help="write the image with the box drawn on it to this file")
    return parser.parse_args(argv)


def read_image_rgb(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"could not read image {path} (not an image format OpenCV can decode)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        image = read_image_rgb(Path(args.image))
        audio, sample_rate = load_audio(args.audio)
        grounder = Grounder.from_checkpoint(args.checkpoint, config=args.config, device=args.device)
        if args.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
        result = grounder.ground(image, audio, sample_rate, top_k=args.top_k)
        if args.save_vis:
            box = DrawnBox(xyxy=tuple(float(v) for v in result.box_xyxy), label=f"{result.score:.2f}")
            save_picture(draw_boxes(image, [box]), args.save_vis)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        x1, y1, x2, y2 = (float(v) for v in result.box_xyxy)
        print(f"box x1={x1:.1f} y1={y1:.1f} x2={x2:.1f} y2={y2:.1f}  score={result.score:.3f}  "
              f"image {result.image_size[0]}x{result.image_size[1]}")
    return 0
