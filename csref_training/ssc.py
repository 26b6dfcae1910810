"""Referring masks without mask labels, S+S+C's three stages for speech (docs/TRAINING.md,
"Referring masks without mask labels (S+S+C)"):

    python -m csref_training.ssc segment  --config config/train/ssc_spoken_shapes.yaml --split train
    python -m csref_training.ssc select   --config Y --split train --method refclip
    python -m csref_training.ssc correct  --config Y [key=value ...]                    # random_ce
    python -m csref_training.ssc correct  --config Y task.loss=greedy_ce init_checkpoint=runs/ssc_random/best \
        output_dir=runs/ssc_greedy
    python -m csref_training.ssc evaluate --config Y --split test (--checkpoint runs/ssc_greedy/best | --select METHOD)
    python -m csref_training.ssc correct  --config Y task.select_method=truth output_dir=runs/ssc_truth  # upper bound

Every stage writes inspectable files under `task.stage_dir`:
    segment/<split>/instances_<sent_id>.png  per referent (S+S+C's per-referent instance-mask file):
                                              pixel = instance index + 1, instances best first
    segment/<split>.json                      {sent_id: {"iid", "boxes" (original px), "objectness"}}
    select/<method>/<split>/mask_<sent_id>.png  the chosen instance (pixel 1)
    select/<method>/<split>.json              {sent_id: {"instance", "scores"}}

Segment: the class-agnostic detector's `task.candidates` most object-like cells, those with
objectness >= `task.min_objectness` (the best one always), overlapping ones (IoU >
`task.dedupe_iou`) merged into the better, each box prompting OpenCV GrabCut for its mask. SAM is
the paper's prompt segmenter; GrabCut stands in because SAM's weights cannot be fetched here and
would not run on a robot's CPU in seconds, while GrabCut needs no weights and separates
Spoken Shapes' flat-coloured objects from their backgrounds (a test checks IoU > 0.8).
Select (zero-shot, from the speech only): `refclip` scores each instance by RefCLIP's dot product
of the frozen CSA speech vector with the candidate cell whose box best matches the instance's;
baselines `first` (the most object-like), `random`, and `best` (oracle: the true mask, else the
true box; never for training a reported model); `truth` writes the true masks themselves (train
masks from the generator's --train-masks), the fully supervised upper bound's targets.
Correct: SREC with its mask head (csref_model.mask_head) on the shared training loop, towards
the selected masks (`random_ce`), then towards all instances with constrained greedy matching
(`greedy_ce`), both with the class-weighted cross-entropy (csref_training.referring_masks).
Training reads no box and no true mask; validation mIoU (val masks) picks `best`.
"""

import argparse
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from csref_model.audio import SAMPLE_RATE, load_audio
from csref_model.boxes import box_iou
from csref_model.checkpoint import load_csa_speech_encoder, load_into, read_state_dict
from csref_model.config import ModelConfig
from csref_model.detector import build_detector_from_checkpoint, top_cells
from csref_model.mask_head import mask_to_original
from csref_model.preprocessing import letterbox, prepare_waveform, speech_batch
from csref_model.refclip import build_refclip_from_checkpoint
from csref_model.srec import build_srec, build_srec_from_checkpoint
from csref_model.typed_yaml import from_dict
from csref_training import trainer
from csref_training.datasets import (
    SpeakerIndex,
    build_srec_dataset,
    collate_srec,
    image_file_name,
    load_refcoco_entries,
    refcoco_layout,
)
from csref_training.distributed import DistInfo, sum_over_ranks
from csref_training.referring_masks import (
    box_hit,
    class_weighted_ce,
    grabcut_box,
    greedy_assignment,
    instance_label_map,
    letterbox_labels,
    mask_box,
    mask_counts,
    metric_sums,
    metrics_from_sums,
    pseudo_iou,
    random_assignment,
    read_label_png,
    summarise,
    write_label_png,
)
from csref_training.reproducibility import eval_subset
from csref_training.train_config import TrainConfig, build_model_config, load_train_config

logger = logging.getLogger(__name__)

