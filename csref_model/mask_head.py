"""A speech-conditioned stride-4 mask decoder on the SREC trunk (the model of S+S+C's Correct
stage, docs/TRAINING.md "Referring masks without mask labels").

SREC's trunk already conditions every scale on the speech: SimpleFusion multiplies the stride
8/16/32 maps by the projected speech vector and GARAN attends over the top map with it. The
decoder climbs from GARAN's top map through the fused stride-16 and stride-8 maps (FPN style:
upsample, add the projected lateral map, refine with a 3x3 conv) to the backbone's stride-4
map, which carries the edges; that map is gated per channel by the speech vector, so the
finest scale is speech-conditioned as well. Two-class logits (background, target) come out at
stride 4, the form S+S+C's class-weighted cross-entropy takes.

    logits = mask_head(stride4, fused, top, speech)  # (B, 2, S/4, S/4)
    mask = mask_to_original(logits[0], geometry)     # (h, w) bool, the original image's pixels
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from csref_model.layers import ConvBnAct
from csref_model.preprocessing import Letterbox

MASK_CLASSES = 2  # background, target


class MaskHead(nn.Module):
    def __init__(self, stride4_channels: int, fused_channels: int, speech_dim: int, hidden: int):
        super().__init__()
        self.top_proj = ConvBnAct(fused_channels, hidden, 1)
        self.lateral16 = ConvBnAct(fused_channels, hidden, 1)
        self.lateral8 = ConvBnAct(fused_channels, hidden, 1)
        self.lateral4 = ConvBnAct(stride4_channels, hidden, 1)
        self.speech_gate = nn.Linear(speech_dim, hidden)
        self.refine16 = ConvBnAct(hidden, hidden, 3)
        self.refine8 = ConvBnAct(hidden, hidden, 3)
        self.refine4 = ConvBnAct(hidden, hidden, 3)
        self.classifier = nn.Conv2d(hidden, MASK_CLASSES, 1)

    def forward(self, stride4: torch.Tensor, fused: list[torch.Tensor], top: torch.Tensor,
                speech: torch.Tensor) -> torch.Tensor:
        """stride4 (B|1, C4, 8G, 8G) backbone map; fused [(B, C, 4G, 4G), (B, C, 2G, 2G), (B, C, G, G)]
        SimpleFusion outputs; top (B, C, G, G) GARAN output; speech (B, D) -> logits (B, 2, 8G, 8G)."""
        x = self.top_proj(top)  # (B, h, G, G)
        x = self.refine16(_up(x) + self.lateral16(fused[1]))  # (B, h, 2G, 2G)
        x = self.refine8(_up(x) + self.lateral8(fused[0]))  # (B, h, 4G, 4G)
        gate = torch.sigmoid(self.speech_gate(speech))[:, :, None, None]  # (B, h, 1, 1)
        x = self.refine4(_up(x) + self.lateral4(stride4) * gate)  # (B, h, 8G, 8G)
        return self.classifier(x)  # (B, 2, 8G, 8G)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def mask_to_original(logits: torch.Tensor, geometry: Letterbox) -> np.ndarray:
    """(2, s, s) mask logits on the letterboxed input -> (h, w) bool mask of the original image:
    upsampled to the input side, the letterbox's padding cut off, resized to the original size,
    target where its logit beats the background's."""
    logits = F.interpolate(logits[None].float(), size=(geometry.size, geometry.size), mode="bilinear",
                           align_corners=False)[0]  # (2, S, S)
    inside = logits[:, geometry.dy:geometry.dy + geometry.nh, geometry.dx:geometry.dx + geometry.nw]  # (2, nh, nw)
    original = F.interpolate(inside[None], size=(geometry.h, geometry.w), mode="bilinear", align_corners=False)[0]
    return (original[1] > original[0]).cpu().numpy()
