"""Rank images by a spoken description with a ResDAVEnet-VQ checkpoint ("which view shows it?").

    python -m csref_model retrieve --checkpoint runs/davenet/best --audio cmd.wav --images DIR [--top 5] [--json]

Scores every image file of DIR (sorted by name) against the utterance and prints them best first:
one "score  path" line each, or with --json {"ranking": [{"image", "score"}, ...]}. Bad input
(missing files, a directory without images, a checkpoint of another model) exits with code 2 and
a one-line message on stderr.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from csref_model.audio import load_audio
from csref_model.cli import USER_ERROR
from csref_model.cli.ground import read_image_rgb
from csref_model.davenet import SpeechImageRetriever

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m csref_model retrieve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a ResDAVEnet-VQ checkpoint directory (csref_training.davenet)")
    parser.add_argument("--audio", required=True, help="audio file (WAV/FLAC/OGG, any sample rate)")
    parser.add_argument("--images", required=True, help=f"directory of images ({', '.join(IMAGE_SUFFIXES)})")
    parser.add_argument("--top", type=int, default=None, help="print only the best N (default: all)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print the ranking as one JSON object")
    return parser.parse_args(argv)


def image_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"image directory not found: {directory}")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{directory} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        files = image_files(Path(args.images))
        images = [read_image_rgb(path) for path in files]
        wave, sample_rate = load_audio(args.audio)
        retriever = SpeechImageRetriever.from_checkpoint(args.checkpoint, device=args.device)
        order, scores = retriever.rank(wave, sample_rate, images)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR
    ranking = [{"image": str(files[index]), "score": float(score)} for index, score in zip(order, scores)]
    ranking = ranking[:args.top] if args.top else ranking
    if args.json:
        print(json.dumps({"ranking": ranking}))
    else:
        for entry in ranking:
            print(f"{entry['score']:10.4f}  {entry['image']}")
    return 0
