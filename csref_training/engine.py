"""What the CSA and SREC trainers share: config, distributed setup, schedule, EMA, checkpoints.

The training loops themselves live in `csa.py` and `srec.py` and read top to bottom; this
module holds only the pieces both need, each small and independent:

- `TrainConfig` (plain dataclasses) loaded from YAML, with dotted `key=value` overrides;
- `setup_distributed()`: torchrun / single-process setup (gloo on CPU, NCCL on GPU);
- `warmup_cosine_lr()`: the reference's per-iteration warmup + cosine schedule;
- `EMA`: exponential moving average of parameters and buffers, as the reference;
- `ResumableSampler` + `SeededItems`: DistributedSampler order that can start mid-epoch, with
  every item's randomness derived from (seed, epoch, position) so a resumed run sees exactly
  the batches an uninterrupted one would;
- checkpoint save / auto-resume: `<output_dir>/checkpoints/step_XXXXXXXX/` directories holding
  `model.safetensors` + `config.yaml` (the inference format, EMA weights when EMA is on) and
  `trainer_state.pt` (raw weights, optimizer, scheduler, scaler, counters, RNG states; only
  tensors and plain containers, loaded with weights_only=True). `last` and `best` are symlinks
  replaced atomically, so a kill at any moment leaves a complete checkpoint behind.
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

from csref_model.checkpoint import LoadReport, format_keys, save_checkpoint as save_model_dir
from csref_model.config import ModelConfig, load_model_config

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
MODEL_WEIGHTS = "model.safetensors"


# ----------------------------------------------------------------------------------------
# Config


@dataclass
class DataConfig:
    """Where the data is and how it is read (see csref_training.datasets)."""

    # "refcoco": official RefCOCO-speech layout (anns JSON + images + audios/<set>/<speaker>/).
    # "hf": the Hugging Face variant saved locally. "librispeech": LibriSpeech (CSA only).
    format: str = "refcoco"
    # Dataset name: anns/<dataset>.json, audios/<dataset>/ unless the paths below are given.
    dataset: str = "refcoco_speech"
    root: str = "data"
    ann_path: str | None = None
    image_dir: str | None = None
    audio_root: str | None = None
    # Speaker directories to read; null = every one present.
    speakers: list[str] | None = None
    train_split: str = "train"
    val_split: str = "val"
    use_trim: bool = True
    # Seconds; null = no limit (reference default).
    max_duration: float | None = None
    # Skip broken entries (and count them) instead of failing on the first one.
    skip_broken: bool = False
    num_workers: int = 2


@dataclass
class OptimConfig:
    """Adam + per-iteration linear warmup and cosine decay (REFERENCE_FACTS §10)."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-9
    weight_decay: float = 0.0
    warmup_epochs: float = 3.0
    warmup_lr: float = 1e-7
    min_lr: float = 1e-6
    # clip_grad_norm_ over all parameters after backward; 0 disables.
    clip_grad_norm: float = 0.15


@dataclass
class EMAConfig:
    enabled: bool = True
    alpha: float = 0.9997
    # Average buffers (BatchNorm statistics) too, as the reference does.
    buffers: bool = True


@dataclass
class MultiScaleConfig:
    # The reference never reads its `enabled` flag (REFERENCE_FACTS §14.6); we honour it.
    enabled: bool = True
    # Square input sides drawn uniformly every iteration; multiples of 32.
    sizes: list[int] = field(default_factory=lambda: list(range(224, 641, 32)))


