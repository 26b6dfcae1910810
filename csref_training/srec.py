"""Train SREC (speech referring expression comprehension): image + spoken expression -> box.

    python -m csref_training.srec --config config/train/srec_refcoco_speech.yaml [key=value ...]
    torchrun --nproc_per_node 4 -m csref_training.srec --config ... [key=value ...]

The recipe is the reference's (docs/REFERENCE_FACTS.md §10): Adam 1e-4 (0.9, 0.98), per-iteration
warmup + cosine schedule, gradient clipping 0.15, EMA 0.9997 of parameters and buffers,
multi-scale training on the letterboxed batch, the speech encoder initialised from a CSA
checkpoint (to fine-tune, the whole model from an SREC checkpoint first). The run resumes
automatically from `<output_dir>/last`; `<output_dir>/best` is the checkpoint with the highest
validation Acc@0.5. Checkpoints hold the EMA weights (the inference format); `trainer_state.pt`
next to them holds what exact resumption needs. The loop itself is `csref_training.trainer`.
"""

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from csref_model.checkpoint import load_csa_speech_encoder, load_srec_weights
from csref_model.config import ModelConfig
from csref_model.srec import build_srec
from csref_training import trainer
from csref_training.checkpointing import log_init_report
from csref_training.datasets import build_srec_dataset, collate_srec
from csref_training.distributed import DistInfo
from csref_training.evaluate import evaluate_srec
from csref_training.reproducibility import derive_seed
from csref_training.train_config import TrainConfig, build_model_config

logger = logging.getLogger(__name__)

# Mixed into the multi-scale draw's seed so it differs from the step's other random draws.
MULTI_SCALE_STREAM = 7


class SRECTask:
    """RefCOCO-speech layout (or its HF variant): letterboxed images, raw 16 kHz audio, one box."""

    name = "srec"
    best_metric = "acc_50"
    higher_is_better = True
    model_config = staticmethod(build_model_config)
    collate = staticmethod(collate_srec)

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, dist_info: DistInfo) -> None:
        self.cfg, self.model_cfg, self.dist_info = cfg, model_cfg, dist_info

    def build_model(self) -> nn.Module:
        return build_srec(self.model_cfg)

    def build_dataset(self, split: str, train: bool) -> Dataset:
        return build_srec_dataset(self.cfg.data, split=split, image_size=self.model_cfg.image_size, train=train,
                                  augment=self.cfg.augment)

    def initialise(self, model: nn.Module) -> None:
        """The whole model from an SREC checkpoint, then the speech encoder from a CSA one."""
        if self.cfg.init_checkpoint:
            report = load_srec_weights(model, self.cfg.init_checkpoint)
            logger.info("whole model initialised from %s: %d tensors", self.cfg.init_checkpoint, len(report.loaded))
        if self.cfg.init_speech_encoder:
            report = load_csa_speech_encoder(model, self.cfg.init_speech_encoder)
            if self.dist_info.is_main:
                log_init_report(Path(self.cfg.output_dir), self.cfg.init_speech_encoder, report)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> torch.Tensor:
        device = self.dist_info.device
        image = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S) letterboxed, [0, 1]
        input_values = batch["input_values"].to(device, non_blocking=True)  # (B, L)
        attention_mask = batch["attention_mask"].to(device, non_blocking=True)  # (B, L)
        targets = batch["label"].to(device, non_blocking=True)  # (B, 4) normalised cx, cy, w, h
        if self.cfg.multi_scale.enabled:
            sizes = self.cfg.multi_scale.sizes
            side = sizes[derive_seed(self.cfg.seed, step, MULTI_SCALE_STREAM) % len(sizes)]
            # Nearest, as the reference; labels are normalised so they need no change.
            image = F.interpolate(image, size=(side, side))  # (B, 3, side, side)
        return model(image, input_values, attention_mask, targets=targets)

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Acc@0.5, Acc@0.75 and mean IoU."""
        return evaluate_srec(model, dataset, self.cfg.eval_batch_size, self.dist_info.device, self.dist_info.rank,
                             self.dist_info.world_size, num_workers=self.cfg.data.num_workers)


def main(argv: list[str] | None = None) -> dict[str, float | int | None]:
    return trainer.main(SRECTask, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
