"""Optimisation: the reference's schedule, Adam, freezing, AMP, the update step and the EMA.

The recipe is the reference's (docs/REFERENCE_FACTS.md §10): Adam, a linear
warmup then a cosine decay stepped once per iteration, gradient clipping, and an exponential
moving average of parameters and buffers whose weights are the ones evaluated and saved.
"""

import copy
import math

import torch
from torch import nn

from csref_training.train_config import TrainConfig


class EMA:
    """Exponential moving average of a model's parameters and buffers (docs/REFERENCE_FACTS.md §10).

    After every optimiser step: shadow = d * shadow + (1 - d) * current with
    d = min(alpha, (n + 1) / (n + 10)), n = number of updates so far. Integer buffers
    (BatchNorm's num_batches_tracked) are copied, not averaged: the reference truncates the
    average of an int, which only makes the counter lag.
    """

    def __init__(self, model: nn.Module, alpha: float, buffers: bool) -> None:
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
                   ema: EMA | None, clip_grad_norm: float) -> None:
    """One iteration's update: backward, clipping, optimiser and schedule step, EMA."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm > 0:
        # Unscale first so the norm is of the true gradients (docs/REFERENCE_FACTS.md §14.5).
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    if ema is not None:
        ema.update(model)
