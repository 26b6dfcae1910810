"""Turn a folder of (camera frame, spoken command) pairs into a box-free RefCOCO-layout dataset, the
input of weakly supervised training on a robot's own scenes (python -m csref_training.refclip).

    python -m csref_training.import_pairs --pairs my_robot_pairs/ --out data/my_robot

A pair is `<name>.wav` (any rate, mono or stereo) with an image of the same name (`.jpg`,
`.jpeg` or `.png`), and optionally `<name>.txt` holding what was said (kept as the sentence
text; nothing needs it). Output, read with `data.dataset=<dataset name> data.boxes=false`:

    <out>/anns/<dataset>.json    {"train": [...], "val": [...], "test": []}, entries without "bbox"
    <out>/images/<iid:012d>.jpg   JPEG frames copied as they are, others re-encoded (quality 95)
    <out>/audios/<dataset>/<speaker>/<sent_id>.wav   16 kHz mono 16-bit PCM
    <out>/<dataset>_pairs.json   which source pair became which iid

Pairs are sorted by name; the last `--val-fraction` of them (at least 2) validate.
"""

import argparse
import json
import logging
import shutil
from pathlib import Path

import cv2
import soundfile as sf

from csref_model.audio import SAMPLE_RATE, load_audio_16k

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
JPEG_QUALITY = 95


def find_pairs(folder: Path) -> list[tuple[Path, Path, str]]:
    """(image, wav, text) of every `<name>.wav` with an image of the same name, sorted by name."""
    if not folder.is_dir():
        raise FileNotFoundError(f"pairs folder not found: {folder}")
    pairs, unpaired = [], []
    for wav in sorted(folder.glob("*.wav")):
        images = [wav.with_suffix(s) for s in IMAGE_SUFFIXES if wav.with_suffix(s).is_file()]
        if not images:
            unpaired.append(wav.name)
            continue
        text_file = wav.with_suffix(".txt")
        pairs.append((images[0], wav, text_file.read_text().strip() if text_file.is_file() else ""))
    if unpaired:
        logger.warning("%d recordings have no image of the same name and are left out: %s", len(unpaired),
                       ", ".join(unpaired[:8]))
    return pairs


def import_pairs(folder: Path, out: Path, dataset: str, speaker: str = "robot", val_fraction: float = 0.1) -> dict:
    pairs = find_pairs(folder)
    if len(pairs) < 4:
        raise ValueError(f"{folder} holds {len(pairs)} (image, .wav) pairs of the same name; at least 4 are needed "
                         "(2 to train, 2 to validate)")
    ann_path = out / "anns" / f"{dataset}.json"
    if ann_path.exists():
        raise FileExistsError(f"{ann_path} exists; choose another --out or --dataset-name")
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    audio_dir = out / "audios" / dataset / speaker
    audio_dir.mkdir(parents=True, exist_ok=True)
    num_val = max(2, round(len(pairs) * val_fraction))
    annotations: dict[str, list] = {"train": [], "val": [], "test": []}
    sources = []
    for iid, (image_path, wav_path, text) in enumerate(pairs):
        target = out / "images" / f"{iid:012d}.jpg"
        if image_path.suffix.lower() in (".jpg", ".jpeg"):
            shutil.copyfile(image_path, target)
        else:
            image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError(f"cannot read image {image_path}: not a valid image file")
            cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        sf.write(audio_dir / f"{iid}.wav", load_audio_16k(wav_path), SAMPLE_RATE, subtype="PCM_16")
        split = "val" if iid >= len(pairs) - num_val else "train"
        annotations[split].append({"iid": iid, "sent_ids": [iid], "refs": [{"sent_id": iid, "sent": text}]})
        sources.append({"iid": iid, "image": str(image_path), "audio": str(wav_path)})
    (out / f"{dataset}_pairs.json").write_text(json.dumps(sources, indent=1))
    tmp = ann_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(annotations))
    tmp.replace(ann_path)
    return {"pairs": len(pairs), "train": len(annotations["train"]), "val": len(annotations["val"]),
            "ann_path": str(ann_path)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", required=True, type=Path, help="folder of <name>.wav + <name>.jpg/.png pairs")
    parser.add_argument("--out", required=True, type=Path, help="dataset root to write")
    parser.add_argument("--dataset-name", default="my_robot", help="anns/<name>.json, audios/<name>/ (data.dataset)")
    parser.add_argument("--speaker", default="robot", help="speaker directory of the recordings")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of pairs that validate (at least 2)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = import_pairs(args.pairs, args.out, args.dataset_name, args.speaker, args.val_fraction)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
