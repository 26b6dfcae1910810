"""Offline evaluation of SREC and CSA checkpoints (official `.pth` or our directories).

    python -m csref_training.evaluate --config config/train/srec_refcoco_speech.yaml \\
        --checkpoint data/weights/csref_refcoco_speech.pth --splits val,testA,testB --json out.json
    python -m csref_training.evaluate --checkpoint models/spoken_shapes_tiny \\
        --data-root data/spoken_shapes --dataset spoken_shapes --splits test

A checkpoint directory of ours holds its model config, so `--config` is optional: without it the
data options take their defaults (`TrainConfig`) and the flags.

SREC: Acc@0.5 exactly as the reference (IoU > 0.5, strictly, between the predicted and the
ground-truth box in original-image x1,y1,x2,y2 pixels, no clipping), plus Acc@0.75 and the mean
IoU, per split. Batches of `--batch-size` (8, as the reference) in dataset order: wav2vec2's
first GroupNorm normalises over the padded batch, so results depend slightly on batch
composition (docs/REFERENCE_FACTS.md §14.14). JSON: {"splits": {split: {count, acc_50, acc_75, mean_iou}}}.

CSA (the checkpoint holds `text_encoder.*`): mean contrastive loss over batches, and
speech->text / text->speech retrieval R@1/5/10 over the whole split. Identical sentences count
as the same text: speech->text is a hit when a top-k text has the utterance's sentence,
text->speech when a top-k utterance says the text.

`--precision bf16|fp16` runs the forward under autocast, as the CUDA backend does, to check that
reduced precision keeps Acc@0.5 (the JSON records the precision).

With torchrun each process evaluates every world_size-th sample and the counts are summed, so
multi-process numbers equal single-process ones up to batch composition (the reference
averages per-rank accuracies of a padded sampler instead, §11).
"""

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from csref_model.boxes import box_iou
from csref_model.checkpoint import load_into, read_config, read_state_dict
from csref_model.csa import build_csa
from csref_model.srec import build_srec
from csref_model.text_encoder import load_tokenizer
from csref_model.visualize import PREDICTION_COLOUR, TARGET_COLOUR, DrawnBox, draw_boxes, save_picture
from csref_model.detector import top_cells
from csref_training.datasets import build_csa_dataset, build_srec_dataset, collate_csa, collate_detector, collate_srec
from csref_training.distributed import cleanup_distributed, setup_distributed, sum_over_ranks
from csref_training.optim import autocast_context
from csref_training.reporting import format_metrics
from csref_training.reproducibility import eval_subset
from csref_training.train_config import build_model_config, load_train_config

logger = logging.getLogger("csref_training.evaluate")

RECALL_AT = (1, 5, 10)
# Small test images are enlarged so that the IoU tag and the caption stay legible.
VIS_MIN_WIDTH = 480