@dataclass
class TrainConfig:
    # Model config: "base", "tiny" or a YAML path (csref_model.config.load_model_config) ...
    model: str = "base"
    # ... and nested overrides merged into it (same keys as the model YAML).
    model_overrides: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "runs/default"
    seed: int = 123456
    epochs: int = 40
    # Total over all processes; each of the W processes gets batch_size / W.
    batch_size: int = 8
    eval_batch_size: int = 8
    # "off" (reference), "bf16" or "fp16" (fp16 uses a GradScaler; grads unscaled before clipping).
    amp: str = "off"
    # Extra parameter-name prefixes to freeze on top of what the model config freezes.
    freeze: list[str] = field(default_factory=list)
    # The reference keeps frozen modules in train mode, so frozen BatchNorms keep updating
    # their running statistics. false puts modules whose parameters are all frozen in eval mode.
    frozen_modules_train_mode: bool = True
    # SREC only: SREC checkpoint (official .pth or our directory) whose weights initialise the
    # whole model, strictly, to fine-tune it (own scenes and voices). Ignored when resuming.
    init_checkpoint: str | None = None
    # SREC only: CSA checkpoint (official .pth or our directory) whose speech_encoder.* weights
    # initialise the SREC speech encoder (REFERENCE_FACTS §9.1), after `init_checkpoint`, so
    # they replace its speech encoder. Ignored when resuming.
    init_speech_encoder: str | None = None
    # Iterations between mid-epoch checkpoints (0 = only at the end of each epoch).
    save_every: int = 0
    # Keep every end-of-epoch checkpoint instead of only `last` and `best`.
    keep_epoch_checkpoints: bool = False
    # Validate every this many epochs (the last epoch always validates).
    eval_every: int = 1
    log_every: int = 10
    # Stop after this many optimiser steps in total (tests, benchmarks); null = run all epochs.
    max_steps: int | None = None
    # DDP: the reference's SREC leaves multi-scale mid/bot projections unused.
    find_unused_parameters: bool = True
    # cudnn.deterministic / torch.use_deterministic_algorithms(warn_only) for exact reruns.
    deterministic: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    multi_scale: MultiScaleConfig = field(default_factory=MultiScaleConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a dataclass field annotation; convert int->float and '1e-4'->float."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0])
    if annotation is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} at {where}")


