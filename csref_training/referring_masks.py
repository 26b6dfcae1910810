"""Referring masks without mask labels: the pieces of S+S+C ("Segment, Select, Correct", Girbal
et al.; docs/TRAINING.md "Referring masks without mask labels") that `csref_training.ssc` runs.

* Segment: `grabcut_box`, a mask from a box prompt (OpenCV GrabCut in SAM's place).
* Correct: `class_weighted_ce` (S+S+C's cross-entropy, class weights [0.9, 1.1]),
  `pseudo_iou`, `random_assignment` (random_ce) and `greedy_assignment` (greedy_ce): which
  candidate mask each sentence of a batch is trained towards. Sentences about the same referent
  get the same mask; different referents of one image get different masks while there are enough.
* Evaluation: `mask_counts` and `summarise` (mIoU, oIoU = sum of intersections / sum of unions,
  precision at IoU 0.5-0.9, box Acc@0.5 from each mask's box), `mask_box`.
* Files: label-map PNGs (pixel = instance index + 1, 0 = background) and their letterboxing.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from csref_model.boxes import box_iou
from csref_model.preprocessing import Letterbox

# S+S+C weights the target class a little above the background in every cross-entropy.
CLASS_WEIGHTS = (0.9, 1.1)
PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
GRABCUT_ITERATIONS = 5
# Context around the box that GrabCut models as background, as a fraction of the box side.
GRABCUT_CONTEXT = 0.5


# ----------------------------------------------------------------------------------------
# Segment
# ----------------------------------------------------------------------------------------
def grabcut_box(image_rgb: np.ndarray, box_xyxy: Sequence[float], iterations: int = GRABCUT_ITERATIONS) -> np.ndarray:
    """(H, W, 3) uint8 RGB + a box (original pixels) -> (H, W) bool mask of the object in the box.

    GrabCut runs on a crop around the box (the box plus GRABCUT_CONTEXT of its side each way),
    seeded by OpenCV's RNG at 0 so a run is repeatable. A box GrabCut leaves empty yields the
    filled box, so every candidate keeps a mask.
    """
    height, width = image_rgb.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    x1, x2 = np.clip([x1, x2], 0, width)
    y1, y2 = np.clip([y1, y2], 0, height)
    mask = np.zeros((height, width), dtype=bool)
    bx1, by1, bx2, by2 = int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2))
    if bx2 - bx1 < 2 or by2 - by1 < 2:
        mask[by1:by2, bx1:bx2] = True
        return mask
    pad_x, pad_y = int((bx2 - bx1) * GRABCUT_CONTEXT) + 2, int((by2 - by1) * GRABCUT_CONTEXT) + 2
    cx1, cy1 = max(bx1 - pad_x, 0), max(by1 - pad_y, 0)
    cx2, cy2 = min(bx2 + pad_x, width), min(by2 + pad_y, height)
    crop = np.ascontiguousarray(image_rgb[cy1:cy2, cx1:cx2, ::-1])  # BGR, as OpenCV expects
    labels = np.zeros(crop.shape[:2], dtype=np.uint8)
    background_model, foreground_model = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    cv2.grabCut(crop, labels, (bx1 - cx1, by1 - cy1, bx2 - bx1, by2 - by1), background_model, foreground_model,
                iterations, cv2.GC_INIT_WITH_RECT)
    foreground = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    if not foreground.any():
        foreground[by1 - cy1:by2 - cy1, bx1 - cx1:bx2 - cx1] = True
    mask[cy1:cy2, cx1:cx2] = foreground
    return mask


def instance_label_map(masks: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Binary masks, best first -> (H, W) uint8 label map (mask i -> i + 1); where masks overlap
    the better (earlier) one wins."""
    if len(masks) > 254:
        raise ValueError(f"a uint8 label map holds at most 254 instances, got {len(masks)}")
    labels = np.zeros(shape, dtype=np.uint8)
    for index in reversed(range(len(masks))):
        labels[masks[index]] = index + 1
    return labels


