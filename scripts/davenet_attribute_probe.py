"""What does a trained ResDAVEnet-VQ model match Spoken Shapes scenes by? Two readings of its pooled
embeddings (the vectors of the pooled dot product):

1. Linear probes: ridge regressions from the pooled image embedding and from the pooled caption
   embedding to each scene's attribute counts (objects of each colour, of each shape, big and
   small ones, all objects), fitted on the first N pairs of one split and scored (R^2) on another.
   An attribute neither side carries cannot be what retrieval tells scenes apart by.
2. Mistakes: for each caption whose best image is not its own, how far the retrieved scene's
   attribute multisets are from the true scene's (objects in one and not the other), and its
   sizes read left to right (the captions' order), against random pairs of scenes of the split.

    python scripts/davenet_attribute_probe.py --checkpoint runs/davenet_ss_23/best \\
        --data-root data/spoken_shapes_captions
"""

import argparse
import functools
import json
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from csref_model.davenet import Davenet, build_davenet_from_checkpoint
from csref_training.davenet import CaptionPairs, encode_pairs, first_pairs, read_caption_split
from csref_training.spoken_shapes.grammar import COLOURS, SHAPES, SceneObject
from csref_training.train_config import load_train_config

SIZES = ("big", "small")
# Which attribute of an object each multiset compares.
OBJECT_KEYS: dict[str, Callable[[SceneObject], object]] = {
    "colour": lambda o: o.colour,
    "shape": lambda o: o.shape,
    "size": lambda o: o.size,
    "object": lambda o: (o.colour, o.shape, o.size),
    "count": lambda o: "object",
}


def attribute_counts(scenes: list[tuple[SceneObject, ...]]) -> dict[str, np.ndarray]:
    """{"colour:red": (N,) objects of that colour per scene, ..., "count": (N,) objects per scene}."""
    counts = {f"colour:{c}": [sum(o.colour == c for o in s) for s in scenes] for c in COLOURS}
    counts |= {f"shape:{c}": [sum(o.shape == c for o in s) for s in scenes] for c in SHAPES}
    counts |= {f"size:{c}": [sum(o.size == c for o in s) for s in scenes] for c in SIZES}
    counts["count"] = [len(s) for s in scenes]
    return {name: np.asarray(values, dtype=np.float64) for name, values in counts.items()}


def pooled_embeddings(model: Davenet, dataset: CaptionPairs, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D) pooled image embeddings, (N, D) pooled caption embeddings, (N_img, N_caption) scores."""
    image_maps, speech_outputs, _ = encode_pairs(model, dataset, batch_size, torch.device("cpu"))
    images = torch.cat([model.pool_images(maps) for maps in image_maps])
    captions = torch.cat([model.pool_speech(speech) for speech in speech_outputs])
    scores = torch.cat([torch.cat([model.similarity(maps, speech) for speech in speech_outputs], dim=1)
                        for maps in image_maps])
    return images.numpy(), captions.numpy(), scores.numpy()


def multiset_distance(a: tuple[SceneObject, ...], b: tuple[SceneObject, ...], key: Callable[[SceneObject], object]) -> int:
    """Objects (by `key`) in one scene and not the other, both ways."""
    count_a, count_b = Counter(map(key, a)), Counter(map(key, b))
    return sum(((count_a - count_b) + (count_b - count_a)).values())


def size_sequence_distance(a: tuple[SceneObject, ...], b: tuple[SceneObject, ...]) -> int:
    """Positions at which the sizes read left to right (the captions' order) differ, plus the
    difference in length."""
    sizes_a, sizes_b = ([o.size for o in sorted(scene, key=lambda o: o.cx)] for scene in (a, b))
    return sum(x != y for x, y in zip(sizes_a, sizes_b)) + abs(len(sizes_a) - len(sizes_b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a ResDAVEnet-VQ checkpoint directory")
    parser.add_argument("--data-root", required=True, help="Spoken Shapes generated with --captions")
    parser.add_argument("--config", default="config/train/davenet_spoken_shapes.yaml")
    parser.add_argument("--fit-split", default="train")
    parser.add_argument("--score-split", default="test")
    parser.add_argument("--pairs", type=int, default=1000, help="the first N pairs of each split")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    cfg = load_train_config(args.config, [f"data.root={args.data_root}"])
    model, model_cfg = build_davenet_from_checkpoint(args.checkpoint)
    splits = {name: first_pairs(read_caption_split(cfg.data, name), args.pairs) for name in (args.fit_split, args.score_split)}
    encoded = {name: pooled_embeddings(model, CaptionPairs(split, model_cfg), args.batch_size) for name, split in splits.items()}
    targets = {name: attribute_counts([pair.objects for pair in split.pairs]) for name, split in splits.items()}

    probes: dict[str, dict[str, float]] = {}
    for side, column in (("image", 0), ("caption", 1)):
        probes[side] = {}
        for attribute, fit_target in targets[args.fit_split].items():
            probe = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
            probe.fit(encoded[args.fit_split][column], fit_target)
            probes[side][attribute] = float(probe.score(encoded[args.score_split][column],
                                                        targets[args.score_split][attribute]))
    groups = {group: {side: float(np.mean([r2 for name, r2 in probes[side].items() if name.startswith(group)]))
                      for side in probes} for group in ("colour", "shape", "size", "count")}

    scenes = [pair.objects for pair in splits[args.score_split].pairs]
    best_image = encoded[args.score_split][2].argmax(axis=0)  # per caption
    mistakes = [(index, int(best)) for index, best in enumerate(best_image) if best != index]
    rng = np.random.default_rng(0)
    random_pairs = [(i, j) for i, j in zip(range(len(scenes)), rng.integers(len(scenes), size=len(scenes))) if i != j]
    measures = {name: functools.partial(multiset_distance, key=key) for name, key in OBJECT_KEYS.items()}
    measures["size_sequence"] = size_sequence_distance
    distances = {}
    for name, measure in measures.items():
        distances[name] = {}
        for kind, pairs in (("top1_mistakes", mistakes), ("random_pairs", random_pairs)):
            values = np.array([measure(scenes[i], scenes[j]) for i, j in pairs])
            distances[name][kind] = {"mean_distance": float(values.mean()), "identical": float((values == 0).mean())}
    print(json.dumps({"checkpoint": str(args.checkpoint), "fit": f"{args.fit_split}[:{args.pairs}]",
                      "scored": f"{args.score_split}[:{args.pairs}]", "probe_r2_by_group": groups, "probe_r2": probes,
                      "top1_mistakes": len(mistakes), "mistake_vs_random_distance": distances}, indent=2))


if __name__ == "__main__":
    main()