def score_boxes(pred_xyxy: np.ndarray, gt_xyxy: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """IoU of matching rows of (N, 4) x1,y1,x2,y2 boxes and the sums evaluate_srec adds up.

    A hit is IoU > threshold, strictly: IoU exactly 0.5 is a miss, as in the reference.
    """
    iou = box_iou(pred_xyxy, gt_xyxy)  # (N,)
    return iou, {"count": len(iou), "hits_50": int((iou > 0.5).sum()), "hits_75": int((iou > 0.75).sum()),
                 "iou_sum": float(iou.sum())}


@torch.no_grad()
def predict_boxes(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    vis_dir: Path | None = None,
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """The box `model` (put in eval mode) chooses for each of this process's items of `dataset`.

    `model(image, input_values, attention_mask)` returns (B, 5) boxes in letterboxed-input pixels
    (SREC, RefCLIP). One record per item: {"sent_id", "sentence", "speaker", "iid", "score",
    "pred_xyxy" and "image_wh" (original pixels), "iou" (NaN where the item has no box)}.
    """
    model.eval()
    loader = DataLoader(eval_subset(dataset, rank, world_size), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate_srec)
    records = []
    for batch in tqdm(loader, desc="eval", disable=not show_progress, dynamic_ncols=True):
        pred = model(batch["image"].to(device), batch["input_values"].to(device), batch["attention_mask"].to(device))
        pred = pred.float().cpu().numpy()  # (B, 5) x1, y1, x2, y2, score in letterboxed-input pixels
        pred_original = np.stack([lb.box_to_original(p[:4]) for lb, p in zip(batch["letterbox"], pred)])
        gt = batch["gt_xyxy"].numpy().astype(np.float64)  # (B, 4) original pixels, NaN rows: no box
        boxed = ~np.isnan(gt).any(axis=1)
        iou = np.full(len(gt), np.nan)  # (B,)
        iou[boxed] = score_boxes(pred_original[boxed], gt[boxed])[0]
        records.extend({"sent_id": batch["sent_id"][i], "sentence": batch["sentence"][i],
                        "speaker": batch["speaker"][i], "iid": batch["iid"][i], "iou": float(iou[i]),
                        "score": float(pred[i, 4]), "pred_xyxy": pred_original[i].tolist(),
                        "image_wh": (batch["letterbox"][i].w, batch["letterbox"][i].h)}
                       for i in range(len(iou)))
        if vis_dir is not None:
            save_visualisations(vis_dir, batch, pred_original, iou)
    return records


def evaluate_srec(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    vis_dir: Path | None = None,
    show_progress: bool = False,
) -> dict[str, float]:
    """Acc@0.5, Acc@0.75 and mean IoU of `model` on the items of `dataset` that have a box."""
    records = predict_boxes(model, dataset, batch_size, device, rank, world_size, num_workers, vis_dir,
                            show_progress)
    return box_metrics(records, device)


def box_metrics(records: list[dict[str, Any]], device: torch.device) -> dict[str, float]:
    """Acc@0.5, Acc@0.75 and mean IoU over the `predict_boxes` records that have a box, summed over ranks."""
    iou = np.array([r["iou"] for r in records if not np.isnan(r["iou"])])
    sums = [len(iou), int((iou > 0.5).sum()), int((iou > 0.75).sum()), float(iou.sum())]
    count, hits_50, hits_75, iou_sum = sum_over_ranks(sums, device)
    if count == 0:
        raise ValueError("the evaluation split is empty or has no boxes (data.boxes=false data gives no Acc@0.5)")
    return {"count": int(count), "acc_50": hits_50 / count, "acc_75": hits_75 / count, "mean_iou": iou_sum / count}


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    dataset: Dataset,
    candidates: int,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> dict[str, float]:
    """Candidate recall of a class-agnostic detector: the fraction of objects that one of the image's
    `candidates` highest-objectness cells covers with IoU > 0.5 (original-image pixels), and the
    mean best IoU per object. This is what weakly supervised grounding can at best choose from."""
    model.eval()
    loader = DataLoader(eval_subset(dataset, rank, world_size), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate_detector)
    objects, covered, best_iou_sum, images = 0, 0, 0.0, 0
    for batch in loader:
        top, _ = top_cells(model(batch["image"].to(device)).float(), candidates)  # (B, k, 5) input px
        for boxes, geometry, gt in zip(top.cpu().numpy(), batch["letterbox"], batch["gt_xyxy"]):
            iou = box_iou(gt[:, None, :], geometry.box_to_original(boxes[:, :4])[None])  # (M, k)
            best = iou.max(axis=1)  # (M,)
            objects += len(best)
            covered += int((best > 0.5).sum())
            best_iou_sum += float(best.sum())
            images += 1
    objects, covered, best_iou_sum, images = sum_over_ranks([objects, covered, best_iou_sum, images], device)
    if objects == 0:
        raise ValueError("the evaluation split has no objects")
    return {"images": int(images), "objects": int(objects), "recall_50": covered / objects,
            "mean_best_iou": best_iou_sum / objects}


def save_visualisations(vis_dir: Path, batch: dict[str, Any], pred: np.ndarray, iou: np.ndarray) -> None:
    """Original image with the ground truth (dashed) and the prediction (solid, IoU in its tag),
    the sentence as caption: `<sent_id>_ok.jpg` (IoU > 0.5) or `<sent_id>_miss.jpg`."""
    vis_dir.mkdir(parents=True, exist_ok=True)
    for i, image_path in enumerate(batch["image_path"]):
        if np.isnan(iou[i]):
            continue  # no box to compare with (box-free data)
        if image_path is None:
            logger.warning("--save-vis needs image files; this dataset (Hugging Face variant) has none")
            return
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"cannot read {image_path} for --save-vis")
        boxes = [DrawnBox(tuple(batch["gt_xyxy"][i].tolist()), TARGET_COLOUR, dashed=True),
                 DrawnBox(tuple(pred[i].tolist()), PREDICTION_COLOUR, label=f"IoU {iou[i]:.2f}")]
        picture = draw_boxes(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), boxes, caption=[str(batch["sentence"][i])],
                             min_width=VIS_MIN_WIDTH)
        save_picture(picture, str(vis_dir / f"{batch['sent_id'][i]}_{'ok' if iou[i] > 0.5 else 'miss'}.jpg"))