# ----------------------------------------------------------------------------------------
# Correct: loss and assignment of candidate masks
# ----------------------------------------------------------------------------------------
def class_weighted_ce(logits: torch.Tensor, targets: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 2, H, W) logits, (N, H, W) {0, 1} targets -> the mean over the N samples of each
    sample's cross-entropy with class weights CLASS_WEIGHTS (weighted mean over its pixels), as
    S+S+C sums them and divides by the batch size; `active` (N,) bool leaves samples out of the
    sum (greedy_ce's samples without a mask) but not out of the count."""
    weight = torch.tensor(CLASS_WEIGHTS, dtype=logits.dtype, device=logits.device)
    per_sample = torch.stack([F.cross_entropy(logits[i:i + 1], targets[i:i + 1].long(), weight=weight)
                              for i in range(logits.shape[0])])  # (N,)
    if active is not None:
        per_sample = per_sample * active.to(per_sample.dtype)
    return per_sample.mean()


def pseudo_iou(foreground_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft IoU of (H, W) foreground probabilities with a (H, W) {0, 1} mask: sum(p m) /
    (sum p + sum m - sum(p m)) (Romera-Paredes and Torr's, as S+S+C uses it)."""
    intersection = (foreground_prob * mask).sum()
    return intersection / torch.clamp(foreground_prob.sum() + mask.sum() - intersection, min=1e-7)


def random_assignment(num_masks: Sequence[int], referents: Sequence[Hashable], images: Sequence[Hashable],
                      rng: np.random.Generator) -> list[int]:
    """random_ce: sample i gets a random one of its num_masks[i] candidates, in batch order; a
    referent seen before keeps its mask, and a new referent avoids the masks other referents of
    its image already hold (any mask if none is left). Candidate i of one image is the same mask
    for every sample of that image."""
    assigned: list[int] = []
    for i, count in enumerate(num_masks):
        earlier = [j for j in range(i) if images[j] == images[i]]
        same = [j for j in earlier if referents[j] == referents[i]]
        if same:
            assigned.append(assigned[same[0]])
            continue
        taken = {assigned[j] for j in earlier}
        options = [m for m in range(count) if m not in taken] or list(range(count))
        assigned.append(int(options[rng.integers(len(options))]))
    return assigned


def greedy_assignment(preferences: Sequence[torch.Tensor], referents: Sequence[Hashable],
                      images: Sequence[Hashable]) -> list[int | None]:
    """greedy_ce: constrained greedy matching of samples to candidate masks.

    preferences[i] (M_i,) is the pseudo-IoU of sample i's prediction with each candidate of its
    image. Per image, repeatedly take the highest remaining (sample, mask) preference; every
    sample of that referent gets that mask, and the mask is struck out for the image's other
    referents. A sample with a single candidate always gets it. A sample left without a mask (more
    referents than masks) gets None: S+S+C draws it a random mask but adds no cross-entropy for
    it, so it only counts in the batch mean.
    """
    assigned = {i: 0 for i in range(len(images)) if len(preferences[i]) == 1}
    for image in dict.fromkeys(images):
        members = [i for i in range(len(images)) if images[i] == image and i not in assigned]
        remaining = {i: preferences[i].detach().float().cpu().clone() for i in members}
        while remaining:
            best_value, best_sample, best_mask = -np.inf, -1, -1
            for i, prefs in remaining.items():
                if prefs.numel() and float(prefs.max()) > best_value:
                    best_value, best_sample, best_mask = float(prefs.max()), i, int(prefs.argmax())
            if best_sample < 0:
                break  # every mask of the image is taken
            for i in members:
                if i not in remaining:
                    continue
                if referents[i] == referents[best_sample]:
                    assigned[i] = best_mask
                    del remaining[i]
                else:
                    remaining[i][best_mask] = -np.inf
    return [assigned.get(i) for i in range(len(images))]


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------
def mask_counts(prediction: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """Two (H, W) bool masks -> (intersection, union) pixel counts."""
    return int(np.logical_and(prediction, truth).sum()), int(np.logical_or(prediction, truth).sum())


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """(H, W) bool -> its tight box x1, y1, x2, y2 (pixel edges), None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def metric_sums(intersections: Sequence[int], unions: Sequence[int], box_hits: Sequence[bool]) -> list[float]:
    """Per-sample pixel counts -> the sums every metric is made of (they add over processes):
    [count, sum of IoU, sum of intersections, sum of unions, box hits, count with IoU >= t for each t]."""
    inter, union = np.asarray(intersections, dtype=np.float64), np.asarray(unions, dtype=np.float64)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)  # 0 where the union is empty
    return [float(len(iou)), float(iou.sum()), float(inter.sum()), float(union.sum()), float(np.sum(box_hits)),
            *(float((iou >= t).sum()) for t in PRECISION_THRESHOLDS)]


def metrics_from_sums(sums: Sequence[float]) -> dict[str, float]:
    """`metric_sums` -> mIoU (mean per-sample IoU), oIoU (sum of intersections / sum of unions),
    prec@t (fraction with IoU >= t) and box_acc_50."""
    count, iou_sum, inter_sum, union_sum, hits, *at_least = sums
    if count == 0:
        raise ValueError("no samples to summarise")
    metrics = {"count": count, "miou": iou_sum / count, "oiou": inter_sum / union_sum if union_sum else 0.0}
    metrics.update({f"prec@{t}": n / count for t, n in zip(PRECISION_THRESHOLDS, at_least)})
    metrics["box_acc_50"] = hits / count
    return metrics


def summarise(intersections: Sequence[int], unions: Sequence[int], box_hits: Sequence[bool]) -> dict[str, float]:
    """Per-sample (intersection, union) pixel counts and box hits -> the metrics (`metrics_from_sums`)."""
    return metrics_from_sums(metric_sums(intersections, unions, box_hits))


def box_hit(mask: np.ndarray, truth_xyxy: Sequence[float]) -> bool:
    """Whether `mask`'s box has IoU > 0.5 with the true box (Acc@0.5 as the REC papers define it)."""
    box = mask_box(mask)
    return box is not None and float(box_iou(box, np.asarray(truth_xyxy, dtype=np.float64))) > 0.5


# ----------------------------------------------------------------------------------------
# Files and letterboxing
# ----------------------------------------------------------------------------------------
def write_label_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), labels.astype(np.uint8)):
        raise OSError(f"cannot write {path}")


def read_label_png(path: Path) -> np.ndarray:
    """A label-map PNG -> (H, W) uint8."""
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise FileNotFoundError(f"cannot read mask file {path}; run the stage that writes it first")
    if labels.ndim != 2:
        raise ValueError(f"{path}: a label map must be single-channel, got shape {labels.shape}")
    return labels


def letterbox_labels(labels: np.ndarray, geometry: Letterbox) -> np.ndarray:
    """(h, w) label map of the original image -> (S, S) on the letterboxed input (nearest, 0 padding)."""
    resized = cv2.resize(labels, (geometry.nw, geometry.nh), interpolation=cv2.INTER_NEAREST)
    canvas = np.zeros((geometry.size, geometry.size), dtype=labels.dtype)
    canvas[geometry.dy:geometry.dy + geometry.nh, geometry.dx:geometry.dx + geometry.nw] = resized
    return canvas
