"""Linear probe of a frozen candidate detector's backbone maps: which object attributes (colour, shape,
size) can a linear classifier read at each object's centre, at stride 8, 16 and 32? Given a RefCLIP
checkpoint, its detector's maps and also RefCLIP's candidate features (the trained fusion's stride-32
output, what the command is matched against).

RefCLIP learns only a fusion over these frozen maps, so an attribute that no map carries cannot be
grounded; an attribute the stride-8 map carries but the stride-32 map does not must travel through
the fusion's bottom-up path to reach the stride-32 candidates. Needs a Spoken Shapes set with
object lists (train split to fit, val split to score):

    python scripts/detector_feature_probe.py --checkpoint runs/detector_416/best --data-root data/spoken_shapes_detector
    python scripts/detector_feature_probe.py --checkpoint runs/refclip/best --data-root data/spoken_shapes_detector
"""

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader

from csref_model.checkpoint import read_checkpoint_dir
from csref_model.detector import DETECTOR_KIND, build_detector_from_checkpoint
from csref_model.refclip import build_refclip_from_checkpoint
from csref_training.datasets import build_detector_dataset, collate_detector, refcoco_layout
from csref_training.train_config import load_train_config

ATTRIBUTES = ("colour", "shape", "size")
STRIDES = (8, 16, 32)
FUSED = "RefCLIP candidates (32)"


def load_maps(checkpoint: Path) -> tuple[Callable[[torch.Tensor], dict[int | str, torch.Tensor]], int]:
    """(images -> {stride or FUSED: (B, C, H, W) map}, input size) for a detector or RefCLIP checkpoint."""
    if read_checkpoint_dir(checkpoint)[1].get("kind") == DETECTOR_KIND:
        detector, detector_cfg = build_detector_from_checkpoint(checkpoint)
        return (lambda image: dict(zip(STRIDES, detector.encode_image(image)))), detector_cfg.image_size
    refclip, refclip_cfg = build_refclip_from_checkpoint(checkpoint)

    def maps(image: torch.Tensor) -> dict[int | str, torch.Tensor]:
        backbone = refclip.detector.encode_image(image)
        return {**dict(zip(STRIDES, backbone)), FUSED: refclip.multi_scale_manner(backbone)}
    return maps, refclip_cfg.detector.image_size


def centre_features(encode: Callable[[torch.Tensor], dict[int | str, torch.Tensor]], image_size: int, data_root: Path,
                    split: str, images: int) -> tuple[dict[int | str, np.ndarray], dict[str, list[str]]]:
    """Feature vectors at every object's centre cell per map of `encode`, and the objects' attributes."""
    cfg = load_train_config("config/train/detector_spoken_shapes.yaml", [f"data.root={data_root}"])
    dataset = build_detector_dataset(cfg.data, split, image_size)
    layout = refcoco_layout(cfg.data.dataset, cfg.data.root, cfg.data.ann_path, cfg.data.image_dir,
                            cfg.data.audio_root, cfg.data.image_pattern)
    entries = json.loads(layout.ann_path.read_text())[split]
    features: dict[int | str, list[np.ndarray]] = {}
    attributes: dict[str, list[str]] = {name: [] for name in ATTRIBUTES}
    seen = 0
    for batch in DataLoader(dataset, batch_size=16, collate_fn=collate_detector):
        with torch.no_grad():
            maps = encode(batch["image"])  # {stride: (B, C, S/stride, S/stride)}
        for i, boxes in enumerate(batch["boxes"]):  # (M, 4) cx, cy, w, h input px, in the entry's object order
            for obj, (cx, cy, _, _) in zip(entries[seen]["objects"], boxes.tolist()):
                for name, fmap in maps.items():
                    stride = image_size // fmap.shape[2]
                    row = min(int(cy // stride), fmap.shape[2] - 1)
                    col = min(int(cx // stride), fmap.shape[3] - 1)
                    features.setdefault(name, []).append(fmap[i, :, row, col].numpy())
                for name in ATTRIBUTES:
                    attributes[name].append(obj[name])
            seen += 1
        if seen >= images:
            break
    return {name: np.stack(rows) for name, rows in features.items()}, attributes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a detector or RefCLIP checkpoint directory")
    parser.add_argument("--data-root", required=True, type=Path, help="Spoken Shapes root with train and val splits")
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--val-images", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    encode, image_size = load_maps(args.checkpoint)
    train_x, train_y = centre_features(encode, image_size, args.data_root, "train", args.train_images)
    val_x, val_y = centre_features(encode, image_size, args.data_root, "val", args.val_images)
    print(f"{len(val_y['colour'])} val objects; accuracy of a linear probe (majority class in brackets)")
    print(f"{'map (stride)':>24}  " + "  ".join(f"{name:>14}" for name in ATTRIBUTES))
    for key in train_x:
        mean, std = train_x[key].mean(0), train_x[key].std(0) + 1e-6
        cells = []
        for name in ATTRIBUTES:
            probe = LogisticRegression(max_iter=2000).fit((train_x[key] - mean) / std, train_y[name])
            accuracy = probe.score((val_x[key] - mean) / std, val_y[name])
            majority = max(np.mean(np.array(val_y[name]) == value) for value in set(val_y[name]))
            cells.append(f"{accuracy:.3f} ({majority:.3f})")
        label = key if isinstance(key, str) else f"backbone ({key})"
        print(f"{label:>24}  " + "  ".join(f"{cell:>14}" for cell in cells))


if __name__ == "__main__":
    main()
