"""Train the class-agnostic candidate detector that weakly supervised grounding chooses from.

    python -m csref_training.detector --config config/train/detector_spoken_shapes.yaml [key=value ...]
    python -m csref_training.detector evaluate --config Y --checkpoint runs/detector/best [--image-size 416]

It plays the part of RefCLIP's frozen COCO YOLOv3: it is trained on every object's box of scenes
generated from a seed disjoint from the grounding data, and never sees an expression, a target
or an attribute (colour, size and place are not classes; there is one class, "object"). The
model is `csref_model.detector` (CSPDarknet, MultiScaleFusion neck, SREC's anchor-free head on
the stride-32 grid, multi-box SimOTA). `best` is the checkpoint with the highest candidate
recall: the fraction of objects covered (IoU > 0.5) by the top `task.candidates` cells, the 17
that RefCLIP keeps.
"""

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from csref_model.checkpoint import load_into, read_state_dict
from csref_model.config import check_image_size
from csref_model.detector import DetectorConfig, build_detector, build_detector_from_checkpoint, load_detector_config
from csref_model.typed_yaml import from_dict, merge
from csref_training import trainer
from csref_training.datasets import build_detector_dataset, collate_detector
from csref_training.distributed import DistInfo
from csref_training.evaluate import evaluate_detector
from csref_training.train_config import TrainConfig, load_train_config

logger = logging.getLogger(__name__)


@dataclass
class DetectorTaskConfig:
    """The training YAML's `task:` section for the detector."""

    # Cells kept per image when measuring candidate recall (RefCLIP's SELECT_NUM).
    candidates: int = 17


def detector_model_config(cfg: TrainConfig) -> DetectorConfig:
    """`cfg.model` ("detector_tiny", "detector_base" or a YAML path) with `cfg.model_overrides` merged in."""
    model_cfg = load_detector_config(cfg.model)
    if not cfg.model_overrides:
        return model_cfg
    return DetectorConfig.from_dict(merge(model_cfg.to_dict(), cfg.model_overrides),
                                    source=f"{cfg.model} + model_overrides")


class DetectorTask:
    name = "detector"
    best_metric = "recall_50"
    higher_is_better = True
    model_config = staticmethod(detector_model_config)
    collate = staticmethod(collate_detector)

    def __init__(self, cfg: TrainConfig, model_cfg: DetectorConfig, dist_info: DistInfo) -> None:
        self.cfg, self.model_cfg, self.dist_info = cfg, model_cfg, dist_info
        self.settings = from_dict(DetectorTaskConfig, cfg.task, "training config", section="task")

    def build_model(self) -> nn.Module:
        return build_detector(self.model_cfg)

    def build_dataset(self, split: str, train: bool) -> Dataset:
        return build_detector_dataset(self.cfg.data, split, self.model_cfg.image_size)

    def initialise(self, model: nn.Module) -> None:
        """The whole detector from `init_checkpoint` when set (to fine-tune a trained one, for example at
        a larger `image_size`: every weight is independent of the input size); otherwise nothing beyond
        the backbone weights `build_detector` already loaded. A checkpoint without the appearance head
        may start a run that adds it."""
        if self.cfg.init_checkpoint:
            load_into(model, read_state_dict(self.cfg.init_checkpoint), self.cfg.init_checkpoint,
                      allow_missing=("appearance_head.",))
            logger.info("detector initialised from %s", self.cfg.init_checkpoint)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> torch.Tensor:
        device = self.dist_info.device
        image = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
        boxes = [b.to(device, non_blocking=True) for b in batch["boxes"]]  # B x (M_b, 4) cx, cy, w, h px
        return model(image, boxes)

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        return evaluate_detector(model, dataset, self.settings.candidates, self.cfg.eval_batch_size,
                                 self.dist_info.device, self.dist_info.rank, self.dist_info.world_size,
                                 num_workers=self.cfg.data.num_workers)


def evaluate_main(argv: list[str]) -> dict[str, float]:
    """Candidate recall of a checkpoint on a split, at its own input size or another one (every
    weight is independent of the input size)."""
    parser = argparse.ArgumentParser(prog="python -m csref_training.detector evaluate")
    parser.add_argument("--config", required=True, help="the detector training YAML (its data and task sections)")
    parser.add_argument("--checkpoint", required=True, help="a detector checkpoint directory")
    parser.add_argument("--split", default="val")
    parser.add_argument("--image-size", type=int, help="input side in pixels (default: the checkpoint's)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the training YAML, e.g. data.root=D")
    args = parser.parse_intermixed_args(argv)
    cfg = load_train_config(args.config, args.overrides)
    settings = from_dict(DetectorTaskConfig, cfg.task, "training config", section="task")
    model, model_cfg = build_detector_from_checkpoint(args.checkpoint)
    image_size = args.image_size or model_cfg.image_size
    try:
        check_image_size(image_size, "--image-size", "python -m csref_training.detector evaluate")
    except ValueError as error:
        raise SystemExit(str(error)) from None
    dataset = build_detector_dataset(cfg.data, args.split, image_size)
    metrics = {"image_size": image_size, **evaluate_detector(model, dataset, settings.candidates, cfg.eval_batch_size,
                                                              torch.device("cpu"), num_workers=cfg.data.num_workers)}
    print(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float | int | None]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "evaluate":
        return evaluate_main(argv[1:])
    return trainer.main(DetectorTask, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