SELECT_METHODS = ("refclip", "first", "random", "best", "truth")
LOSSES = ("random_ce", "greedy_ce")


@dataclass
class SSCTaskConfig:
    """The training YAML's `task:` section for S+S+C."""

    stage_dir: str = "runs/ssc"
    detector_checkpoint: str | None = None  # segment
    refclip_checkpoint: str | None = None  # select --method refclip
    candidates: int = 17  # the detector's most object-like cells considered (RefCLIP's select_num)
    min_objectness: float = 0.3
    dedupe_iou: float = 0.5
    # A detector checkpoint whose backbone (visual_encoder.*) initialises SREC's, for a fresh trunk
    # (init_checkpoint null): the one stage that has seen Spoken Shapes' objects without a referring label.
    visual_encoder_checkpoint: str | None = None
    loss: str = "random_ce"
    select_method: str = "refclip"  # whose selected masks random_ce trains on
    seed: int = 0  # the random baseline's draws


def task_settings(cfg: TrainConfig) -> SSCTaskConfig:
    settings = from_dict(SSCTaskConfig, cfg.task, "training config", section="task")
    if settings.loss not in LOSSES:
        raise ValueError(f"training config: task.loss must be one of {LOSSES}, got {settings.loss!r}")
    if settings.select_method not in SELECT_METHODS:
        raise ValueError(f"training config: task.select_method must be one of {SELECT_METHODS}, "
                         f"got {settings.select_method!r}")
    return settings


def _annotations(cfg: TrainConfig) -> tuple[Any, dict[str, list[dict[str, Any]]]]:
    layout = refcoco_layout(cfg.data.dataset, cfg.data.root, cfg.data.ann_path, cfg.data.image_dir,
                            cfg.data.audio_root, cfg.data.image_pattern)
    return layout, json.loads(layout.ann_path.read_text())


def _read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _referent_id(entry: dict[str, Any]) -> int:
    """An entry is one referent; its first sentence's id names its files (S+S+C's ref_id)."""
    return int(entry["sent_ids"][0])


def _split_entries(annotations: dict[str, Any], split: str) -> list[dict[str, Any]]:
    if split not in annotations:
        raise ValueError(f"the annotation file has no split {split!r}; it has {sorted(annotations)}")
    return annotations[split]


