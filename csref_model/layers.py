"""Building blocks shared by the backbone, the multi-scale fusion and the head."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

# Activations by name, as the modules below are configured (Hugging Face's ACT2FN idiom).
ACTIVATIONS = {"silu": nn.SiLU, "leaky_relu": partial(nn.LeakyReLU, 0.1)}


class ConvBnAct(nn.Module):
    """Conv2d (no bias, same padding unless `padding` is given) -> BatchNorm2d -> activation.

    The BatchNorm is registered under `norm_name`, the key official checkpoints use for it.
    """

    norm_name = "bn"

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 padding: int | None = None, activation: str = "silu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride,
                              kernel // 2 if padding is None else padding, bias=False)
        self.add_module(self.norm_name, nn.BatchNorm2d(out_channels))
        self.act = ACTIVATIONS[activation]()

    @property
    def norm(self) -> nn.Module:
        """The BatchNorm2d, or the nn.Identity that replaces it once folded into `conv`."""
        return getattr(self, self.norm_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))  # (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)


class DarknetConv(ConvBnAct):
    """The reference's "darknet_conv" of MultiScaleFusion: LeakyReLU(0.1), and its BatchNorm keyed
    `batch_norm` instead of `bn` in official checkpoints (docs/REFERENCE_FACTS.md section 5)."""

    norm_name = "batch_norm"

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__(in_channels, out_channels, kernel, activation="leaky_relu")
