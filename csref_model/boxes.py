"""Box arithmetic shared by the head's loss, evaluation, the node and the demo.

Boxes are (..., 4) arrays, numpy or torch alike, in continuous pixel coordinates (no +1):
x1, y1, x2, y2 ("xyxy") or centre x, centre y, width, height ("cxcywh").
"""

from typing import TypeVar

import numpy as np
import torch

Boxes = TypeVar("Boxes", np.ndarray, torch.Tensor)


def cxcywh_to_xyxy(boxes: Boxes) -> Boxes:
    centre, size = boxes[..., :2], boxes[..., 2:4]
    return _cat([centre - size / 2, centre + size / 2], boxes)


def xyxy_to_cxcywh(boxes: Boxes) -> Boxes:
    low, high = boxes[..., :2], boxes[..., 2:4]
    return _cat([(low + high) / 2, high - low], boxes)


def box_area(boxes: Boxes) -> Boxes:
    return (boxes[..., 2] - boxes[..., 0]).clip(min=0) * (boxes[..., 3] - boxes[..., 1]).clip(min=0)


def box_iou(a: Boxes, b: Boxes, eps: float = 0.0) -> Boxes:
    """IoU of xyxy boxes, broadcast over the leading dimensions: (..., 4), (..., 4) -> (...).

    A pair whose union is empty has IoU 0 (with eps=0); `eps` is added to the union as the
    training losses do.
    """
    lib = torch if isinstance(a, torch.Tensor) else np
    width = (lib.minimum(a[..., 2], b[..., 2]) - lib.maximum(a[..., 0], b[..., 0])).clip(min=0)
    height = (lib.minimum(a[..., 3], b[..., 3]) - lib.maximum(a[..., 1], b[..., 1])).clip(min=0)
    inter = width * height
    union = box_area(a) + box_area(b) - inter + eps
    return lib.where(union > 0, inter / lib.where(union > 0, union, 1), 0 * inter)


def _cat(parts: list[Boxes], like: Boxes) -> Boxes:
    if isinstance(like, torch.Tensor):
        return torch.cat(parts, dim=-1)
    return np.concatenate(parts, axis=-1)
