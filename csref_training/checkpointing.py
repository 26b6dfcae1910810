"""Training checkpoints: atomic step directories, `last` / `best` links, exact resumption.

`<output_dir>/checkpoints/step_XXXXXXXX/` holds `model.safetensors` + `config.yaml` (the
inference format, EMA weights when EMA is on; `csref_model.checkpoint`) and `trainer_state.pt`
(raw weights, optimizer, scheduler, scaler, counters, RNG states: only tensors and plain
containers, loaded with weights_only=True). A checkpoint is written under a temporary name and
renamed into place; `last` and `best` are symlinks replaced atomically, so a kill at any moment
leaves the previous complete checkpoint behind.
"""

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from csref_model.checkpoint import LoadReport, SerialisableConfig, format_keys
from csref_model.checkpoint import save_checkpoint as save_model_dir
from csref_training.distributed import DistInfo, barrier
from csref_training.optim import EMA
from csref_training.reproducibility import rng_state, set_rng_state
from csref_training.train_config import TrainConfig

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
MODEL_WEIGHTS = "model.safetensors"


def _state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


def _replace_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def write_checkpoint_dir(
    output_dir: Path,
    *,
    step: int,
    weights_model: nn.Module,
    model_cfg: SerialisableConfig,
    trainer_state: dict[str, Any],
    is_best: bool,
    keep: bool,
) -> Path:
    """Write checkpoints/step_<step>/ atomically, point `last` (and `best`) at it, prune old ones."""
    ckpt_root = output_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model_dir(tmp, weights_model, model_cfg)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    if keep:
        (tmp / "KEEP").touch()
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _replace_symlink(output_dir / "last", f"checkpoints/{name}")
    if is_best:
        _replace_symlink(output_dir / "best", f"checkpoints/{name}")
    in_use = {(output_dir / link).resolve() for link in ("last", "best") if (output_dir / link).is_symlink()}
    for old in ckpt_root.glob("step_*"):
        if old.resolve() not in in_use and not (old / "KEEP").exists():
            shutil.rmtree(old)
    return final


def find_resume_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint `last` points at, if the output directory holds one."""
    last = output_dir / "last"
    if last.is_symlink() and (last.resolve() / TRAINER_STATE).is_file():
        return last.resolve()
    return None


def load_trainer_state(checkpoint_dir: Path) -> dict[str, Any]:
    return torch.load(checkpoint_dir / TRAINER_STATE, map_location="cpu", weights_only=True)


def load_weights_file(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dir / MODEL_WEIGHTS))


@dataclass
class Progress:
    """Where training stands; saved in trainer_state.pt."""

    epoch: int = 0  # epochs completed
    epoch_step: int = 0  # optimiser steps done in the current epoch
    global_step: int = 0
    best_metric: float | None = None
    best_step: int | None = None


def save_training_checkpoint(
    output_dir: Path,
    cfg: TrainConfig,
    model_cfg: SerialisableConfig,
    model: nn.Module,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    progress: Progress,
    dist_info: DistInfo,
    *,
    metrics: dict[str, float] | None,
    is_best: bool,
    keep: bool = False,
) -> None:
    """Rank 0 writes the checkpoint (EMA weights when EMA is on); every rank waits for it."""
    if dist_info.is_main:
        trainer_state = {
            "progress": dataclasses.asdict(progress),
            "raw_model": _state_dict_cpu(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "ema_updates": ema.updates if ema is not None else 0,
            "rng": rng_state(),
            "world_size": dist_info.world_size,
            "metrics": metrics or {},
            "train_config": cfg.to_dict(),
        }
        path = write_checkpoint_dir(
            output_dir,
            step=progress.global_step,
            weights_model=ema.model if ema is not None else model,
            model_cfg=model_cfg,
            trainer_state=trainer_state,
            is_best=is_best,
            keep=keep,
        )
        if metrics:
            write_json(path / "metrics.json", {"global_step": progress.global_step, "epoch": progress.epoch, **metrics})
        logger.info("saved %s%s", path, " (best)" if is_best else "")
    barrier()


def resume_training(
    checkpoint_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ema: EMA | None,
    world_size: int,
) -> Progress:
    """Restore everything `save_training_checkpoint` saved; the run continues exactly where it stopped."""
    state = load_trainer_state(checkpoint_dir)
    if state["world_size"] != world_size:
        raise ValueError(
            f"{checkpoint_dir} was written by a run with {state['world_size']} processes, this one has {world_size}; "
            "resuming mid-epoch needs the same number of processes (or start a new output_dir)"
        )
    model.load_state_dict(state["raw_model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.model.load_state_dict(load_weights_file(checkpoint_dir))
        ema.updates = state["ema_updates"]
    set_rng_state(state["rng"])
    return Progress(**state["progress"])


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def log_init_report(output_dir: Path, source: str, report: LoadReport) -> None:
    """Log and save (init_report.json) exactly what an `init_speech_encoder` checkpoint initialised
    and what it did not."""
    report_path = output_dir / "init_report.json"
    write_json(report_path, {"source": source, **dataclasses.asdict(report)})
    # The tensors that keep their fresh initialisation are listed in full; the others are in the JSON.
    logger.info("speech encoder initialised from %s: %d tensors loaded (%s); full lists in %s", source,
                len(report.loaded), format_keys(report.loaded), report_path)
    logger.info("NOT loaded (keep their fresh initialisation): %d tensors: %s", len(report.missing),
                ", ".join(report.missing) or "none")
    logger.info("in the file but not used: %d tensors (%s)", len(report.unexpected),
                format_keys(report.unexpected) if report.unexpected else "none")
