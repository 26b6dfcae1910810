"""CSPDarknet (YOLOv5 v6 style) visual backbone returning stride 8/16/32 maps (and the stride-4
map for a mask decoder).

`visual_encoder.model` is an nn.Sequential whose indices are the reference's key prefixes
(`model.4.m.0.cv1.conv.weight`, ...), so cspdarknet_coco.pth and CSRef checkpoints load as is.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from csref_model.config import VisualBackboneConfig
from csref_model.layers import ConvBnAct

# Sequential indices whose outputs are returned: C3 after stride 8, C3 after stride 16, SPPF.
OUTPUT_STAGES = (4, 6, 9)
# C3 after stride 4: the finest map, read only by a mask decoder.
STRIDE4_STAGE = 2
# Stages 0..7 are frozen by the reference's freeze_backbone (the last C3 and SPPF train).
NUM_FROZEN_STAGES = 8


class Bottleneck(nn.Module):
    """x + conv3x3(conv1x1(x)), channels unchanged."""

    def __init__(self, channels: int):
        super().__init__()
        self.cv1 = ConvBnAct(channels, channels, 1)
        self.cv2 = ConvBnAct(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class C3(nn.Module):
    """CSP block: bottlenecks on one half, a 1x1 shortcut on the other, concatenated (bottlenecks first)."""

    def __init__(self, in_channels: int, out_channels: int, num_bottlenecks: int):
        super().__init__()
        hidden = out_channels // 2
        self.cv1 = ConvBnAct(in_channels, hidden, 1)
        self.cv2 = ConvBnAct(in_channels, hidden, 1)
        self.cv3 = ConvBnAct(2 * hidden, out_channels, 1)
        self.m = nn.Sequential(*[Bottleneck(hidden) for _ in range(num_bottlenecks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): one 5x5 max pool chained three times."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 5):
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = ConvBnAct(in_channels, hidden, 1)
        self.cv2 = ConvBnAct(hidden * 4, out_channels, 1)
        self.m = nn.MaxPool2d(kernel_size=kernel, stride=1, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], dim=1))


def scaled_channels(channels: int, width_multiple: float) -> int:
    # YOLOv5's rounding: a multiple of 8 (identity at width 1.0).
    return math.ceil(channels * width_multiple / 8) * 8


def scaled_depth(depth: int, depth_multiple: float) -> int:
    return max(round(depth * depth_multiple), 1)


class CSPDarknet(nn.Module):
    def __init__(self, cfg: VisualBackboneConfig):
        super().__init__()
        c1, c2, c3, c4, c5 = (scaled_channels(c, cfg.width_multiple) for c in (64, 128, 256, 512, 1024))
        n1, n2, n3, n4 = (scaled_depth(n, cfg.depth_multiple) for n in (3, 6, 9, 3))
        self.model = nn.Sequential(
            ConvBnAct(3, c1, 6, 2, padding=2),  # /2, replaces YOLOv5's Focus
            ConvBnAct(c1, c2, 3, 2),  # /4
            C3(c2, c2, n1),
            ConvBnAct(c2, c3, 3, 2),  # /8
            C3(c3, c3, n2),  # output s8
            ConvBnAct(c3, c4, 3, 2),  # /16
            C3(c4, c4, n3),  # output s16
            ConvBnAct(c4, c5, 3, 2),  # /32
            C3(c5, c5, n4),
            SPPF(c5, c5, 5),  # output s32
        )
        self.out_channels = (c3, c4, c5)
        self.stride4_channels = c2

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        # image: (B, 3, S, S) -> [(B, C3, S/8, S/8), (B, C4, S/16, S/16), (B, C5, S/32, S/32)]
        return self.pyramid(image)[1:]

    def pyramid(self, image: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) -> [(B, C2, S/4, S/4), (B, C3, S/8, S/8), (B, C4, S/16, S/16), (B, C5, S/32, S/32)]."""
        outputs = []
        x = image
        for index, stage in enumerate(self.model):
            x = stage(x)
            if index == STRIDE4_STAGE or index in OUTPUT_STAGES:
                outputs.append(x)
        return outputs

    def freeze_stem(self) -> None:
        """requires_grad=False for stages 0..7 (the reference's freeze_backbone)."""
        self.model[:NUM_FROZEN_STAGES].requires_grad_(False)