def _recall(similarity: torch.Tensor, query_keys: list[str], item_keys: list[str]) -> dict[int, float]:
    """R@k: fraction of queries whose top-k items include one with the same key."""
    k_max = min(max(RECALL_AT), similarity.shape[1])
    top = similarity.topk(k_max, dim=1).indices  # (Q, k_max)
    hits = {k: 0 for k in RECALL_AT}
    for q, row in enumerate(top.tolist()):
        matches = [item_keys[i] == query_keys[q] for i in row]
        for k in RECALL_AT:
            hits[k] += any(matches[:k])
    return {k: hits[k] / len(query_keys) for k in RECALL_AT}


@torch.no_grad()
def evaluate_csa(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: Any,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    show_progress: bool = False,
) -> dict[str, float]:
    """Mean contrastive loss per batch and speech<->text retrieval recall over the split."""
    model.eval()
    loader = DataLoader(eval_subset(dataset, rank, world_size), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate_csa)
    loss_sum, batches = 0.0, 0
    speech_feats, text_feats, sentences = [], [], []
    for batch in tqdm(loader, desc="eval", disable=not show_progress, dynamic_ncols=True):
        tokens = tokenizer(batch["text"], padding=True, truncation=True, return_tensors="pt")
        input_values = batch["input_values"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        text_ids, text_mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        if len(batch["text"]) > 1:
            loss_sum += model(input_values, attention_mask, text_ids, text_mask).item()
            batches += 1
        speech_feats.append(nn.functional.normalize(model.encode_speech(input_values, attention_mask).float(), dim=-1).cpu())
        text_feats.append(nn.functional.normalize(model.encode_text(text_ids, text_mask).float(), dim=-1).cpu())
        sentences.extend(batch["text"])
    speech, text = torch.cat(speech_feats), torch.cat(text_feats)  # (N, D) each
    loss_sum, batches = sum_over_ranks([loss_sum, batches], device)
    if dist.is_initialized():
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, (speech, text, sentences))
        speech = torch.cat([g[0] for g in gathered])
        text = torch.cat([g[1] for g in gathered])
        sentences = [s for g in gathered for s in g[2]]
    if not sentences:
        raise ValueError("the evaluation split is empty")
    keys = [s.strip().lower() for s in sentences]
    unique_texts = sorted(set(keys))
    first_of = {key: keys.index(key) for key in unique_texts}
    unique_text_feats = text[[first_of[key] for key in unique_texts]]  # (U, D)
    speech_to_text = _recall(speech @ unique_text_feats.T, keys, unique_texts)
    text_to_speech = _recall(unique_text_feats @ speech.T, unique_texts, keys)
    metrics: dict[str, float] = {"count": len(keys), "loss": loss_sum / max(batches, 1)}
    metrics.update({f"speech_to_text_r{k}": v for k, v in speech_to_text.items()})
    metrics.update({f"text_to_speech_r{k}": v for k, v in text_to_speech.items()})
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Evaluate an SREC or CSA checkpoint on dataset splits.")
    parser.add_argument("--config", help="training YAML naming the model and the data; without it every key "
                                         "takes its default and the flags below set the data")
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="our checkpoint directory (it holds its model config) or an official .pth "
                             "(its model is the config's `model`, by default the paper's `base`)")
    parser.add_argument("--data-root", help="set data.root")
    parser.add_argument("--dataset", help="set data.dataset (e.g. refcoco+_speech, spoken_shapes)")
    parser.add_argument("--image-pattern", help="set data.image_pattern (e.g. 'COCO_train2014_%%012d.jpg', '{iid}.png')")
    parser.add_argument("--splits", default=None, help="comma-separated splits (default: data.val_split)")
    parser.add_argument("--speakers", help="comma-separated speaker directories (default: every one present)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: eval_batch_size of the config")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--save-vis", type=Path, help="SREC: write images with GT/predicted boxes here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="run the forward under autocast in this precision, as the CUDA backend does; "
                             "compare its Acc@0.5 with fp32 before deploying reduced precision")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, as for the trainers")
    args = parser.parse_intermixed_args(argv)
    try:
        return evaluate_checkpoint(args)
    except (FileNotFoundError, ValueError) as err:  # a missing or malformed config, checkpoint or dataset
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """main() after parsing: the metrics of args.checkpoint on each split, written to args.json."""
    cfg = load_train_config(args.config, args.overrides)
    # Set after the YAML so that they win over it; plain strings, not parsed as YAML.
    if args.data_root:
        cfg.data.root = args.data_root
    if args.dataset:
        cfg.data.dataset = args.dataset
    if args.image_pattern:
        cfg.data.image_pattern = args.image_pattern
    if args.speakers:
        cfg.data.speakers = [s.strip() for s in args.speakers.split(",") if s.strip()]
    dist_info = setup_distributed()
    device = dist_info.device if dist_info.world_size > 1 else torch.device(args.device)
    logging.basicConfig(level=logging.INFO if dist_info.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    batch_size = args.batch_size or cfg.eval_batch_size
    num_workers = cfg.data.num_workers if args.num_workers is None else args.num_workers
    splits = [s.strip() for s in (args.splits or cfg.data.val_split).split(",") if s.strip()]

    # Our checkpoint directories carry their model config; official files use the training config's.
    model_cfg = read_config(args.checkpoint) if args.checkpoint.is_dir() else build_model_config(cfg)
    state_dict = read_state_dict(args.checkpoint)
    is_csa = any(key.startswith("text_encoder.") for key in state_dict)
    results: dict[str, Any] = {"checkpoint": str(args.checkpoint), "config": args.config,
                               "model": "csa" if is_csa else "srec", "precision": args.precision, "splits": {}}
    if is_csa:
        model = build_csa(model_cfg, load_pretrained=False)
        tokenizer = load_tokenizer(model_cfg.text_encoder)
    else:
        model = build_srec(model_cfg, load_pretrained=False)
    load_into(model, state_dict, str(args.checkpoint))
    model.to(device).eval()

    autocast = autocast_context("off" if args.precision == "fp32" else args.precision, device)
    for split in splits:
        with autocast:
            if is_csa:
                dataset = build_csa_dataset(cfg.data, split=split, train=False)
                metrics = evaluate_csa(model, dataset, tokenizer, batch_size, device, dist_info.rank,
                                       dist_info.world_size, num_workers, show_progress=dist_info.is_main)
            else:
                dataset = build_srec_dataset(cfg.data, split=split, image_size=model_cfg.image_size, train=False)
                vis_dir = args.save_vis / split if args.save_vis and dist_info.is_main else None
                metrics = evaluate_srec(model, dataset, batch_size, device, dist_info.rank, dist_info.world_size,
                                        num_workers, vis_dir=vis_dir, show_progress=dist_info.is_main)
        results["splits"][split] = metrics
        if dist_info.is_main:
            print(f"{split}: {format_metrics(metrics)}")
    if dist_info.is_main and args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    cleanup_distributed()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
