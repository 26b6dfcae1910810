"""Anchor-free single-box head (YOLOX style, one stride-32 level, objectness only).

Inference: decode every cell, keep the one with the highest objectness (no NMS, no clipping);
`scored_cells` gives every cell's box and score, for callers that rank candidates themselves.
Training: SimOTA assignment of cells to the single ground-truth box, squared-IoU loss on the
positives and BCE objectness on all cells (docs/REFERENCE_FACTS.md §7).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from csref_model.boxes import box_iou, cxcywh_to_xyxy
from csref_model.layers import ConvBnAct

STRIDE = 32
IOU_LOSS_WEIGHT = 5.0
CENTER_RADIUS = 2.5  # in strides: half-side of the square around the GT centre
IOU_COST_WEIGHT = 3.0
OUTSIDE_COST = 1e5  # cost of a candidate that is not both in the box and in the centre square
DYNAMIC_K_CANDIDATES = 10


def grid_cells(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(G*G, 2) (col, row) of every cell in row-major order."""
    rows, cols = torch.meshgrid(torch.arange(size, device=device), torch.arange(size, device=device),
                                indexing="ij")
    return torch.stack([cols, rows], dim=-1).view(-1, 2).to(dtype)


def decode_cells(reg: torch.Tensor) -> torch.Tensor:
    """(B, 4, G, G) raw (tx, ty, tw, th) -> (B, G*G, 4) boxes (cx, cy, w, h) in input pixels.

    The centre is (t + cell index) * stride, without YOLOX's +0.5 offset (as the reference).
    """
    batch, _, size, _ = reg.shape
    reg = reg.flatten(2).transpose(1, 2)  # (B, G*G, 4)
    cells = grid_cells(size, reg.device, reg.dtype)  # (G*G, 2)
    centres = (reg[..., :2] + cells) * STRIDE
    sizes = torch.exp(reg[..., 2:]) * STRIDE
    return torch.cat([centres, sizes], dim=-1)


def decode_scored_cells(reg: torch.Tensor, obj: torch.Tensor) -> torch.Tensor:
    """(B, 4, G, G), (B, 1, G, G) -> (B, G*G, 5) x1, y1, x2, y2, score of every cell, row-major."""
    boxes = decode_cells(reg)  # (B, G*G, 4) cx, cy, w, h
    scores = torch.sigmoid(obj.flatten(1))  # (B, G*G)
    # Same operation order as the reference: x1 = cx - w/2, then x2 = x1 + w.
    x1 = boxes[..., 0] - boxes[..., 2] / 2
    y1 = boxes[..., 1] - boxes[..., 3] / 2
    return torch.stack([x1, y1, x1 + boxes[..., 2], y1 + boxes[..., 3], scores], dim=-1)  # (B, G*G, 5)


def best_cell(cells: torch.Tensor) -> torch.Tensor:
    """(B, N, 5) scored cells -> (B, 5) the highest-scoring one."""
    # argmax over the sigmoid scores returns the first index on ties, as the reference.
    best = cells[..., 4].argmax(dim=1)  # (B,)
    return cells[torch.arange(cells.shape[0], device=cells.device), best]  # (B, 5)


def decode_best_box(reg: torch.Tensor, obj: torch.Tensor) -> torch.Tensor:
    """(B, 4, G, G), (B, 1, G, G) -> (B, 5) x1, y1, x2, y2, score of the highest-scoring cell."""
    return best_cell(decode_scored_cells(reg, obj))


