"""Training configuration: plain dataclasses read from a YAML file with dotted overrides.

    cfg = load_train_config("config/train/srec_spoken_shapes.yaml", ["epochs=5", "optim.lr=2e-4"])

Keys and types are checked by `csref_model.typed_yaml` (an unknown key names itself, its section
and the file). `TrainConfig` documents every key; `docs/TRAINING.md` explains the sections.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from csref_model.config import ModelConfig, load_model_config
from csref_model.typed_yaml import apply_overrides, from_dict, merge, read_yaml
from csref_training.augment import AugmentConfig

AMP_MODES = ("off", "bf16", "fp16")


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
    # Image file name from the annotation's iid: printf style ("COCO_train2014_%012d.jpg") or
    # {iid} style ("{iid}.png", "img_{iid:06d}.jpg"); null = the dataset's own (COCO's
    # "COCO_train2014_%012d.jpg" for the known names, "%012d.jpg" for any other).
    image_pattern: str | None = None
    # Skip broken entries (and count them) instead of failing on the first one.
    skip_broken: bool = False
    # false: entries may have no referent box (your own (image, command) pairs for weak
    # supervision, `python -m csref_training.refclip`); Acc@0.5 is then measured only where one is.
    boxes: bool = True
    num_workers: int = 2


@dataclass
class OptimConfig:
    """Adam + per-iteration linear warmup and cosine decay (docs/REFERENCE_FACTS.md §10)."""

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
    # The reference never reads its `enabled` flag (docs/REFERENCE_FACTS.md §14.6); we honour it.
    enabled: bool = True
    # Square input sides drawn uniformly every iteration; multiples of 32.
    sizes: list[int] = field(default_factory=lambda: list(range(224, 641, 32)))


@dataclass
class TrainConfig:
    # The task's model config: for CSA and SREC "base", "tiny" or a YAML path
    # (csref_model.config.load_model_config) ...
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
    # SREC, S+S+C and the detector: a checkpoint of the same kind (SREC: official .pth or our directory)
    # whose weights initialise the whole model, strictly, to fine-tune it (own scenes and voices, a
    # larger input). Ignored when resuming.
    init_checkpoint: str | None = None
    # CSA and SREC: checkpoint (official .pth or our directory, CSA or SREC) whose speech_encoder.*
    # weights initialise the speech encoder (SREC from CSA: docs/REFERENCE_FACTS.md §9.1; CSA from
    # either, to go on aligning a trained encoder), after `init_checkpoint`, so they replace its
    # speech encoder. Ignored when resuming.
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
    # Waveform augmentation of the training split (csref_training.augment); off by default.
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Settings only one task reads (a detector's box count, RefCLIP's candidate count, ...): the
    # task checks them against its own dataclass (csref_model.typed_yaml.from_dict), so unknown
    # keys are still errors, named by the task.
    task: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training YAML (None: every key at its default) and apply `section.key=value`
    overrides, their values parsed as YAML."""
    source = str(path) if path is not None else "<defaults>"
    tree = read_yaml(path, "training config") if path is not None else {}
    cfg = from_dict(TrainConfig, apply_overrides(tree, overrides), source)
    if cfg.amp not in AMP_MODES:
        raise ValueError(f"{source}: amp must be one of {', '.join(AMP_MODES)}, got {cfg.amp!r}")
    if cfg.multi_scale.enabled and any(s % 32 for s in cfg.multi_scale.sizes):
        raise ValueError(f"{source}: multi_scale.sizes must be multiples of 32, got {cfg.multi_scale.sizes}")
    if not cfg.optim.lr > 0:
        raise ValueError(f"{source}: optim.lr must be > 0 (the schedule is a multiple of it), got {cfg.optim.lr}; "
                         "freeze modules with `freeze:` instead")
    return cfg


def build_model_config(cfg: TrainConfig) -> ModelConfig:
    """The model config named by `cfg.model` with `cfg.model_overrides` merged in."""
    model_cfg = load_model_config(cfg.model)
    if not cfg.model_overrides:
        return model_cfg
    return ModelConfig.from_dict(merge(model_cfg.to_dict(), cfg.model_overrides), source=f"{cfg.model} + model_overrides")
