"""Train CSA (contrastive semantic alignment): pull a speech encoder onto a frozen text space.

    python -m csref_training.csa --config config/train/csa_librispeech.yaml [key=value ...]
    torchrun --nproc_per_node 4 -m csref_training.csa --config ... [key=value ...]

Speech (wav2vec2 + AttFlat) and text (frozen BERT) vectors of a batch of (utterance,
transcript) pairs are L2-normalised and scored with a learnable temperature; the loss is the
symmetric cross-entropy of matching each utterance to its transcript and back (CLIP). Each
process uses its own batch as negatives, as the reference (docs/REFERENCE_FACTS.md §9). The recipe is
the reference's: Adam 1e-4 (0.9, 0.98), warmup + cosine per iteration, clipping 0.15, no EMA
and no AMP by default. The best checkpoint (`<output_dir>/best`) has the lowest validation
loss; its `speech_encoder.*` weights initialise SREC (`init_speech_encoder` of an SREC config).
The loop itself is `csref_training.trainer`.
"""

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from csref_model.checkpoint import load_csa_speech_encoder
from csref_model.config import ModelConfig
from csref_model.csa import build_csa
from csref_model.text_encoder import load_tokenizer
from csref_training import trainer
from csref_training.checkpointing import log_init_report
from csref_training.datasets import build_csa_dataset, collate_csa
from csref_training.distributed import DistInfo
from csref_training.evaluate import evaluate_csa
from csref_training.train_config import TrainConfig, build_model_config


class CSATask:
    """(16 kHz waveform, transcript) pairs from LibriSpeech or a RefCOCO-layout set's refs."""

    name = "csa"
    best_metric = "loss"
    higher_is_better = False
    model_config = staticmethod(build_model_config)
    collate = staticmethod(collate_csa)

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, dist_info: DistInfo) -> None:
        self.cfg, self.model_cfg, self.dist_info = cfg, model_cfg, dist_info
        self.tokenizer = load_tokenizer(model_cfg.text_encoder)

    def build_model(self) -> nn.Module:
        return build_csa(self.model_cfg)

    def build_dataset(self, split: str, train: bool) -> Dataset:
        return build_csa_dataset(self.cfg.data, split=split, train=train, augment=self.cfg.augment)

    def initialise(self, model: nn.Module) -> None:
        """The encoders start from the pretrained weights the model config names; `init_speech_encoder`
        then replaces the speech encoder with that of one of our CSA or SREC checkpoints (to go on
        aligning a trained encoder on other voices, engines or augmentation)."""
        if self.cfg.init_speech_encoder:
            report = load_csa_speech_encoder(model, self.cfg.init_speech_encoder)
            if self.dist_info.is_main:
                log_init_report(Path(self.cfg.output_dir), self.cfg.init_speech_encoder, report)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> torch.Tensor:
        device = self.dist_info.device
        input_values = batch["input_values"].to(device, non_blocking=True)  # (B, L)
        attention_mask = batch["attention_mask"].to(device, non_blocking=True)  # (B, L)
        tokens = self.tokenizer(batch["text"], padding=True, truncation=True, return_tensors="pt")
        text_ids = tokens["input_ids"].to(device)  # (B, N)
        text_mask = tokens["attention_mask"].to(device)  # (B, N)
        return model(input_values, attention_mask, text_ids, text_mask)

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Validation loss and speech<->text retrieval recall."""
        return evaluate_csa(model, dataset, self.tokenizer, self.cfg.eval_batch_size, self.dist_info.device,
                            self.dist_info.rank, self.dist_info.world_size, num_workers=self.cfg.data.num_workers)


def main(argv: list[str] | None = None) -> dict[str, float | int | None]:
    return trainer.main(CSATask, __doc__.split("\n")[0], argv)


if __name__ == "__main__":
    main()
