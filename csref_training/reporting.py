"""What a run tells its user: log files, the run's config files, and the training-loss window
sent to the log, the progress bar and tensorboard."""

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from csref_model.checkpoint import SerialisableConfig
from csref_training.distributed import mean_over_ranks
from csref_training.train_config import TrainConfig

logger = logging.getLogger(__name__)


def setup_logging(output_dir: Path, rank: int, name: str) -> None:
    """Rank 0 logs INFO to stderr and <output_dir>/<name>.log; other ranks only warnings."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(output_dir / f"{name}.log"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def save_run_config(output_dir: Path, cfg: TrainConfig, model_cfg: SerialisableConfig) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "train_config.yaml").open("w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    with (output_dir / "model_config.yaml").open("w") as f:
        yaml.safe_dump(model_cfg.to_dict(), f, sort_keys=False)


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in metrics.items())


class LossWindow:
    """Mean loss and throughput since the last report, sent to the log, the progress bar and
    tensorboard (`writer` is None off the main rank)."""

    def __init__(self, writer: Any, device: torch.device) -> None:
        self.writer, self.device = writer, device
        self._reset()

    def _reset(self) -> None:
        self.start, self.samples, self.loss_sum, self.count = time.perf_counter(), 0, 0.0, 0

    def add(self, loss: float, samples: int) -> None:
        self.loss_sum += loss
        self.count += 1
        self.samples += samples

    def report(self, epoch: int, global_step: int, lr: float, bar: Any) -> None:
        mean_loss = mean_over_ranks(self.loss_sum / self.count, self.device)
        samples_per_s = self.samples / (time.perf_counter() - self.start)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", mean_loss, global_step)
            self.writer.add_scalar("train/lr", lr, global_step)
            self.writer.add_scalar("train/samples_per_s", samples_per_s, global_step)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.1f}")
        logger.info("epoch %d step %d loss %.4f lr %.3e %.1f samples/s", epoch, global_step, mean_loss, lr,
                    samples_per_s)
        self._reset()
