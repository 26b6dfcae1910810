"""The training loop every trainer runs; a `Task` supplies what differs between them.

    python -m csref_training.srec --config config/train/srec_spoken_shapes.yaml [key=value ...]
    torchrun --nproc_per_node 4 -m csref_training.srec --config ... [key=value ...]

`train(cfg, SRECTask)` reads top to bottom: processes and logging, data, model, optimiser,
resume (or the task's initialisation), then epochs of (seeded step: task loss under autocast,
backward, clipping, optimiser + schedule + EMA step; logging; mid-epoch checkpoints) each ended
by the task's validation, a checkpoint and the best-metric bookkeeping. A task (`csa.py`,
`srec.py`) gives the model, its datasets and collate function, its loss on a batch, its
validation metrics, the metric that picks `best` and its direction, any initialisation of
a fresh run, and the config of its model (what checkpoints store beside the weights; settings
only one task reads live in the training YAML's free-form `task:` section, which the task parses
into its own dataclass). Everything else (DDP, exact resumption, EMA, warmup + cosine, AMP, clipping,
atomic checkpoints, tensorboard, tqdm, logs) is here, once.
"""

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from csref_model.checkpoint import SerialisableConfig
from csref_training.checkpointing import Progress, find_resume_checkpoint, resume_training, save_training_checkpoint
from csref_training.distributed import DistInfo, cleanup_distributed, per_rank_batch_size, setup_distributed
from csref_training.optim import (
    EMA,
    autocast_context,
    build_optimizer_and_scheduler,
    count_parameters,
    freeze_by_prefix,
    optimizer_step,
    set_train_mode,
)
from csref_training.reporting import LossWindow, format_metrics, save_run_config, setup_logging
from csref_training.reproducibility import (
    ResumableSampler,
    SeededItems,
    configure_determinism,
    derive_seed,
    seed_all,
)
from csref_training.train_config import TrainConfig, load_train_config

logger = logging.getLogger(__name__)


