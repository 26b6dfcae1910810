"""Anchor-free single-box head (YOLOX style, one stride-32 level, objectness only).

Inference: decode every cell, keep the one with the highest objectness (no NMS, no clipping);
`scored_cells` gives every cell's box and score, for callers that rank candidates themselves.
Training: SimOTA assignment of cells to the single ground-truth box, squared-IoU loss on the
positives and BCE objectness on all cells (docs/REFERENCE_FACTS.md §7). The class-agnostic
detector (`csref_model.detector`) trains the same head with the same loss on every object's box.
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


def decode_cell_corners(reg: torch.Tensor, obj: torch.Tensor) -> torch.Tensor:
    """(B, 4, G, G), (B, 1, G, G) -> (B, G*G, 5) x1, y1, x2, y2, objectness of every cell."""
    boxes = decode_cells(reg)  # (B, G*G, 4) cx, cy, w, h
    scores = torch.sigmoid(obj.flatten(1))  # (B, G*G)
    # Same operation order as the reference: x1 = cx - w/2, then x2 = x1 + w.
    x1 = boxes[..., 0] - boxes[..., 2] / 2
    y1 = boxes[..., 1] - boxes[..., 3] / 2
    return torch.stack([x1, y1, x1 + boxes[..., 2], y1 + boxes[..., 3], scores], dim=-1)  # (B, G*G, 5)


def best_cell(cells: torch.Tensor) -> torch.Tensor:
    """(B, N, 5) decoded cells -> (B, 5) the highest-scoring one."""
    # argmax over the sigmoid scores returns the first index on ties, as the reference.
    best = cells[..., 4].argmax(dim=1)  # (B,)
    return cells[torch.arange(cells.shape[0], device=cells.device), best]  # (B, 5)


def decode_best_box(reg: torch.Tensor, obj: torch.Tensor) -> torch.Tensor:
    """(B, 4, G, G), (B, 1, G, G) -> (B, 5) x1, y1, x2, y2, score of the highest-scoring cell."""
    return best_cell(decode_cell_corners(reg, obj))


@torch.no_grad()
def simota_assign(pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, grid_size: int) -> torch.Tensor:
    """SimOTA for one image and its GT boxes, without a class cost (YOLOX's assignment, class-agnostic).

    pred_boxes: (G*G, 4) decoded (cx, cy, w, h) px; gt_boxes: (M, 4) (cx, cy, w, h) px.
    Returns the (G*G,) index of the GT box each cell is a positive for, -1 for negatives. With one
    GT box this is exactly the reference's single-box assignment (docs/REFERENCE_FACTS.md §7).
    """
    num_cells = pred_boxes.shape[0]
    matched = torch.full((num_cells,), -1, dtype=torch.long, device=pred_boxes.device)
    if gt_boxes.shape[0] == 0:
        return matched
    cell_centres = (grid_cells(grid_size, pred_boxes.device, pred_boxes.dtype) + 0.5) * STRIDE  # (N, 2)
    # Strict inequalities written as the reference computes them (matters only at exact borders).
    offsets = cell_centres[None] - gt_boxes[:, None, :2]  # (M, N, 2)
    half_sides = 0.5 * gt_boxes[:, None, 2:]  # (M, 1, 2)
    in_box = ((offsets + half_sides > 0) & (half_sides - offsets > 0)).all(dim=2)  # (M, N)
    radius = CENTER_RADIUS * STRIDE
    in_centre = ((offsets + radius > 0) & (radius - offsets > 0)).all(dim=2)  # (M, N)
    candidates = (in_box | in_centre).any(dim=0).nonzero().squeeze(1)  # (K,) cells near any GT
    if candidates.numel() == 0:
        return matched
    ious = box_iou(cxcywh_to_xyxy(gt_boxes)[:, None], cxcywh_to_xyxy(pred_boxes[candidates])[None])  # (M, K)
    outside = ~(in_box & in_centre)[:, candidates]  # (M, K)
    cost = IOU_COST_WEIGHT * -torch.log(ious + 1e-8) + OUTSIDE_COST * outside  # (M, K)
    matching = torch.zeros_like(cost, dtype=torch.bool)  # (M, K)
    for gt_index in range(gt_boxes.shape[0]):
        # dynamic k: truncated sum of the best (up to 10) IoUs, at least 1
        top_ious = ious[gt_index].topk(min(DYNAMIC_K_CANDIDATES, candidates.numel())).values
        k = max(1, int(top_ious.sum()))
        matching[gt_index, cost[gt_index].topk(k, largest=False).indices] = True
    # A cell chosen by several GT boxes goes to the cheapest one.
    cost = torch.where(matching, cost, torch.full_like(cost, float("inf")))
    chosen = matching.any(dim=0)  # (K,)
    matched[candidates[chosen]] = cost[:, chosen].argmin(dim=0)
    return matched


def box_objectness_loss(reg: torch.Tensor, obj: torch.Tensor, gt_boxes: list[torch.Tensor]) -> torch.Tensor:
    """The YOLOX-style loss of one-level head outputs against each image's GT boxes.

    reg: (B, 4, G, G) raw; obj: (B, 1, G, G) logits; gt_boxes[b]: (M_b, 4) (cx, cy, w, h) input px.
    5 x (1 - IoU^2) on SimOTA's positives + BCE objectness on every cell, both over the positives.
    """
    batch, _, grid_size, _ = reg.shape
    pred_boxes = decode_cells(reg)  # (B, G*G, 4)
    obj_logits = obj.flatten(1)  # (B, G*G)
    matched = torch.stack([simota_assign(pred_boxes[index].detach(), gt_boxes[index].to(reg.dtype), grid_size)
                           for index in range(batch)])  # (B, G*G)
    positives = matched >= 0
    num_positives = max(int(positives.sum()), 1)
    matched_gt = torch.cat([gt_boxes[index].to(reg.dtype)[matched[index][positives[index]]]
                            for index in range(batch)])  # (P, 4), in the order of pred_boxes[positives]
    loss_iou = iou_loss(pred_boxes[positives], matched_gt).sum() / num_positives
    loss_obj = F.binary_cross_entropy_with_logits(obj_logits, positives.to(obj_logits.dtype),
                                                  reduction="sum") / num_positives
    return IOU_LOSS_WEIGHT * loss_iou + loss_obj


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
        return decode_cell_corners(*self.raw_outputs(feature))

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
        # An all-zero label row means "no object" in the reference (no positives).
        return box_objectness_loss(reg, obj, [gt_boxes[index:index + 1] if targets[index].sum() > 0
                                              else gt_boxes[index:index] for index in range(batch)])
