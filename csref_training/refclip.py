"""Weakly supervised grounding: train RefCLIP on (image, spoken command) pairs without boxes, then
pseudo-label the training set so that an ordinary SREC can be trained on it.

    python -m csref_training.refclip --config config/train/refclip_spoken_shapes.yaml [key=value ...]
    python -m csref_training.refclip evaluate --config Y --checkpoint runs/refclip/best --split test
    python -m csref_training.refclip pseudo-label --config Y --checkpoint runs/refclip/best --out data/pseudo

The model is `csref_model.refclip`: a frozen class-agnostic detector (`csref_training.detector`)
proposes the 17 most object-like stride-32 cells, a frozen CSA speech encoder gives the
command's aligned vector, and RefCLIP learns only a MultiScaleFusion and two projections with
its anchor-contrastive loss. Training never reads a box: the loss takes the image and the speech
only (`RefCLIPTask.loss`), and a test checks that scrambling the training boxes changes nothing.
Validation Acc@0.5 (IoU > 0.5 on original-image boxes, as the paper) picks `best` where the
validation split has boxes.

Recipe (RefCLIP's refcoco.yaml): Adam 1e-4 (0.9, 0.98), 25 epochs, 3 warmup epochs then cosine,
EMA 0.9997, gradient clipping 0.15. The official train.py calls net.train(), which puts the
frozen detector's BatchNorms back in training mode, so its candidates drift with each batch's
statistics; we keep every fully frozen module in eval mode (`frozen_modules_train_mode: false`),
so the candidates are exactly the detector's; `frozen_modules_train_mode=true` restores the
official behaviour.
"""

import argparse
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from csref_model.boxes import box_iou, cxcywh_to_xyxy
from csref_model.checkpoint import load_csa_speech_encoder, load_into, read_checkpoint_dir, read_config, read_state_dict
from csref_model.config import resolve_config_path
from csref_model.refclip import RefCLIPConfig, RefCLIP, build_refclip_from_checkpoint
from csref_model.typed_yaml import from_dict, merge, read_yaml
from csref_training import trainer
from csref_training.datasets import build_srec_dataset, collate_srec, refcoco_layout
from csref_training.distributed import DistInfo, sum_over_ranks
from csref_training.evaluate import box_metrics, evaluate_srec, predict_boxes
from csref_training.reproducibility import eval_subset
from csref_training.spoken_shapes.grammar import parse_expression
from csref_training.train_config import TrainConfig, load_train_config

logger = logging.getLogger(__name__)


@dataclass
class RefCLIPTaskConfig:
    """The training YAML's `task:` section for RefCLIP."""

    # Our detector checkpoint directory (python -m csref_training.detector): frozen candidates.
    detector_checkpoint: str | None = None
    # CSA checkpoint (our directory or an official .pth): the frozen speech encoder.
    speech_checkpoint: str | None = None
    # What picks `best`: "acc_50" on the validation boxes (the paper), or "val_loss", the RefCLIP
    # loss on the validation pairs, for box-free data (data.boxes=false) where there is no Acc@0.5.
    select_best_by: str = "acc_50"
    # "anchor_contrastive": RefCLIP's weakly supervised loss (no box is read). "supervised_upper_bound":
    # a diagnostic that is not weak supervision: cross-entropy over the image's candidates towards the
    # one of highest IoU with the referent's box. It measures what the frozen detector's maps, the
    # fusion and the speech vector can ground when told the answer (docs/TRAINING.md).
    loss: str = "anchor_contrastive"


def task_settings(cfg: TrainConfig) -> RefCLIPTaskConfig:
    settings = from_dict(RefCLIPTaskConfig, cfg.task, "training config", section="task")
    if settings.select_best_by not in ("acc_50", "val_loss"):
        raise ValueError(f"training config: task.select_best_by must be 'acc_50' or 'val_loss', "
                         f"got {settings.select_best_by!r}")
    if settings.loss not in ("anchor_contrastive", "supervised_upper_bound"):
        raise ValueError(f"training config: task.loss must be 'anchor_contrastive' or 'supervised_upper_bound', "
                         f"got {settings.loss!r}")
    if settings.loss == "supervised_upper_bound" and not cfg.data.boxes:
        raise ValueError("training config: task.loss=supervised_upper_bound reads the referent boxes; "
                         "data.boxes=false has none")
    for name in ("detector_checkpoint", "speech_checkpoint"):
        if not getattr(settings, name):
            raise ValueError(f"training config: task.{name} is required for RefCLIP (a "
                             f"{'detector' if name.startswith('detector') else 'CSA'} checkpoint)")
    return settings