class Task(Protocol):
    """What one trainer supplies to `train`. Built once per run, after the process group."""

    name: ClassVar[str]  # "srec": <output_dir>/srec.log, python -m csref_training.srec
    # The key of evaluate()'s metrics that picks `best`, and its direction (a task may choose them
    # per run from its settings).
    best_metric: str
    higher_is_better: bool
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]  # items -> batch, in DataLoader workers
    # cfg -> the config of the model this task trains (from cfg.model + cfg.model_overrides); it is
    # what each checkpoint's config.yaml holds: csref_model's ModelConfig for CSA and SREC.
    model_config: Callable[[TrainConfig], SerialisableConfig]

    def __init__(self, cfg: TrainConfig, model_cfg: SerialisableConfig, dist_info: DistInfo) -> None: ...

    def build_model(self) -> nn.Module: ...

    def build_dataset(self, split: str, train: bool) -> Dataset: ...

    def initialise(self, model: nn.Module) -> None:
        """Weights from elsewhere for a fresh run (not called when resuming)."""

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> torch.Tensor:
        """The scalar training loss of `batch` (as `collate` made it, on the CPU) at optimiser step
        `step`, through `model` (DDP-wrapped with several processes); runs under autocast."""

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Validation metrics of `model` on `dataset`, summed over the processes."""


def train(cfg: TrainConfig, task_class: type[Task]) -> dict[str, float | int | None]:
    """Run (or resume) the training `cfg` describes; returns the best metric and the step count."""
    dist_info = setup_distributed()
    device = dist_info.device
    output_dir = Path(cfg.output_dir)
    setup_logging(output_dir, dist_info.rank, task_class.name)
    configure_determinism(cfg.deterministic)
    seed_all(cfg.seed)
    model_cfg = task_class.model_config(cfg)
    per_rank_batch = per_rank_batch_size(cfg.batch_size, dist_info.world_size)
    if dist_info.is_main:
        save_run_config(output_dir, cfg, model_cfg)
        logger.info("world size %d, %d samples per process per step", dist_info.world_size, per_rank_batch)
    task = task_class(cfg, model_cfg, dist_info)

    # ---- data: each process reads its share of a shuffled order that can start mid-epoch
    train_set = task.build_dataset(cfg.data.train_split, train=True)
    val_set = task.build_dataset(cfg.data.val_split, train=False)
    sampler = ResumableSampler(train_set, dist_info.world_size, dist_info.rank, shuffle=True, seed=cfg.seed)
    train_loader = DataLoader(
        SeededItems(train_set),
        batch_size=per_rank_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        collate_fn=task.collate,
        pin_memory=device.type == "cuda",
    )
    iters_per_epoch = len(sampler) // per_rank_batch
    if iters_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training samples are fewer than one batch of {cfg.batch_size}")
    logger.info("train: %d samples, %d iterations per epoch; val: %d samples", len(train_set), iters_per_epoch,
                len(val_set))

    # ---- model, optimiser, schedule, AMP
    model = task.build_model().to(device)
    freeze_by_prefix(model, cfg.freeze)
    total_params, trainable_params = count_parameters(model)
    logger.info("%s: %.2fM parameters, %.2fM trainable", task_class.name.upper(), total_params / 1e6,
                trainable_params / 1e6)
    optimizer, scheduler = build_optimizer_and_scheduler(model, cfg, iters_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    # ---- resume from the output directory, else let the task initialise; the EMA starts from either
    progress = Progress()
    resume_dir = find_resume_checkpoint(output_dir)
    if resume_dir is None:
        task.initialise(model)
    ema = EMA(model, cfg.ema.alpha, cfg.ema.buffers) if cfg.ema.enabled else None
    if resume_dir is not None:
        progress = resume_training(resume_dir, model, optimizer, scheduler, scaler, ema, dist_info.world_size)
        logger.info("resumed from %s at epoch %d, step %d", resume_dir, progress.epoch, progress.global_step)

    train_model = model
    if dist_info.world_size > 1:
        device_ids = [dist_info.local_rank] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids,
                                              find_unused_parameters=cfg.find_unused_parameters)
    writer = SummaryWriter(str(output_dir / "tensorboard")) if dist_info.is_main else None
    eval_model = ema.model if ema is not None else model

    def save(metrics: dict[str, float] | None, is_best: bool, keep: bool = False) -> None:
        save_training_checkpoint(output_dir, cfg, model_cfg, model, ema, optimizer, scheduler, scaler, progress,
                                 dist_info, metrics=metrics, is_best=is_best, keep=keep)

    # ---- training loop
    stop = False
    for epoch in range(progress.epoch, cfg.epochs):
        sampler.set_epoch(epoch, start=progress.epoch_step * per_rank_batch)
        set_train_mode(model, cfg.frozen_modules_train_mode)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", initial=progress.epoch_step,
                   total=iters_per_epoch, disable=not dist_info.is_main, dynamic_ncols=True)
        window = LossWindow(writer, device)
        epoch_start, epoch_start_step = time.perf_counter(), progress.epoch_step
        for batch in bar:
            # Dropout, SpecAugment masks and the task's own draws depend only on (seed, rank,
            # step): resumption is exact.
            seed_all(derive_seed(cfg.seed, dist_info.rank, progress.global_step))
            with autocast_context(cfg.amp, device):
                loss = task.loss(train_model, batch, progress.global_step)
            optimizer_step(loss, model, optimizer, scheduler, scaler, ema, cfg.optim.clip_grad_norm)
            progress.global_step += 1
            progress.epoch_step += 1
            window.add(loss.item(), per_rank_batch * dist_info.world_size)
            if progress.global_step % cfg.log_every == 0 or progress.epoch_step == iters_per_epoch:
                window.report(epoch + 1, progress.global_step, optimizer.param_groups[0]["lr"], bar)

            stop = cfg.max_steps is not None and progress.global_step >= cfg.max_steps
            mid_epoch = progress.epoch_step < iters_per_epoch
            if mid_epoch and (stop or (cfg.save_every and progress.global_step % cfg.save_every == 0)):
                save(metrics=None, is_best=False)
            if stop:
                break
        bar.close()
        epoch_samples = (progress.epoch_step - epoch_start_step) * cfg.batch_size
        epoch_seconds = time.perf_counter() - epoch_start
        logger.info("epoch %d: trained on %d samples in %.0f s (%.2f samples/s)", epoch + 1, epoch_samples,
                    epoch_seconds, epoch_samples / max(epoch_seconds, 1e-9))
        if stop and progress.epoch_step < iters_per_epoch:
            break

        # ---- end of epoch: validate (the EMA weights when EMA is on), checkpoint, track the best
        metrics, is_best = None, False
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or stop:
            metrics = task.evaluate(eval_model, val_set)
            logger.info("epoch %d val: %s", epoch + 1, format_metrics(metrics))
            if writer is not None:
                for key, value in metrics.items():
                    writer.add_scalar(f"val/{key}", value, progress.global_step)
            value = metrics[task.best_metric]
            if progress.best_metric is None or (value > progress.best_metric if task.higher_is_better
                                                else value < progress.best_metric):
                progress.best_metric, progress.best_step, is_best = value, progress.global_step, True
        progress.epoch = epoch + 1
        progress.epoch_step = 0
        save(metrics=metrics, is_best=is_best, keep=cfg.keep_epoch_checkpoints)
        if stop:
            break

    if writer is not None:
        writer.close()
    logger.info("done: best val %s %s at step %s; checkpoints in %s", task.best_metric, progress.best_metric,
                progress.best_step, output_dir)
    cleanup_distributed()
    return {f"best_{task.best_metric}": progress.best_metric, "global_step": progress.global_step}


def main(task_class: type[Task], description: str, argv: list[str] | None = None) -> dict[str, float | int | None]:
    """The command line of a trainer: `--config YAML` and dotted `key=value` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True,
                        help=f"training YAML, e.g. config/train/{task_class.name}_spoken_shapes.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. epochs=5 data.root=/data optim.lr=2e-4")
    args = parser.parse_intermixed_args(argv)
    return train(load_train_config(args.config, args.overrides), task_class)