def _from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in known:
            raise ValueError(f"unknown config key '{name}'; valid keys here: {', '.join(sorted(known))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, name)
        else:
            kwargs[key] = _coerce(value, hint, name)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def load_train_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a training YAML and apply `section.key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist; see config/train/ for examples")
    with path.open() as f:
        tree = yaml.safe_load(f) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level")
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r} is not of the form section.key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    try:
        cfg = _from_dict(TrainConfig, tree, "")
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if cfg.amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"{path}: amp must be off, bf16 or fp16, got {cfg.amp!r}")
    if cfg.multi_scale.enabled and any(s % 32 for s in cfg.multi_scale.sizes):
        raise ValueError(f"{path}: multi_scale.sizes must be multiples of 32, got {cfg.multi_scale.sizes}")
    return cfg


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_model_config(cfg: TrainConfig) -> ModelConfig:
    """The model config named by `cfg.model` with `cfg.model_overrides` merged in."""
    model_cfg = load_model_config(cfg.model)
    if not cfg.model_overrides:
        return model_cfg
    return ModelConfig.from_dict(_merge(model_cfg.to_dict(), cfg.model_overrides))


# ----------------------------------------------------------------------------------------
# Distributed setup and seeding


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Join the torchrun process group if launched by torchrun; else a single process."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def per_rank_batch_size(total: int, world_size: int) -> int:
    if total % world_size:
        raise ValueError(f"batch_size {total} is not divisible by the {world_size} processes; "
                         f"use a multiple of {world_size}")
    return total // world_size


def mean_over_ranks(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(",".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and plain containers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


# ----------------------------------------------------------------------------------------
# Data order: DistributedSampler that can start mid-epoch, per-item seeds


class ResumableSampler(Sampler):
    """DistributedSampler's order for one epoch, starting at `start`, yielding (index, item_seed).

    item_seed depends only on (seed, epoch, rank, position in the epoch), so random choices
    a dataset makes per item (speaker, sentence) do not depend on which worker loads the
    item or on whether the run was resumed.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        self.inner = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.inner)
        for position in range(self.start, len(indices)):
            yield indices[position], derive_seed(self.seed, self.epoch, self.rank, position)

    def __len__(self) -> int:
        return len(self.inner) - self.start


class SeededItems(Dataset):
    """Wraps a dataset so that item (index, seed) is loaded with random/numpy/torch seeded."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        seed_all(seed)
        return self.dataset[index]


def eval_indices(num_items: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of an evaluation set, without the padding DistributedSampler adds."""
    return list(range(rank, num_items, world_size))


# ----------------------------------------------------------------------------------------
# Schedule, optimiser, freezing


def warmup_cosine_lr(step: int, iters_per_epoch: int, cfg: TrainConfig) -> float:
    """Learning rate at iteration `step` (0-based): linear warmup, then cosine to min_lr."""
    o = cfg.optim
    warmup = o.warmup_epochs * iters_per_epoch
    total = cfg.epochs * iters_per_epoch
    if step < warmup:
        return o.warmup_lr + step * (o.lr - o.warmup_lr) / warmup
    if total <= warmup:
        return o.min_lr
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def build_optimizer_and_scheduler(
    model: nn.Module, cfg: TrainConfig, iters_per_epoch: int
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam over the parameters that require grad, LambdaLR stepped once per iteration."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("every parameter of the model is frozen: nothing to train")
    optimizer = torch.optim.Adam(
        params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_lr(step, iters_per_epoch, cfg) / cfg.optim.lr
    )
    return optimizer, scheduler


def freeze_by_prefix(model: nn.Module, prefixes: list[str]) -> None:
    """requires_grad=False for parameters whose name starts with one of `prefixes`."""
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in names):
            raise ValueError(f"freeze: no parameter name starts with '{prefix}'")
    for name, param in model.named_parameters():
        if any(name.startswith(prefix) for prefix in prefixes):
            param.requires_grad_(False)


def set_train_mode(model: nn.Module, frozen_modules_train_mode: bool) -> None:
    """model.train(); optionally put modules without a trainable parameter into eval mode."""
    model.train()
    if frozen_modules_train_mode:
        return
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def autocast_context(amp: str, device: torch.device) -> torch.autocast:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=amp != "off")


def optimizer_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                   ema: "EMA | None", clip_grad_norm: float) -> None:
    """One iteration's update: backward, clipping, optimiser and schedule step, EMA."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm > 0:
        # Unscale first so the norm is of the true gradients (REFERENCE_FACTS §14.5).
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    if ema is not None:
        ema.update(model)


class LossWindow:
    """Mean loss and throughput since the last report, sent to the log, the progress bar and
    tensorboard (`writer` is None off the main rank)."""

    def __init__(self, logger: logging.Logger, writer: Any, device: torch.device) -> None:
        self.logger, self.writer, self.device = logger, writer, device
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
        self.logger.info("epoch %d step %d loss %.4f lr %.3e %.1f samples/s", epoch, global_step, mean_loss, lr,
                         samples_per_s)
        self._reset()


# ----------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of a model's parameters and buffers (REFERENCE_FACTS §10).

    After every optimiser step: shadow = d * shadow + (1 - d) * current with
    d = min(alpha, (n + 1) / (n + 10)), n = number of updates so far. Integer buffers
    (BatchNorm's num_batches_tracked) are copied, not averaged: the reference truncates the
    average of an int, which only makes the counter lag.
    """

    def __init__(self, model: nn.Module, alpha: float, buffers: bool) -> None:
        import copy

        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.alpha = alpha
        self.buffers = buffers
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.alpha, (self.updates + 1) / (self.updates + 10))
        for shadow, current in zip(self.model.parameters(), model.parameters()):
            shadow.mul_(decay).add_(current.detach(), alpha=1 - decay)
        for shadow, current in zip(self.model.buffers(), model.buffers()):
            if self.buffers and shadow.is_floating_point():
                shadow.mul_(decay).add_(current, alpha=1 - decay)
            else:
                shadow.copy_(current)
        self.updates += 1


# ----------------------------------------------------------------------------------------
# Checkpoints


def _state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}


def _replace_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def save_checkpoint(
    output_dir: Path,
    *,
    step: int,
    weights_model: nn.Module,
    model_cfg: ModelConfig,
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


def checkpoint(
    output_dir: Path,
    cfg: TrainConfig,
    model_cfg: ModelConfig,
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
        path = save_checkpoint(
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


def resume(
    checkpoint_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ema: EMA | None,
    world_size: int,
) -> Progress:
    """Restore everything `checkpoint` saved; the run continues exactly where it stopped."""
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


def save_run_config(output_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / "train_config.yaml").open("w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    with (output_dir / "model_config.yaml").open("w") as f:
        yaml.safe_dump(model_cfg.to_dict(), f, sort_keys=False)


def log_init_report(output_dir: Path, source: str, report: LoadReport, is_main: bool) -> None:
    """Log and save exactly what a partial initialisation loaded and what it did not."""
    if not is_main:
        return
    report_path = output_dir / "init_report.json"
    write_json(report_path, {"source": source, **dataclasses.asdict(report)})
    # The tensors that keep their fresh initialisation are listed in full; the others are in the JSON.
    logger.info("speech encoder initialised from %s: %d tensors loaded (%s); full lists in %s", source,
                len(report.loaded), format_keys(report.loaded), report_path)
    logger.info("NOT loaded (keep their fresh initialisation): %d tensors: %s", len(report.missing),
                ", ".join(report.missing) or "none")
    logger.info("in the file but not used: %d tensors (%s)", len(report.unexpected),
                format_keys(report.unexpected) if report.unexpected else "none")


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