def refclip_model_config(cfg: TrainConfig) -> RefCLIPConfig:
    """`cfg.model` + `cfg.model_overrides`, with the detector and speech-encoder configs stored in the
    checkpoints the task section names (when they are our directories), so shapes always match."""
    settings = task_settings(cfg)
    tree = merge(read_yaml(resolve_config_path(cfg.model), "RefCLIP model config"), cfg.model_overrides)
    tree["detector"] = read_checkpoint_dir(settings.detector_checkpoint)[1]
    if Path(settings.speech_checkpoint).is_dir():
        tree["speech_encoder"] = read_config(settings.speech_checkpoint).to_dict()["speech_encoder"]
    tree.setdefault("speech_encoder", {})["layer_fusion"] = False  # CSA's aligned vector
    return RefCLIPConfig.from_dict(tree, source=f"{cfg.model} + model_overrides + task checkpoints")


class RefCLIPTask:
    name = "refclip"
    best_metric = "acc_50"
    higher_is_better = True
    model_config = staticmethod(refclip_model_config)
    collate = staticmethod(collate_srec)

    def __init__(self, cfg: TrainConfig, model_cfg: RefCLIPConfig, dist_info: DistInfo) -> None:
        self.cfg, self.model_cfg, self.dist_info = cfg, model_cfg, dist_info
        self.settings = task_settings(cfg)
        if self.settings.select_best_by == "acc_50" and not cfg.data.boxes:
            raise ValueError("training config: data.boxes=false gives no Acc@0.5 to select `best` by; "
                             "set task.select_best_by=val_loss")
        if self.settings.loss == "supervised_upper_bound" and dist_info.world_size > 1:
            raise ValueError("task.loss=supervised_upper_bound is a single-process diagnostic; run it without torchrun")
        self.best_metric = self.settings.select_best_by
        self.higher_is_better = self.settings.select_best_by == "acc_50"

    def build_model(self) -> nn.Module:
        return RefCLIP(self.model_cfg)

    def build_dataset(self, split: str, train: bool) -> Dataset:
        return build_srec_dataset(self.cfg.data, split=split, image_size=self.model_cfg.detector.image_size,
                                  train=train, augment=self.cfg.augment)

    def initialise(self, model: nn.Module) -> None:
        """The frozen detector and the frozen CSA speech encoder from their checkpoints, strictly."""
        load_into(model.detector, read_state_dict(self.settings.detector_checkpoint), self.settings.detector_checkpoint)
        load_csa_speech_encoder(model, self.settings.speech_checkpoint)
        logger.info("detector from %s, speech encoder from %s", self.settings.detector_checkpoint,
                    self.settings.speech_checkpoint)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> torch.Tensor:
        device = self.dist_info.device
        image = batch["image"].to(device, non_blocking=True)
        input_values = batch["input_values"].to(device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(device, non_blocking=True)
        if self.settings.loss == "supervised_upper_bound":
            return supervised_candidate_loss(model, image, input_values, attention_mask, batch["label"].to(device))
        # Image and speech only: weak supervision never reads batch["label"] or batch["gt_xyxy"].
        return model(image, input_values, attention_mask, return_loss=True)

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """The RefCLIP loss on the validation pairs, and Acc@0.5 where the split has boxes."""
        metrics = {"val_loss": contrastive_val_loss(model, dataset, self.cfg.eval_batch_size, self.dist_info)}
        if self.cfg.data.boxes:
            metrics.update(evaluate_srec(model, dataset, self.cfg.eval_batch_size, self.dist_info.device,
                                         self.dist_info.rank, self.dist_info.world_size,
                                         num_workers=self.cfg.data.num_workers))
        return metrics


def supervised_candidate_loss(model: nn.Module, image: torch.Tensor, input_values: torch.Tensor,
                              attention_mask: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The diagnostic upper bound: cross-entropy over each image's candidates (its own only) towards
    the candidate of highest IoU with the referent. label: (B, 4) cx, cy, w, h over the input side."""
    boxes, scores = model.score_candidates(image, input_values, attention_mask)  # (B, K, 5) input px, (B, K)
    target_xyxy = cxcywh_to_xyxy(label) * image.shape[-1]  # (B, 4) input px
    target = box_iou(boxes[..., :4], target_xyxy[:, None, :]).argmax(dim=1)  # (B,)
    return F.cross_entropy(scores, target)


@torch.no_grad()
def contrastive_val_loss(model: nn.Module, dataset: Dataset, batch_size: int, dist_info: DistInfo) -> float:
    """The training loss over the validation pairs in batches of `batch_size` (a batch of one has no
    negatives and is left out), averaged per pair over the processes."""
    model.eval()
    loader = DataLoader(eval_subset(dataset, dist_info.rank, dist_info.world_size), batch_size=batch_size,
                        collate_fn=collate_srec)
    loss_sum, pairs = 0.0, 0
    for batch in loader:
        if len(batch["sent_id"]) < 2:
            continue
        device = dist_info.device
        loss = model(batch["image"].to(device), batch["input_values"].to(device), batch["attention_mask"].to(device),
                     return_loss=True)
        loss_sum, pairs = loss_sum + float(loss) * len(batch["sent_id"]), pairs + len(batch["sent_id"])
    loss_sum, pairs = sum_over_ranks([loss_sum, pairs], dist_info.device)
    if pairs == 0:
        raise ValueError("the validation split needs at least 2 pairs for the RefCLIP loss")
    return loss_sum / pairs


# ----------------------------------------------------------------------------------------
# Evaluation by kind of expression, and pseudo-labels
# ----------------------------------------------------------------------------------------
def expression_kind(sentence: str) -> str:
    """The attributes a Spoken Shapes command names besides its shape ("colour+place", "shape only")."""
    try:
        expression = parse_expression(sentence)
    except ValueError:
        return "other"
    named = [name for name, value in (("colour", expression.colour), ("size", expression.size),
                                      ("place", expression.horizontal or expression.vertical)) if value]
    return "+".join(named) or "shape only"


def chance_level(entries: list[dict[str, Any]]) -> float | None:
    """Mean of 1 / (objects in the image) over a split's annotation entries; None without object lists."""
    if not entries or any("objects" not in entry for entry in entries):
        return None
    return float(np.mean([1.0 / len(entry["objects"]) for entry in entries]))


def shape_colour_oracle(entries: list[dict[str, Any]]) -> dict[int, float]:
    """Per sentence id of a Spoken Shapes split's annotation entries: the Acc@0.5 expected of a model that grounds every
    shape and colour word exactly and picks at random among the objects sharing those.

    It is what (image, command) pairs of the shortest commands can teach. Such a command names a
    size or place only when an object of the same shape (and colour, if named) of the other size or
    place is in the scene: every image "the small circle" is said about also holds a big circle,
    and every image of "the big circle" a small one, so no pair tells which of the two the word
    means. A colour, by contrast, is always in its images while the distractors' colours vary.
    Training commands that name more than they need (`--overspecify-prob`) break that symmetry.
    Empty without object lists.
    """
    oracle: dict[int, float] = {}
    for entry in entries:
        if "objects" not in entry:
            return {}
        target = entry["objects"][entry["target_index"]]
        for ref in entry["refs"]:
            colour_named = parse_expression(ref["sent"]).colour is not None
            sharing = [obj for obj in entry["objects"] if obj["shape"] == target["shape"]
                       and (not colour_named or obj["colour"] == target["colour"])]
            oracle[ref["sent_id"]] = 1.0 / len(sharing)
    return oracle


def predict(checkpoint: Path, cfg: TrainConfig, split: str) -> list[dict[str, Any]]:
    """One record per utterance of `split` (csref_training.evaluate.predict_boxes)."""
    model, model_cfg = build_refclip_from_checkpoint(checkpoint)
    dataset = build_srec_dataset(cfg.data, split=split, image_size=model_cfg.detector.image_size, train=False)
    return predict_boxes(model, dataset, cfg.eval_batch_size, torch.device("cpu"), num_workers=cfg.data.num_workers)


def evaluate_main(args: argparse.Namespace, cfg: TrainConfig) -> dict[str, Any]:
    records = [r for r in predict(args.checkpoint, cfg, args.split) if not np.isnan(r["iou"])]
    metrics = box_metrics(records, torch.device("cpu"))
    layout = refcoco_layout(cfg.data.dataset, cfg.data.root, cfg.data.ann_path, cfg.data.image_dir,
                            cfg.data.audio_root, cfg.data.image_pattern)
    entries = json.loads(layout.ann_path.read_text())[args.split]
    oracle = shape_colour_oracle(entries)
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_kind[expression_kind(record["sentence"])].append(record)

    def mean_oracle(kind_records: list[dict[str, Any]]) -> float | None:
        return float(np.mean([oracle[r["sent_id"]] for r in kind_records])) if oracle else None

    by_kind_rows = {}
    for kind, kind_records in sorted(by_kind.items()):
        row = {"count": len(kind_records), "acc_50": float(np.mean([r["iou"] > 0.5 for r in kind_records]))}
        by_kind_rows[kind] = {**row, "shape_colour_oracle": mean_oracle(kind_records)} if oracle else row
    result = {**metrics, "chance_acc_50": chance_level(entries), "shape_colour_oracle_acc_50": mean_oracle(records),
              "acc_50_by_kind": by_kind_rows}
    print(json.dumps(result, indent=2))
    return result


def hit_rate(hits: list[bool | None]) -> float | None:
    """The fraction of True among the labels that have a truth (None where none has)."""
    known = [hit for hit in hits if hit is not None]
    return float(np.mean(known)) if known else None


def pseudo_label_main(args: argparse.Namespace, cfg: TrainConfig) -> dict[str, Any]:
    """Write <out>/anns/<dataset>.json: the chosen splits' boxes replaced by RefCLIP's predictions
    (one entry per sentence, marked "pseudo" with the score), the other splits copied unchanged.
    With --keep-fraction F < 1 only the F most confident labels of each split are written."""
    layout = refcoco_layout(cfg.data.dataset, cfg.data.root, cfg.data.ann_path, cfg.data.image_dir,
                            cfg.data.audio_root, cfg.data.image_pattern)
    annotations = json.loads(layout.ann_path.read_text())
    report: dict[str, Any] = {}
    for split in args.splits.split(","):
        records = predict(args.checkpoint, cfg, split)
        best: dict[int, dict[str, Any]] = {}  # sent_id -> the highest-scoring speaker's prediction
        for record in records:
            if record["sent_id"] not in best or record["score"] > best[record["sent_id"]]["score"]:
                best[record["sent_id"]] = record
        pseudo_entries, hits, unusable = [], [], 0
        for entry in annotations[split]:
            for ref in entry["refs"]:
                if ref["sent_id"] not in best:
                    continue  # no audio for it: nothing to learn from
                record = best[ref["sent_id"]]
                # Predictions are not clipped (as the reference's); a label must lie in the image.
                width, height = record["image_wh"]
                x1, y1, x2, y2 = np.clip(record["pred_xyxy"], 0, [width, height, width, height]).tolist()
                if x2 - x1 < 1 or y2 - y1 < 1:
                    unusable += 1
                    continue
                hit = None  # no truth for box-free pairs
                if "bbox" in entry:
                    truth = np.array(entry["bbox"], dtype=np.float64)
                    truth[2:] += truth[:2]
                    hit = float(box_iou(np.array([x1, y1, x2, y2]), truth)) > 0.5
                hits.append(hit)
                # Only what a box-free user has: the image, the sentence and the prediction.
                pseudo_entries.append({"iid": entry["iid"], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                       "sent_ids": [ref["sent_id"]], "refs": [ref], "pseudo": True,
                                       "pseudo_score": record["score"]})
        kept = np.argsort([-e["pseudo_score"] for e in pseudo_entries], kind="stable")
        kept = np.sort(kept[:int(np.ceil(args.keep_fraction * len(pseudo_entries)))])
        annotations[split] = [pseudo_entries[i] for i in kept]
        report[split] = {"entries": len(kept), "dropped_as_least_confident": len(pseudo_entries) - len(kept),
                         "outside_the_image": unusable,
                         "pseudo_label_acc_50": hit_rate([hits[i] for i in kept]),
                         "pseudo_label_acc_50_before_dropping": hit_rate(hits)}
    out_ann = Path(args.out) / "anns" / f"{cfg.data.dataset}.json"
    out_ann.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_ann.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(annotations))
    tmp.replace(out_ann)
    report["ann_path"] = str(out_ann)
    report["train_srec_with"] = (f"python -m csref_training.srec --config config/train/srec_spoken_shapes.yaml "
                                 f"data.ann_path={out_ann} data.image_dir={layout.image_dir} "
                                 f"data.audio_root={layout.audio_root}")
    print(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("evaluate", "pseudo-label"):
        return trainer.main(RefCLIPTask, __doc__.split("\n")[0], argv)
    parser = argparse.ArgumentParser(prog=f"python -m csref_training.refclip {argv[0]}")
    parser.add_argument("--config", required=True, help="the RefCLIP training YAML (its data section)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="a RefCLIP checkpoint directory")
    if argv[0] == "evaluate":
        parser.add_argument("--split", default="test")
    else:
        parser.add_argument("--splits", default="train,val",
                            help="splits whose boxes are replaced (default train,val: no truth is used for "
                                 "training or model selection); the others are copied unchanged")
        parser.add_argument("--out", required=True, type=Path, help="directory for anns/<dataset>.json")
        parser.add_argument("--keep-fraction", type=float, default=1.0,
                            help="write only this fraction of each split's labels, those RefCLIP is surest of "
                                 "(highest margin); default 1.0 keeps all, as the paper (our extension)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the training YAML, e.g. data.root=D")
    args = parser.parse_intermixed_args(argv[1:])
    if argv[0] == "pseudo-label" and not 0.0 < args.keep_fraction <= 1.0:
        parser.error(f"--keep-fraction {args.keep_fraction}: must be in (0, 1], e.g. 0.5 keeps the surer half")
    cfg = load_train_config(args.config, args.overrides)
    return evaluate_main(args, cfg) if argv[0] == "evaluate" else pseudo_label_main(args, cfg)


if __name__ == "__main__":
    main()
