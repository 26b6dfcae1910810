"""Speech-vision fusion: SimpleFusion per scale, MultiScaleFusion, GARAN attention."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from csref_model.layers import DarknetConv


class SimpleFusion(nn.Module):
    """Projects the visual map and the speech vector to the same width and multiplies them."""

    def __init__(self, visual_channels: int, speech_dim: int, out_channels: int):
        super().__init__()
        # Sequential indices are the reference's key names (v_proj.0 = conv, v_proj.1 = bn, ...).
        self.v_proj = nn.Sequential(nn.Conv2d(visual_channels, out_channels, 1), nn.BatchNorm2d(out_channels),
                                    nn.LeakyReLU(0.1))
        self.q_proj = nn.Sequential(nn.Conv2d(speech_dim, out_channels, 1), nn.BatchNorm2d(out_channels),
                                    nn.LeakyReLU(0.1))
        self.norm = nn.Sequential(nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.1))

    def forward(self, visual: torch.Tensor, speech: torch.Tensor) -> torch.Tensor:
        # visual: (B, Cv, H, W); speech: (B, D)
        visual = self.v_proj(visual)  # (B, C, H, W)
        speech = self.q_proj(speech[:, :, None, None])  # (B, C, 1, 1)
        return self.norm(visual * speech)  # (B, C, H, W)


class MultiScaleFusion(nn.Module):
    """Top-down then bottom-up mixing of three maps (strides 8, 16, 32) into `channels`-wide outputs.

    CSRef feeds the three fused maps, all `channels` wide, upsampled bilinearly. RefCLIP feeds the
    backbone's own maps (`in_channels` = their widths) and upsamples by nearest neighbour; with equal
    widths both are the same module. CSRef uses only the stride-32 output (`forward`); the
    stride-8/16 projections exist so official checkpoints load strictly, and `forward_all_scales`
    computes them (parity tests).
    """

    def __init__(self, channels: int, in_channels: tuple[int, int, int] | None = None,
                 upsampling: str = "bilinear"):
        super().__init__()
        c8, c16, c32 = in_channels or (channels, channels, channels)
        half = channels // 2
        if upsampling == "bilinear":
            # UpsamplingBilinear2d uses align_corners=True; the released CSRef weights depend on it.
            upsample = nn.UpsamplingBilinear2d
        elif upsampling == "nearest":
            upsample = nn.UpsamplingNearest2d
        else:
            raise ValueError(f"upsampling must be 'bilinear' or 'nearest', got {upsampling!r}")
        # Index 0 of each Sequential is the parameter-free resampling, as in the reference's keys.
        self.up_modules = nn.ModuleList([
            nn.Sequential(upsample(scale_factor=2), DarknetConv(c16 + half, half, 1), DarknetConv(half, half, 3)),
            nn.Sequential(upsample(scale_factor=2), DarknetConv(c32, half, 1), DarknetConv(half, half, 3)),
        ])
        self.down_modules = nn.ModuleList([
            nn.Sequential(nn.AvgPool2d(2, 2), DarknetConv(c8 + half, half, 1), DarknetConv(half, half, 3)),
            nn.Sequential(nn.AvgPool2d(2, 2), DarknetConv(c16 + channels, half, 1), DarknetConv(half, half, 3)),
        ])
        self.top_proj = DarknetConv(c32 + half, channels, 1)
        self.mid_proj = DarknetConv(c16 + channels, channels, 1)
        self.bot_proj = DarknetConv(c8 + half, channels, 1)

    def _mix(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s8, s16, s32 = maps  # (B, C8, 4G, 4G), (B, C16, 2G, 2G), (B, C32, G, G)
        s16 = torch.cat([self.up_modules[1](s32), s16], dim=1)  # (B, C/2 + C16, 2G, 2G)
        s8 = torch.cat([self.up_modules[0](s16), s8], dim=1)  # (B, C/2 + C8, 4G, 4G)
        s16 = torch.cat([self.down_modules[0](s8), s16], dim=1)  # (B, C + C16, 2G, 2G)
        s32 = torch.cat([self.down_modules[1](s16), s32], dim=1)  # (B, C/2 + C32, G, G)
        return s8, s16, s32

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """[s8, s16, s32] -> (B, C, G, G) top (stride 32) feature."""
        return self.top_proj(self._mix(maps)[2])

    def forward_all_scales(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """[s8, s16, s32] -> [bottom (s8), middle (s16), top (s32)], the reference's full output."""
        s8, s16, s32 = self._mix(maps)
        return [self.bot_proj(s8), self.mid_proj(s16), self.top_proj(s32)]


class GaranAttention(nn.Module):
    """GARAN collect-diffuse attention of the speech vector over the top visual map.

    Per head: collect = softmax over positions of q.k_c, gathered value g = sum_p a_p v_p;
    diffuse = sigmoid(k_d.q) per position; output_p = diffuse_p * g. Then w_o, BatchNorm,
    residual, LeakyReLU.

    Layout quirk (reproduced): the reference writes the per-position output of (row i, col j) at
    (row j, col i), i.e. the map is spatially transposed before `w_o`. The released weights
    depend on it. For non-square maps the reference scrambles the grid instead; CSRef only ever
    sees square letterboxed inputs, so we refuse non-square maps with a clear error.
    """

    def __init__(self, speech_dim: int, channels: int, num_heads: int = 2, dropout: float = 0.1):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.temperature = math.sqrt(self.head_dim)
        self.w_qs = nn.Linear(speech_dim, channels)
        self.w_kc = nn.Conv2d(channels, channels, 1)
        self.w_kd = nn.Conv2d(channels, channels, 1)
        self.w_vs = nn.Conv2d(channels, channels, 1)
        # Attention-map conv of the reference; its output is unused by CSRef (kept for checkpoints).
        self.w_m = nn.Conv2d(channels, 1, 3, padding=1)
        self.w_o = nn.Conv2d(channels, channels, 1)
        self.dropout_collect = nn.Dropout(dropout)
        self.dropout_diffuse = nn.Dropout(dropout)
        self.layer_norm = nn.BatchNorm2d(channels)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, speech: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        # speech: (B, D); visual: (B, C, H, W)
        batch, channels, height, width = visual.shape
        if height != width:
            raise ValueError(f"GaranAttention needs a square map (square letterboxed input), got {height}x{width}")
        heads, head_dim = self.num_heads, self.head_dim
        query = self.w_qs(speech).view(batch, heads, 1, head_dim)  # (B, h, 1, d)

        def positions(conv: nn.Conv2d) -> torch.Tensor:
            return conv(visual).view(batch, heads, head_dim, height * width).transpose(2, 3)  # (B, h, P, d)

        key_collect, key_diffuse, value = positions(self.w_kc), positions(self.w_kd), positions(self.w_vs)
        collect = F.softmax(query @ key_collect.transpose(2, 3) / self.temperature, dim=-1)  # (B, h, 1, P)
        gathered = self.dropout_collect(collect) @ value  # (B, h, 1, d)
        diffuse = torch.sigmoid(key_diffuse @ query.transpose(2, 3) / self.temperature)  # (B, h, P, 1)
        out = self.dropout_diffuse(diffuse) @ gathered  # (B, h, P, d), P row-major
        # (B, h, H, W, d) -> (B, h, d, W, H) -> (B, C, H, W): the spatial transpose quirk.
        out = out.view(batch, heads, height, width, head_dim).permute(0, 1, 4, 3, 2).reshape(
            batch, channels, height, width)
        out = self.w_o(out)  # (B, C, H, W)
        return self.act(self.layer_norm(out) + visual)  # (B, C, H, W)