@torch.no_grad()
def simota_assign(pred_boxes: torch.Tensor, gt_box: torch.Tensor, grid_size: int) -> torch.Tensor:
    """SimOTA for one image and one GT box, without a class cost.

    pred_boxes: (G*G, 4) decoded (cx, cy, w, h) px; gt_box: (4,) (cx, cy, w, h) px.
    Returns the (G*G,) bool mask of positive cells.
    """
    cell_centres = (grid_cells(grid_size, pred_boxes.device, pred_boxes.dtype) + 0.5) * STRIDE  # (G*G, 2)
    # Strict inequalities written as the reference computes them (matters only at exact borders).
    box_low, box_high = gt_box[:2] - 0.5 * gt_box[2:], gt_box[:2] + 0.5 * gt_box[2:]
    centre_low, centre_high = gt_box[:2] - CENTER_RADIUS * STRIDE, gt_box[:2] + CENTER_RADIUS * STRIDE
    in_box = ((cell_centres - box_low > 0) & (box_high - cell_centres > 0)).all(dim=1)  # (G*G,)
    in_centre = ((cell_centres - centre_low > 0) & (centre_high - cell_centres > 0)).all(dim=1)  # (G*G,)
    candidates = (in_box | in_centre).nonzero().squeeze(1)  # (K,)
    positives = torch.zeros(pred_boxes.shape[0], dtype=torch.bool, device=pred_boxes.device)
    if candidates.numel() == 0:
        return positives
    ious = box_iou(cxcywh_to_xyxy(gt_box), cxcywh_to_xyxy(pred_boxes[candidates]))  # (K,)
    outside = ~(in_box & in_centre)[candidates]
    cost = IOU_COST_WEIGHT * -torch.log(ious + 1e-8) + OUTSIDE_COST * outside
    # dynamic k: truncated sum of the best (up to 10) IoUs, at least 1
    top_ious = ious.topk(min(DYNAMIC_K_CANDIDATES, ious.numel())).values
    k = max(1, int(top_ious.sum()))
    positives[candidates[cost.topk(k, largest=False).indices]] = True
    return positives


def iou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - IoU^2 per row of (N, 4) (cx, cy, w, h) pairs; 1e-16 keeps empty unions finite, as the reference."""
    return 1 - box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target), eps=1e-16) ** 2


class SRECHead(nn.Module):
    def __init__(self, in_channels: int, hidden_channels: int):
        super().__init__()
        # Single-element ModuleLists: the reference's key names (`stems.0`, `reg_convs.0.1`, ...).
        self.stems = nn.ModuleList([ConvBnAct(in_channels, hidden_channels, 1)])
        self.reg_convs = nn.ModuleList([nn.Sequential(ConvBnAct(hidden_channels, hidden_channels, 3),
                                                      ConvBnAct(hidden_channels, hidden_channels, 3))])
        self.reg_preds = nn.ModuleList([nn.Conv2d(hidden_channels, 4, 1)])
        self.obj_preds = nn.ModuleList([nn.Conv2d(hidden_channels, 1, 1)])

    def raw_outputs(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, G, G) -> raw regression (B, 4, G, G) and objectness logits (B, 1, G, G)."""
        feature = self.reg_convs[0](self.stems[0](feature))  # (B, hidden, G, G)
        return self.reg_preds[0](feature), self.obj_preds[0](feature)

    def scored_cells(self, feature: torch.Tensor) -> torch.Tensor:
        """(B, C, G, G) -> (B, G*G, 5) x1, y1, x2, y2, score of every cell in input pixels."""
        return decode_scored_cells(*self.raw_outputs(feature))

    def forward(self, feature: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Without targets: (B, 5) boxes. With targets (B, 4) normalised (cx, cy, w, h): scalar loss."""
        reg, obj = self.raw_outputs(feature)
        if targets is None:
            return decode_best_box(reg, obj)
        return self.loss(reg, obj, targets)

    def loss(self, reg: torch.Tensor, obj: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        batch, _, grid_size, _ = reg.shape
        if targets.shape != (batch, 4):
            raise ValueError(f"targets must be ({batch}, 4) normalised cx, cy, w, h, got {tuple(targets.shape)}")
        gt_boxes = targets.to(reg.dtype) * (grid_size * STRIDE)  # (B, 4) input pixels
        pred_boxes = decode_cells(reg)  # (B, G*G, 4)
        obj_logits = obj.flatten(1)  # (B, G*G)
        positives = torch.zeros_like(obj_logits, dtype=torch.bool)
        for index in range(batch):
            # An all-zero label row means "no object" in the reference (no positives).
            if targets[index].sum() > 0:
                positives[index] = simota_assign(pred_boxes[index].detach(), gt_boxes[index], grid_size)
        num_positives = max(int(positives.sum()), 1)
        matched_gt = gt_boxes[:, None, :].expand_as(pred_boxes)[positives]  # (P, 4)
        loss_iou = iou_loss(pred_boxes[positives], matched_gt).sum() / num_positives
        loss_obj = F.binary_cross_entropy_with_logits(obj_logits, positives.to(obj_logits.dtype),
                                                      reduction="sum") / num_positives
        return IOU_LOSS_WEIGHT * loss_iou + loss_obj