# ----------------------------------------------------------------------------------------
# Segment
# ----------------------------------------------------------------------------------------
def dedupe(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy NMS: indices of the boxes kept, best first."""
    order, kept = list(np.argsort(-scores, kind="stable")), []
    while order:
        best = order.pop(0)
        kept.append(int(best))
        order = [i for i in order if float(box_iou(boxes[best], boxes[i])) <= iou_threshold]
    return kept


@torch.no_grad()
def segment_image(detector: nn.Module, image_rgb: np.ndarray,
                  settings: SSCTaskConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image -> its instances' boxes (N, 4) original px, objectness (N,), best first, and their
    (H, W) uint8 label map."""
    tensor, geometry = letterbox(image_rgb, detector.image_size)  # (3, S, S)
    cells, _ = top_cells(detector(tensor[None]), settings.candidates)  # (1, K, 5) input px
    cells = cells[0].numpy().astype(np.float64)
    keep = cells[:, 4] >= settings.min_objectness
    keep[0] = True  # the most object-like cell, always
    boxes = geometry.box_to_original(cells[keep, :4])
    boxes = np.clip(boxes, 0, [geometry.w, geometry.h, geometry.w, geometry.h])
    kept = dedupe(boxes, cells[keep, 4], settings.dedupe_iou)
    boxes, objectness = boxes[kept], cells[keep, 4][kept]
    masks = [grabcut_box(image_rgb, box) for box in boxes]
    # An instance wholly covered by better ones has no pixel left: drop it (S+S+C skips empty masks).
    labels = instance_label_map(masks, image_rgb.shape[:2])
    visible = [k for k in range(len(masks)) if (labels == k + 1).any()]
    return boxes[visible], objectness[visible], instance_label_map([masks[k] for k in visible], labels.shape)


def segment_main(cfg: TrainConfig, settings: SSCTaskConfig, split: str) -> dict[str, Any]:
    if not settings.detector_checkpoint:
        raise ValueError("training config: task.detector_checkpoint is required by segment "
                         "(python -m csref_training.detector)")
    detector, _ = build_detector_from_checkpoint(settings.detector_checkpoint)
    layout, annotations = _annotations(cfg)
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for entry in _split_entries(annotations, split):
        by_image[int(entry["iid"])].append(entry)
    out_dir = Path(settings.stage_dir) / "segment" / split
    record: dict[str, Any] = {}
    for iid, entries in by_image.items():
        image = _read_rgb(layout.image_dir / image_file_name(layout.image_pattern, iid))
        boxes, objectness, labels = segment_image(detector, image, settings)
        for entry in entries:
            write_label_png(out_dir / f"instances_{_referent_id(entry)}.png", labels)
            record[str(_referent_id(entry))] = {"iid": iid, "boxes": np.round(boxes, 2).tolist(),
                                                "objectness": np.round(objectness, 4).tolist()}
    (out_dir.parent / f"{split}.json").write_text(json.dumps(record))
    report = {"split": split, "images": len(by_image), "referents": len(record),
              "instances_per_image": float(np.mean([len(r["boxes"]) for r in record.values()])),
              "out": str(out_dir)}
    print(json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------------------
# Select
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def refclip_instance_scores(cfg: TrainConfig, settings: SSCTaskConfig, split: str,
                            segments: dict[str, Any]) -> dict[str, list[float]]:
    """sent_id -> each instance's RefCLIP score: the dot product of the utterance's projected CSA
    vector with the candidate cell whose box overlaps the instance's box most (the highest-scoring
    speaker where a sentence has several)."""
    if not settings.refclip_checkpoint:
        raise ValueError("training config: task.refclip_checkpoint is required by select --method refclip")
    model, model_cfg = build_refclip_from_checkpoint(settings.refclip_checkpoint)
    dataset = build_srec_dataset(cfg.data, split=split, image_size=model_cfg.detector.image_size, train=False)
    loader = DataLoader(dataset, batch_size=cfg.eval_batch_size, collate_fn=collate_srec,
                        num_workers=cfg.data.num_workers)
    scores: dict[str, list[float]] = {}
    for batch in loader:
        boxes, visual = model.candidates(batch["image"])  # (B, K, 5), (B, K, D)
        speech = model.encode_speech(batch["input_values"], batch["attention_mask"])  # (B, D)
        cell_scores = torch.einsum("bkd,bd->bk", visual, speech).numpy()  # (B, K)
        for i, sent_id in enumerate(batch["sent_id"]):
            if str(sent_id) not in segments:
                continue
            candidates = batch["letterbox"][i].box_to_original(boxes[i, :, :4].numpy())  # (K, 4)
            instances = np.asarray(segments[str(sent_id)]["boxes"], dtype=np.float64)  # (N, 4)
            nearest = box_iou(instances[:, None], candidates[None]).argmax(axis=1)  # (N,)
            instance_scores = cell_scores[i, nearest].tolist()
            if str(sent_id) not in scores or max(instance_scores) > max(scores[str(sent_id)]):
                scores[str(sent_id)] = instance_scores
    return scores


def oracle_scores(entry: dict[str, Any], labels: np.ndarray, root: Path) -> list[float]:
    """The `best` baseline's scores: IoU of each instance with the true mask (entries with a
    "mask_file"), else of each instance mask's box with the true box."""
    count = int(labels.max())
    if "mask_file" in entry:
        truth = read_label_png(root / entry["mask_file"]) == entry["target_index"] + 1
        return [float(np.divide(*mask_counts(labels == k + 1, truth))) for k in range(count)]
    x, y, w, h = entry["bbox"]
    truth_box = np.array([x, y, x + w, y + h], dtype=np.float64)
    boxes = [mask_box(labels == k + 1) for k in range(count)]
    return [0.0 if b is None else float(box_iou(b, truth_box)) for b in boxes]


def select_main(cfg: TrainConfig, settings: SSCTaskConfig, split: str, method: str) -> dict[str, Any]:
    layout, annotations = _annotations(cfg)
    stage_dir = Path(settings.stage_dir)
    out_dir = stage_dir / "select" / method / split
    if method == "truth":
        record = write_true_masks(_split_entries(annotations, split), layout.ann_path.parent.parent, out_dir)
    else:
        record = select_instances(cfg, settings, split, method, _split_entries(annotations, split),
                                  layout.ann_path.parent.parent, out_dir)
    (out_dir.parent / f"{split}.json").write_text(json.dumps(record))
    report = {"split": split, "method": method, "referents": len(record), "out": str(out_dir)}
    print(json.dumps(report, indent=2))
    return report


def select_instances(cfg: TrainConfig, settings: SSCTaskConfig, split: str, method: str,
                     entries: list[dict[str, Any]], root: Path, out_dir: Path) -> dict[str, Any]:
    """One segment-stage instance per referent, by `method`'s scores -> {sent_id: {"instance", "scores"}}."""
    stage_dir = Path(settings.stage_dir)
    segments_path = stage_dir / "segment" / f"{split}.json"
    if not segments_path.is_file():
        raise FileNotFoundError(f"{segments_path} not found; run `python -m csref_training.ssc segment --split {split}` first")
    segments = json.loads(segments_path.read_text())
    learned = refclip_instance_scores(cfg, settings, split, segments) if method == "refclip" else {}
    record: dict[str, Any] = {}
    for entry in entries:
        ref = str(_referent_id(entry))
        if ref not in segments:
            continue
        labels = read_label_png(stage_dir / "segment" / split / f"instances_{ref}.png")
        count = int(labels.max())
        if count == 0:
            continue
        if method == "refclip":
            if ref not in learned:
                continue  # no audio for it
            scores = learned[ref]
        elif method == "first":
            scores = list(segments[ref]["objectness"])
        elif method == "random":
            scores = np.random.default_rng([settings.seed, int(ref)]).random(count).tolist()
        else:
            scores = oracle_scores(entry, labels, root)
        chosen = int(np.argmax(scores[:count]))
        write_label_png(out_dir / f"mask_{ref}.png", (labels == chosen + 1).astype(np.uint8))
        record[ref] = {"instance": chosen, "scores": np.round(scores, 4).tolist()}
    return record


def write_true_masks(entries: list[dict[str, Any]], root: Path, out_dir: Path) -> dict[str, Any]:
    """`truth`: each referent's true mask as its selected mask, for the fully supervised upper
    bound (train masks come from the generator's --train-masks); no segment stage is read."""
    record: dict[str, Any] = {}
    for entry in entries:
        if "mask_file" not in entry:
            raise ValueError(f"select --method truth: the entry of image {entry['iid']} names no mask_file; "
                             "generate the data with --masks --train-masks")
        truth = read_label_png(root / entry["mask_file"]) == entry["target_index"] + 1
        write_label_png(out_dir / f"mask_{_referent_id(entry)}.png", truth.astype(np.uint8))
        record[str(_referent_id(entry))] = {"instance": None, "scores": []}
    return record


# ----------------------------------------------------------------------------------------
# Correct: SREC + mask head on the shared training loop
# ----------------------------------------------------------------------------------------
class SceneReferentsDataset(Dataset):
    """One item per image: the letterboxed image and, per referent (entry) of it, one sentence's
    audio (drawn at random per read, as SREC training does) and its candidate masks: the selected
    one (random_ce) or every instance of the segment stage (greedy_ce)."""

    def __init__(self, cfg: TrainConfig, settings: SSCTaskConfig, split: str, image_size: int) -> None:
        layout, _ = _annotations(cfg)
        entries, _ = load_refcoco_entries(layout.ann_path, split, SpeakerIndex(layout.audio_root, cfg.data.speakers),
                                          layout.box_key, layout.image_dir, layout.image_pattern,
                                          skip_broken=cfg.data.skip_broken, need_box=False)
        stage_dir = Path(settings.stage_dir)
        if settings.loss == "random_ce":
            self.mask_dir, prefix = stage_dir / "select" / settings.select_method / split, "mask"
        else:
            self.mask_dir, prefix = stage_dir / "segment" / split, "instances"
        self.images: dict[int, list[tuple[Any, Path]]] = defaultdict(list)
        for entry in entries:
            path = self.mask_dir / f"{prefix}_{entry.sentences[0][0].sent_id}.png"
            if path.is_file():
                self.images[entry.iid].append((entry, path))
        self.iids = sorted(self.images)
        if not self.iids:
            raise FileNotFoundError(f"no mask files in {self.mask_dir}; run the "
                                    f"{'select' if settings.loss == 'random_ce' else 'segment'} stage on {split!r} first")
        self.image_size = image_size
        self.use_trim, self.max_duration = cfg.data.use_trim, cfg.data.max_duration

    def __len__(self) -> int:
        return len(self.iids)

    def read_waveform(self, path: Path) -> np.ndarray:
        """16 kHz float32 (N,), trimmed and capped as data.use_trim / data.max_duration say."""
        wave = prepare_waveform(*load_audio(path), trim=self.use_trim)
        return wave if self.max_duration is None else wave[:int(self.max_duration * SAMPLE_RATE)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        referents = self.images[self.iids[index]]
        tensor, geometry = letterbox(_read_rgb(referents[0][0].image_path), self.image_size)  # (3, S, S)
        waveforms, referent_ids, candidates = [], [], []
        for entry, mask_path in referents:
            utterances = entry.sentences[np.random.randint(len(entry.sentences))]
            utterance = utterances[np.random.randint(len(utterances))]
            waveforms.append(self.read_waveform(utterance.audio_path))
            referent_ids.append(entry.sentences[0][0].sent_id)
            labels = letterbox_labels(read_label_png(mask_path), geometry)  # (S, S)
            masks = [labels == k + 1 for k in range(int(labels.max()))]
            # Masks too small to survive the letterbox's downscaling teach nothing (S+S+C skips empty ones).
            masks = [m for m in masks if m.any()] or [np.zeros_like(labels, dtype=bool)]
            candidates.append(torch.from_numpy(np.stack(masks)))  # (M, S, S)
        return {"image": tensor, "iid": self.iids[index], "waveforms": waveforms, "referents": referent_ids,
                "candidates": candidates}


def collate_referents(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Unfold images into one sample per referent (S+S+C's unfolding): sample n reads image
    image_index[n]; each image is stored (and encoded) once."""
    image_index, waveforms, referents, iids, candidates = [], [], [], [], []
    for index, item in enumerate(items):
        for waveform, referent, masks in zip(item["waveforms"], item["referents"], item["candidates"]):
            image_index.append(index)
            waveforms.append(waveform)
            referents.append(referent)
            iids.append(item["iid"])
            candidates.append(masks)
    input_values, attention_mask = speech_batch(waveforms)  # (N, L) each
    return {"image": torch.stack([item["image"] for item in items]), "image_index": torch.tensor(image_index),
            "input_values": input_values, "attention_mask": attention_mask, "referent": referents, "iid": iids,
            "candidates": candidates}


def ssc_model_config(cfg: TrainConfig) -> ModelConfig:
    """The SREC config of cfg.model + overrides, with the mask head on."""
    config = build_model_config(cfg)
    config.mask_head.enabled = True
    return config


class SSCCorrectTask:
    name = "ssc"
    best_metric = "miou"
    higher_is_better = True
    model_config = staticmethod(ssc_model_config)
    collate = staticmethod(collate_referents)

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, dist_info: DistInfo) -> None:
        self.cfg, self.model_cfg, self.dist_info = cfg, model_cfg, dist_info
        self.settings = task_settings(cfg)

    def build_model(self) -> nn.Module:
        return build_srec(self.model_cfg)

    def build_dataset(self, split: str, train: bool) -> Dataset:
        if train:
            return SceneReferentsDataset(self.cfg, self.settings, split, self.model_cfg.image_size)
        return MaskEvalDataset(self.cfg, split, self.model_cfg.image_size)

    def initialise(self, model: nn.Module) -> None:
        """The trunk from an SREC checkpoint (a box-only one leaves the fresh mask head), or only its
        backbone from a detector; the speech encoder from a CSA one."""
        if self.cfg.init_checkpoint:
            load_into(model, read_state_dict(self.cfg.init_checkpoint), self.cfg.init_checkpoint,
                      allow_missing=("mask_head.",))
        elif self.settings.visual_encoder_checkpoint:
            prefix, path = "visual_encoder.", self.settings.visual_encoder_checkpoint
            backbone = {k[len(prefix):]: v for k, v in read_state_dict(path).items() if k.startswith(prefix)}
            if not backbone:
                raise ValueError(f"task.visual_encoder_checkpoint {path} has no '{prefix}*' entries "
                                 "(expected a detector checkpoint: python -m csref_training.detector)")
            load_into(model.visual_encoder, backbone, f"{path} ({prefix}*)")
        if self.cfg.init_speech_encoder:
            load_csa_speech_encoder(model, self.cfg.init_speech_encoder)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> torch.Tensor:
        device = self.dist_info.device
        srec = _unwrap(model)
        maps = srec.encode_image_pyramid(batch["image"].to(device))  # per image: s8, s16, s32, s4
        maps = [m[batch["image_index"].to(device)] for m in maps]  # per sample
        speech_feat = srec.encode_speech(batch["input_values"].to(device), batch["attention_mask"].to(device))
        logits = srec.mask_features(maps, speech_feat)  # (N, 2, S/4, S/4)
        size = batch["image"].shape[-1]
        logits = torch.nn.functional.interpolate(logits.float(), size=(size, size), mode="bilinear",
                                                 align_corners=False)  # (N, 2, S, S)
        candidates = [c.to(device) for c in batch["candidates"]]
        if self.settings.loss == "random_ce":
            rng = np.random.default_rng([self.cfg.seed, step])
            chosen = random_assignment([len(c) for c in candidates], batch["referent"], batch["iid"], rng)
        else:
            with torch.no_grad():
                foreground = logits.softmax(dim=1)[:, 1]  # (N, S, S)
                preferences = [torch.stack([pseudo_iou(foreground[i], m.float()) for m in c])
                               for i, c in enumerate(candidates)]
            chosen = greedy_assignment(preferences, batch["referent"], batch["iid"])
        targets = torch.stack([c[k or 0] for c, k in zip(candidates, chosen)])  # (N, S, S)
        active = torch.tensor([k is not None for k in chosen], device=device)  # (N,)
        return class_weighted_ce(logits, targets, active)

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        return evaluate_masks(model, dataset, self.cfg.eval_batch_size, self.dist_info)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------
# Evaluate
# ----------------------------------------------------------------------------------------
class MaskEvalDataset(Dataset):
    """SREC evaluation items (every sentence and speaker) of entries that name a true mask file."""

    def __init__(self, cfg: TrainConfig, split: str, image_size: int) -> None:
        layout, annotations = _annotations(cfg)
        self.root = layout.ann_path.parent.parent
        self.truth = {str(s): (e["mask_file"], int(e["target_index"]))
                      for e in _split_entries(annotations, split) if "mask_file" in e for s in e["sent_ids"]}
        if not self.truth:
            raise ValueError(f"split {split!r} names no mask files; generate it with "
                             "python -m csref_training.spoken_shapes --masks")
        self.base = build_srec_dataset(cfg.data, split=split, image_size=image_size, train=False)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.base[index]

    def true_mask(self, sent_id: int) -> np.ndarray:
        mask_file, target_index = self.truth[str(sent_id)]
        return read_label_png(self.root / mask_file) == target_index + 1


@torch.no_grad()
def evaluate_masks(model: nn.Module, dataset: MaskEvalDataset, batch_size: int, dist_info: DistInfo) -> dict[str, float]:
    """mIoU, oIoU, prec@0.5-0.9 and box Acc@0.5 of `model.segment`'s masks, over the processes."""
    model.eval()
    loader = DataLoader(eval_subset(dataset, dist_info.rank, dist_info.world_size), batch_size=batch_size,
                        collate_fn=collate_srec)
    counts: list[tuple[int, int, bool]] = []
    for batch in loader:
        _, logits = model.segment(batch["image"].to(dist_info.device), batch["input_values"].to(dist_info.device),
                                  batch["attention_mask"].to(dist_info.device))
        for i, sent_id in enumerate(batch["sent_id"]):
            if str(sent_id) not in dataset.truth:
                continue
            predicted = mask_to_original(logits[i], batch["letterbox"][i])
            counts.append((*mask_counts(predicted, dataset.true_mask(sent_id)),
                           box_hit(predicted, batch["gt_xyxy"][i].numpy())))
    sums = metric_sums([c[0] for c in counts], [c[1] for c in counts], [c[2] for c in counts])
    return metrics_from_sums(sum_over_ranks(sums, dist_info.device))


def evaluate_selected(cfg: TrainConfig, settings: SSCTaskConfig, split: str, method: str) -> dict[str, float]:
    """The select stage's masks (Segment+Select zero-shot, or a baseline) against the true masks."""
    layout, annotations = _annotations(cfg)
    root = layout.ann_path.parent.parent
    mask_dir = Path(settings.stage_dir) / "select" / method / split
    counts = []
    for entry in _split_entries(annotations, split):
        path = mask_dir / f"mask_{_referent_id(entry)}.png"
        if "mask_file" not in entry or not path.is_file():
            continue
        predicted = read_label_png(path) == 1
        x, y, w, h = entry["bbox"]
        truth = read_label_png(root / entry["mask_file"]) == entry["target_index"] + 1
        counts.append((*mask_counts(predicted, truth), box_hit(predicted, [x, y, x + w, y + h])))
    if not counts:
        raise ValueError(f"no selected masks in {mask_dir} for entries with true masks; run segment and select "
                         f"--method {method} on {split!r} (generated with --masks)")
    return summarise([c[0] for c in counts], [c[1] for c in counts], [c[2] for c in counts])


def evaluate_main(cfg: TrainConfig, settings: SSCTaskConfig, args: argparse.Namespace) -> dict[str, float]:
    if args.checkpoint is not None:
        model, model_cfg = build_srec_from_checkpoint(args.checkpoint)
        dataset = MaskEvalDataset(cfg, args.split, model_cfg.image_size)
        metrics = evaluate_masks(model, dataset, cfg.eval_batch_size, DistInfo(0, 1, 0, torch.device("cpu")))
    else:
        metrics = evaluate_selected(cfg, settings, args.split, args.select)
    print(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if argv is None else argv
    stages = ("segment", "select", "correct", "evaluate")
    if not argv or argv[0] not in stages:
        raise SystemExit(f"usage: python -m csref_training.ssc {{{','.join(stages)}}} --config YAML ...")
    if argv[0] == "correct":
        return trainer.main(SSCCorrectTask, __doc__.split("\n")[0], argv[1:])
    parser = argparse.ArgumentParser(prog=f"python -m csref_training.ssc {argv[0]}")
    parser.add_argument("--config", required=True, help="the S+S+C training YAML (data and task sections)")
    parser.add_argument("--split", default="train")
    if argv[0] == "select":
        parser.add_argument("--method", choices=SELECT_METHODS, default="refclip")
    if argv[0] == "evaluate":
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--checkpoint", type=Path, help="an SREC checkpoint with a mask head (correct's output)")
        source.add_argument("--select", choices=SELECT_METHODS, help="evaluate the select stage's masks instead")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the YAML, e.g. task.stage_dir=D")
    args = parser.parse_intermixed_args(argv[1:])
    cfg = load_train_config(args.config, args.overrides)
    settings = task_settings(cfg)
    if argv[0] == "segment":
        return segment_main(cfg, settings, args.split)
    if argv[0] == "select":
        return select_main(cfg, settings, args.split, args.method)
    return evaluate_main(cfg, settings, args)


if __name__ == "__main__":
    main()
