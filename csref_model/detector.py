"""A class-agnostic object detector: the candidate boxes weakly supervised grounding chooses from.

It plays the part of RefCLIP's frozen COCO YOLOv3 (docs/TRAINING.md, "Candidate detector"): CSPDarknet ->
1x1 projections of the stride 8/16/32 maps -> the top-down/bottom-up `MultiScaleFusion` ->
the YOLOX-style anchor-free head of SREC on the stride-32 grid, one box and one objectness per
cell, trained with multi-box SimOTA (`head.box_objectness_loss`). It has one class, "object":
colour, size and position are never labels, and it never sees an expression.

    detector = build_detector(DetectorConfig(image_size=320))
    cells = detector(images)  # (B, G*G, 5) x1, y1, x2, y2, objectness of every cell, input px
    loss = detector(images, gt_boxes)  # gt_boxes[b]: (M_b, 4) cx, cy, w, h, input px

With `appearance_loss_weight` > 0 the backbone's stride-32 map also learns to reproduce the mean
colour of the 8 px patches inside the objects' boxes (a 1x1 convolution and a pixel shuffle; mean
squared error). RefCLIP's COCO detector sits on ImageNet features that keep appearance at every
stride; a one-class detector trained on synthetic scenes drops colour by stride 32, since colour
never helps to find an object, and the frozen candidates RefCLIP chooses from lose it. This
objective stands in for that pretraining: it reads only the image and the boxes the detector
already has, and names no colour, size or place (docs/TRAINING.md, "Candidate detector").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from csref_model.backbone import CSPDarknet
from csref_model.checkpoint import CONFIG_FILE, load_into, load_visual_backbone, read_checkpoint_dir
from csref_model.config import (
    HeadConfig,
    VisualBackboneConfig,
    check_image_size,
    resolve_config_path,
    resolve_pretrained_path,
)
from csref_model.fusion import MultiScaleFusion
from csref_model.head import SRECHead, box_objectness_loss, decode_cell_corners
from csref_model.layers import ConvBnAct
from csref_model.runtime.contract import check_image
from csref_model.typed_yaml import from_dict, read_yaml

DETECTOR_KIND = "class_agnostic_detector"
# The appearance head predicts PATCHES_PER_CELL x PATCHES_PER_CELL mean colours per stride-32 cell (8 px patches).
PATCHES_PER_CELL = 4


@dataclass
class DetectorConfig:
    # Marks a detector checkpoint's config.yaml (CSRef configs have no `kind`).
    kind: str = DETECTOR_KIND
    image_size: int = 416
    visual_backbone: VisualBackboneConfig = field(default_factory=VisualBackboneConfig)
    # Width of the projected maps and of MultiScaleFusion.
    neck_channels: int = 256
    head: HeadConfig = field(default_factory=HeadConfig)
    # Weight of the appearance loss (stride-32 map -> colours of the 8 px patches in objects); 0: no such head.
    appearance_loss_weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "DetectorConfig":
        config = from_dict(cls, data, source)
        if config.kind != DETECTOR_KIND:
            raise ValueError(f"{source}: kind must be {DETECTOR_KIND!r} for a detector config, got {config.kind!r}")
        check_image_size(config.image_size, "image_size", source)
        if config.neck_channels % 2:
            raise ValueError(f"{source}: neck_channels must be even, got {config.neck_channels}")
        if config.appearance_loss_weight < 0:
            raise ValueError(f"{source}: appearance_loss_weight must be >= 0, got {config.appearance_loss_weight}")
        return config


def load_detector_config(name_or_path: str | Path) -> DetectorConfig:
    """"detector_base", "detector_tiny" (config/models/) or a YAML file -> a validated `DetectorConfig`."""
    path = resolve_config_path(name_or_path)
    return DetectorConfig.from_dict(read_yaml(path, "detector config"), source=str(path))


class ObjectDetector(nn.Module):
    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.visual_encoder = CSPDarknet(cfg.visual_backbone)
        self.neck_proj = nn.ModuleList([ConvBnAct(channels, cfg.neck_channels, 1)
                                        for channels in self.visual_encoder.out_channels])
        self.neck = MultiScaleFusion(cfg.neck_channels)
        self.head = SRECHead(cfg.neck_channels, cfg.head.hidden_size)
        self.appearance_loss_weight = cfg.appearance_loss_weight
        self.appearance_head = (nn.Conv2d(self.visual_encoder.out_channels[-1], 3 * PATCHES_PER_CELL ** 2, 1)
                                if cfg.appearance_loss_weight > 0 else None)

    def encode_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) RGB in [0, 1] -> [(B, C3, S/8, S/8), (B, C4, S/16, S/16), (B, C5, S/32, S/32)]."""
        check_image(image)
        return self.visual_encoder(image)

    def raw_outputs(self, image_maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone maps -> raw regression (B, 4, G, G) and objectness logits (B, 1, G, G)."""
        top = self.neck([proj(visual) for proj, visual in zip(self.neck_proj, image_maps)])  # (B, N, G, G)
        return self.head.raw_outputs(top)

    def forward(self, image: torch.Tensor, gt_boxes: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, 3, S, S) -> (B, G*G, 5) x1, y1, x2, y2, objectness of every stride-32 cell (row-major);
        with gt_boxes[b] (M_b, 4) (cx, cy, w, h) in input pixels, the training loss (scalar)."""
        image_maps = self.encode_image(image)
        reg, obj = self.raw_outputs(image_maps)
        if gt_boxes is None:
            return decode_cell_corners(reg, obj)
        loss = box_objectness_loss(reg, obj, gt_boxes)
        if self.appearance_head is None:
            return loss
        return loss + self.appearance_loss_weight * self.appearance_loss(image, image_maps[-1], gt_boxes)

    def appearance_loss(self, image: torch.Tensor, top_map: torch.Tensor, gt_boxes: list[torch.Tensor]) -> torch.Tensor:
        """Mean squared error of the 8 px patch colours (B, 3, S/8, S/8) predicted from the backbone's
        stride-32 map (B, C5, S/32, S/32), over the patches whose centre lies in an object's box
        (gt_boxes[b]: (M_b, 4) cx, cy, w, h input px). The background, most of a scene, would
        otherwise outweigh the objects."""
        predicted = F.pixel_shuffle(self.appearance_head(top_map), PATCHES_PER_CELL)  # (B, 3, P, P)
        patch_px = 32 // PATCHES_PER_CELL
        target = F.avg_pool2d(image, patch_px)  # (B, 3, P, P)
        centres = (torch.arange(target.shape[-1], device=image.device, dtype=image.dtype) + 0.5) * patch_px  # (P,)
        in_object = torch.stack([patches_in_boxes(centres, boxes.to(image.dtype)) for boxes in gt_boxes])  # (B, P, P)
        squared_error = (predicted - target).pow(2).sum(dim=1)  # (B, P, P)
        return (squared_error * in_object).sum() / (3 * in_object.sum()).clamp(min=1)


def patches_in_boxes(centres: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Patch centres (P,) along each axis and boxes (M, 4) cx, cy, w, h -> (P, P) mask of the patches
    (row y, column x) whose centre lies in at least one box."""
    x_in = (centres[None] - boxes[:, 0:1]).abs() <= boxes[:, 2:3] / 2  # (M, P)
    y_in = (centres[None] - boxes[:, 1:2]).abs() <= boxes[:, 3:4] / 2  # (M, P)
    return (y_in[:, :, None] & x_in[:, None, :]).any(dim=0).to(centres.dtype)  # (P, P)


def top_cells(cells: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, 5) decoded cells -> their k highest-objectness cells (B, k, 5) and indices (B, k), best first."""
    indices = cells[..., 4].topk(min(k, cells.shape[1]), dim=1).indices  # (B, k)
    return torch.gather(cells, 1, indices[..., None].expand(-1, -1, cells.shape[2])), indices


def build_detector(cfg: DetectorConfig, load_pretrained: bool = True) -> ObjectDetector:
    """A detector, its backbone from `visual_backbone.pretrained_path` (cspdarknet_coco.pth) if set."""
    model = ObjectDetector(cfg)
    if load_pretrained and cfg.visual_backbone.pretrained_path is not None:
        load_visual_backbone(model.visual_encoder, resolve_pretrained_path(cfg.visual_backbone.pretrained_path))
    return model


def build_detector_from_checkpoint(path: str | Path) -> tuple[ObjectDetector, DetectorConfig]:
    """Our checkpoint directory (model.safetensors + config.yaml) -> (detector in eval mode, config)."""
    state_dict, config_dict = read_checkpoint_dir(path)
    config = DetectorConfig.from_dict(config_dict, source=str(Path(path) / CONFIG_FILE))
    model = ObjectDetector(config)
    load_into(model, state_dict, str(path))
    return model.eval(), config
