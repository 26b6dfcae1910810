"""Visually grounded speech: train ResDAVEnet-VQ on (image, spoken caption) pairs, measure
speech<->image retrieval and the discrete units its VQ layers learn.

    python -m csref_training.davenet --config config/train/davenet_spoken_shapes.yaml [key=value ...]
    python -m csref_training.davenet evaluate --config Y --checkpoint runs/davenet/best --split test [--subset-pairs 300]
        [--max-pairs N]
    python -m csref_training.davenet units --checkpoint runs/davenet/best audio.wav [--layer 3] [--dedup]

The model is `csref_model.davenet`. Data: Spoken Shapes generated with `--captions` (each entry's
"caption", audio in audios/<dataset>_captions/, word alignments; one pair per image, however many
referents the scene has, and every referring expression a query) with `data.format: refcoco`, or
Places Audio Captions with `data.format: places` (`<data.root>/<split>.json` holding
{"image_base_path", "audio_base_path", "data": [{"image", "wav", ...}]}, base paths replaced by
`data.image_dir` / `data.audio_root` when given).

The staged VQ schedule ({} -> {3} -> {2,3}, the paper's best) is a chain of runs: each sets
`model_overrides.speech.vq_layers` and starts from the previous run's checkpoint with
`task.warm_start`, whose active VQ layers must be a subset of the new ones; only the new
codebooks start fresh. Validation reports R@1/5/10 in both directions over the split's pairs
with their chance (`best` is picked by the mean of the two R@10, as the official code); on
Spoken Shapes the semantic R@1 of the spoken referring expressions (`semantic_recall`: the best
image holds a referent) with its chance; and per active VQ layer
the codebook perplexity, the fraction of entries used, and the word-detection F1 of its codes
against the generator's word alignments (`word_detection`).
"""

import argparse
import dataclasses
import functools
import json
import logging
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from csref_model.audio import load_audio, load_audio_16k
from csref_model.checkpoint import load_into, read_checkpoint_dir
from csref_model.cli.ground import read_image_rgb
from csref_model.davenet import (
    Davenet,
    DavenetConfig,
    SpeechOutput,
    build_davenet,
    build_davenet_from_checkpoint,
    image_batch,
    load_davenet_config,
    log_mel,
    pad_features,
    speech_units,
)
from csref_model.typed_yaml import from_dict, merge
from csref_training import trainer
from csref_training.datasets import image_file_name, refcoco_layout
from csref_training.distributed import DistInfo
from csref_training.spoken_shapes.generate import caption_dataset_name
from csref_training.spoken_shapes.grammar import Expression, SceneObject, parse_expression, referents
from csref_training.train_config import DataConfig, TrainConfig, load_train_config

logger = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)


@dataclass
class DavenetTaskConfig:
    """The training YAML's `task:` section for ResDAVEnet-VQ."""

    # Checkpoint directory of the previous stage of the VQ schedule (fewer VQ layers); null = from scratch.
    warm_start: str | None = None
    # A code segment counts for the words within this many seconds of its centre (the official 0.04).
    code_window_s: float = 0.04
    # Words left out of the word-detection report (they carry no scene content).
    stop_words: list[str] = field(default_factory=lambda: ["a", "and", "the"])
    # Also train on the split's spoken referring expressions, each paired with the scene it was said
    # about (Spoken Shapes). Off in the paper's setup (captions only); a robot's queries are
    # commands about one object, which captions of whole scenes do not teach to rank. A scene the
    # command also fits (or the same scene) is then never its impostor: the semi-hard term would
    # otherwise push down exactly the scenes semantic retrieval should rank high.
    train_on_commands: bool = False


def davenet_model_config(cfg: TrainConfig) -> DavenetConfig:
    """`cfg.model` ("davenet_tiny", "davenet_base" or a YAML path) with `cfg.model_overrides` merged in."""
    model_cfg = load_davenet_config(cfg.model)
    if not cfg.model_overrides:
        return model_cfg
    return DavenetConfig.from_dict(merge(model_cfg.to_dict(), cfg.model_overrides),
                                   source=f"{cfg.model} + model_overrides")


# ----------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class CaptionPair:
    image_path: Path
    audio_path: Path
    # (word, start s, end s) of the caption, when the data has alignments.
    words: tuple[tuple[str, float, float], ...] | None = None
    # Every object of the scene (Spoken Shapes), for semantic retrieval.
    objects: tuple[SceneObject, ...] | None = None
    # The referring expression spoken, when the utterance is a command rather than a caption.
    expression: Expression | None = None


@dataclass(frozen=True)
class ExpressionQuery:
    """A spoken referring expression (a Spoken Shapes ref) used as a retrieval query: a retrieved
    scene is a semantic hit when the expression has a referent in it."""
    audio_path: Path
    expression: Expression
    # The scene it was said about: an index into the split's caption pairs.
    pair_index: int


@dataclass
class CaptionSplit:
    pairs: list[CaptionPair]
    # Empty for data without referring expressions (Places).
    queries: list[ExpressionQuery]


def scene_objects(entry: dict[str, Any]) -> tuple[SceneObject, ...]:
    """An annotation entry's objects ([x, y, w, h] boxes) as grammar.SceneObjects (x0, y0, x1, y1)."""
    return tuple(SceneObject(o["shape"], o["colour"], o["size"],
                             (o["bbox"][0], o["bbox"][1], o["bbox"][0] + o["bbox"][2], o["bbox"][1] + o["bbox"][3]))
                 for o in entry["objects"])


def read_caption_split(data: DataConfig, split: str) -> CaptionSplit:
    """The (image, caption) pairs of `split`, one per image, and its referring expressions as
    queries (see the module docstring for the two formats)."""
    if data.format == "refcoco":
        layout = refcoco_layout(data.dataset, data.root, data.ann_path, data.image_dir, None, data.image_pattern)
        audio_root = Path(data.audio_root) if data.audio_root else \
            layout.audio_root.parent / caption_dataset_name(data.dataset)
        entries = json.loads(layout.ann_path.read_text())[split]
        missing = [entry["iid"] for entry in entries if "caption" not in entry]
        if missing:
            raise ValueError(f"{layout.ann_path} [{split}]: {len(missing)} entries have no scene caption (iid "
                             f"{missing[0]}, ...); generate the data with `python -m csref_training.spoken_shapes "
                             f"--captions ...`")
        # With --referents-per-scene N a scene has up to N entries sharing one caption: one pair per
        # image, or retrieval would count a scene's copies as impostors of each other.
        pair_of_iid: dict[int, int] = {}
        pairs, queries = [], []
        for entry in entries:
            if entry["iid"] not in pair_of_iid:
                pair_of_iid[entry["iid"]] = len(pairs)
                pairs.append(CaptionPair(
                    layout.image_dir / image_file_name(layout.image_pattern, entry["iid"]),
                    audio_root / entry["caption"]["speaker"] / f"{entry['caption']['sent_id']}.wav",
                    tuple((w["word"], w["start"], w["end"]) for w in entry["caption"]["words"]),
                    scene_objects(entry)))
            queries += [ExpressionQuery(layout.audio_root / ref["speaker"] / f"{ref['sent_id']}.wav",
                                        parse_expression(ref["sent"]), pair_of_iid[entry["iid"]])
                        for ref in entry["refs"]]
        return CaptionSplit(pairs, queries)
    if data.format == "places":
        json_path = Path(data.root) / f"{split}.json"
        if not json_path.is_file():
            raise FileNotFoundError(f"Places caption list not found: {json_path} (data.root/<split>.json)")
        listing = json.loads(json_path.read_text())
        image_base = Path(data.image_dir or Path(data.root) / listing["image_base_path"])
        audio_base = Path(data.audio_root or Path(data.root) / listing["audio_base_path"])
        return CaptionSplit([CaptionPair(image_base / datum["image"], audio_base / datum["wav"])
                             for datum in listing["data"]], [])
    raise ValueError(f"data.format {data.format!r} is not one ResDAVEnet-VQ reads: use refcoco (Spoken Shapes "
                     "with --captions) or places")


def first_pairs(split: CaptionSplit, count: int) -> CaptionSplit:
    """The first `count` pairs of `split` and the queries said about them: `--split train
    --max-pairs 1000` measures how well the model fits its training pairs, at the test split's size."""
    if count < 2:
        raise ValueError(f"--max-pairs must be at least 2 (retrieval needs an impostor), got {count}")
    return CaptionSplit(split.pairs[:count], [query for query in split.queries if query.pair_index < count])


class CaptionPairs(Dataset):
    """Items {"image": (3, S, S), "image_size": (H, W) before resizing, "features": (F, T) log-mel,
    "index", "pair" (its CaptionPair)} of (image, caption) pairs; `queries` are the split's spoken
    referring expressions."""

    def __init__(self, split: CaptionSplit, model_cfg: DavenetConfig) -> None:
        if not split.pairs:
            raise ValueError("no (image, caption) pairs in this split")
        self.pairs, self.queries, self.model_cfg = split.pairs, split.queries, model_cfg

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        rgb = read_image_rgb(pair.image_path)
        image = image_batch([rgb], self.model_cfg.image.image_size)[0]
        features = log_mel(torch.from_numpy(load_audio_16k(pair.audio_path)), self.model_cfg.log_mel)
        return {"image": image, "image_size": rgb.shape[:2], "features": features, "index": index, "pair": pair}


class Utterances(Dataset):
    """Items {"features": (F, T) log-mel, "index"} of audio files (the expression queries)."""

    def __init__(self, paths: list[Path], model_cfg: DavenetConfig) -> None:
        self.paths, self.model_cfg = paths, model_cfg

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"features": log_mel(torch.from_numpy(load_audio_16k(self.paths[index])), self.model_cfg.log_mel),
                "index": index}


def collate_utterances(items: list[dict[str, Any]], floor_db: float) -> dict[str, Any]:
    features, lengths = pad_features([item["features"] for item in items], floor_db)
    return {"features": features, "lengths": lengths, "index": torch.tensor([item["index"] for item in items])}


def collate_pairs(items: list[dict[str, Any]], floor_db: float) -> dict[str, Any]:
    return {**collate_utterances(items, floor_db), "image": torch.stack([item["image"] for item in items]),
            "image_size": [item["image_size"] for item in items], "pairs": [item["pair"] for item in items]}


# ----------------------------------------------------------------------------------------
# Metrics


def retrieval_recalls(scores: torch.Tensor) -> dict[str, float]:
    """(N_img, N_speech) scores whose diagonal holds the pairs -> R@k speech->image ("s2i", each
    caption's image among all images) and image->speech ("i2s")."""
    n = scores.shape[0]
    truth = torch.arange(n)
    # Rank of the true match: how many candidates score strictly higher.
    s2i_rank = (scores > scores[truth, truth][None, :]).sum(0)  # over images, per caption
    i2s_rank = (scores > scores[truth, truth][:, None]).sum(1)  # over captions, per image
    metrics = {}
    for direction, rank in (("s2i", s2i_rank), ("i2s", i2s_rank)):
        for k in RECALL_AT:
            metrics[f"{direction}_r{k}"] = float((rank < k).float().mean())
    metrics["r10_mean"] = (metrics["s2i_r10"] + metrics["i2s_r10"]) / 2
    return metrics


def subset_recalls(scores: torch.Tensor, size: int, draws: int = 50, seed: int = 0) -> dict[str, float]:
    """`retrieval_recalls` averaged over `draws` random subsets of `size` pairs (the same subset of
    images and captions), keys prefixed `subset<size>_`: R@k on N pairs is the top k/N, so a 300-pair
    validation split and a 1000-pair test split compare only at the same size."""
    n = scores.shape[0]
    if not 2 <= size <= n:
        raise ValueError(f"subset size {size} must be between 2 and the number of pairs ({n})")
    generator = torch.Generator().manual_seed(seed)
    totals: Counter[str] = Counter()
    for _ in range(draws):
        chosen = torch.randperm(n, generator=generator)[:size]
        totals.update(retrieval_recalls(scores[chosen][:, chosen]))
    return {f"subset{size}_{key}": value / draws for key, value in totals.items()}


def codebook_use(codes: list[np.ndarray], codebook_size: int) -> dict[str, float]:
    """Perplexity of the code histogram (exp of its entropy) and the fraction of entries used."""
    counts = np.bincount(np.concatenate(codes), minlength=codebook_size).astype(np.float64)
    probs = counts / counts.sum()
    nonzero = probs[probs > 0]
    return {"perplexity": float(np.exp(-(nonzero * np.log(nonzero)).sum())),
            "used": float((counts > 0).sum() / codebook_size)}


def code_segments(codes: np.ndarray, frame_s: float) -> list[tuple[int, float, float]]:
    """Runs of equal codes -> (code, start s, end s)."""
    segments, start = [], 0
    for index in range(1, len(codes) + 1):
        if index == len(codes) or codes[index] != codes[start]:
            segments.append((int(codes[start]), start * frame_s, index * frame_s))
            start = index
    return segments


def word_detection(codes: list[np.ndarray], frame_s: float, words: list[tuple[tuple[str, float, float], ...]],
                   window_s: float, stop_words: list[str]) -> dict[str, float]:
    """How well single codes detect words (the paper's unit analysis, steps/unit_analysis.py's idea).

    Precision of code c for word w: of c's segments (runs), the fraction whose centre +- window_s
    overlaps an occurrence of w. Recall: of w's occurrences, the fraction during which c occurs.
    Each word's F1 is that of its best code; reported: the mean over the vocabulary (stop words
    left out), the number of words whose best F1 is at least 0.5, and the vocabulary size.
    """
    segments_of_code: Counter = Counter()
    code_word_hits: dict[int, Counter] = defaultdict(Counter)
    occurrences: Counter = Counter()
    word_code_hits: dict[str, Counter] = defaultdict(Counter)
    for utterance_codes, spans in zip(codes, words):
        content = [(w, s, e) for w, s, e in spans if w not in stop_words]
        for code, start, end in code_segments(utterance_codes, frame_s):
            centre = (start + end) / 2
            segments_of_code[code] += 1
            code_word_hits[code].update({w for w, s, e in content if s < centre + window_s and e > centre - window_s})
        for word, start, end in content:
            occurrences[word] += 1
            first, last = int(start / frame_s), math.ceil(end / frame_s)
            word_code_hits[word].update(set(utterance_codes[first:last].tolist()))
    best_f1 = {}
    for word, total in occurrences.items():
        best = 0.0
        for code, hits in word_code_hits[word].items():
            precision = code_word_hits[code][word] / segments_of_code[code]
            recall = hits / total
            if precision + recall > 0:
                best = max(best, 2 * precision * recall / (precision + recall))
        best_f1[word] = best
    if not best_f1:
        return {"word_f1": 0.0, "words_f1_50": 0, "vocabulary": 0}
    return {"word_f1": float(np.mean(list(best_f1.values()))),
            "words_f1_50": sum(f1 >= 0.5 for f1 in best_f1.values()), "vocabulary": len(best_f1)}


def semantic_recall(scores: torch.Tensor, queries: list[ExpressionQuery], pairs: list[CaptionPair],
                    image_sizes: list[tuple[int, int]]) -> dict[str, float]:
    """(N_img, N_query) scores -> "semantic" R@1: the fraction of queries whose best image holds a
    referent of the expression (grammar.referents, place words included; the query's own scene
    counts like any other), and its chance: the mean over queries of the fraction of images that
    hold a referent; both also for the queries with and without a place word."""
    # Scenes x distinct expressions: a split has far fewer expressions than queries.
    fits: dict[Expression, np.ndarray] = {}
    for query in queries:
        if query.expression not in fits:
            fits[query.expression] = np.array([
                bool(referents(query.expression, list(pair.objects), width, height))
                for pair, (height, width) in zip(pairs, image_sizes)])  # (N_img,)
    best = scores.argmax(dim=0).tolist()  # (N_query,)
    hits = np.array([fits[query.expression][image] for query, image in zip(queries, best)])
    chances = np.array([fits[query.expression].mean() for query in queries])
    report = {"queries": len(queries), "semantic_r1": float(hits.mean()), "chance_semantic_r1": float(chances.mean())}
    # Place words ask where an object is, the other words what it is: each kind reported apart.
    with_place = np.array([query.expression.num_place > 0 for query in queries])
    for name, subset in (("place", with_place), ("no_place", ~with_place)):
        if subset.any():
            report[f"{name}_queries"] = int(subset.sum())
            report[f"semantic_r1_{name}"] = float(hits[subset].mean())
            report[f"chance_semantic_r1_{name}"] = float(chances[subset].mean())
    return report


@torch.no_grad()
def encode_pairs(model: Davenet, dataset: CaptionPairs, batch_size: int, device: torch.device,
                 num_workers: int = 0) -> tuple[list[torch.Tensor], list[SpeechOutput], list[tuple[int, int]]]:
    """Every pair of `dataset` in order, in eval mode: the image maps (float32, one (B, D, H, W)
    tensor per batch), the captions' SpeechOutputs (embeddings float32) and the images' (H, W)."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=functools.partial(collate_pairs, floor_db=model.cfg.log_mel.floor_db))
    image_maps, speech_outputs, image_sizes = [], [], []
    for batch in loader:
        image_maps.append(model.encode_images(batch["image"].to(device)).float())
        image_sizes += batch["image_size"]
        speech = model.encode_speech(batch["features"].to(device), batch["lengths"].to(device))
        speech.embeddings = speech.embeddings.float()
        speech_outputs.append(speech)
    return image_maps, speech_outputs, image_sizes


@torch.no_grad()
def evaluate_davenet(model: Davenet, dataset: CaptionPairs, batch_size: int, device: torch.device,
                     settings: DavenetTaskConfig, num_workers: int = 0,
                     subset_pairs: int | None = None) -> dict[str, float]:
    """Retrieval over every pair of `dataset` (and, with `subset_pairs`, over random subsets of that
    many pairs: `subset_recalls`), semantic retrieval by its spoken referring expressions (when it
    has them) and the units report of each active VQ layer. Every process computes it on the whole
    split (one similarity matrix needs all pairs)."""
    image_maps, speech_outputs, image_sizes = encode_pairs(model, dataset, batch_size, device, num_workers)
    codes: dict[int, list[np.ndarray]] = defaultdict(list)
    for speech in speech_outputs:
        for slot, slot_codes in speech.codes.items():
            for row, length in zip(slot_codes.cpu().numpy(), speech.code_lengths[slot].tolist()):
                codes[slot].append(row[:length])
    scores = torch.cat([torch.cat([model.similarity(maps, speech) for speech in speech_outputs], dim=1)
                        for maps in image_maps]).cpu()  # (N, N)
    n = len(dataset)
    metrics: dict[str, float] = {"pairs": n, **retrieval_recalls(scores),
                                 **{f"chance_r{k}": min(k, n) / n for k in RECALL_AT}}
    if subset_pairs is not None:
        metrics.update(subset_recalls(scores, subset_pairs))
    if dataset.queries:
        query_loader = DataLoader(Utterances([q.audio_path for q in dataset.queries], model.cfg), batch_size=batch_size,
                                  shuffle=False, num_workers=num_workers,
                                  collate_fn=functools.partial(collate_utterances, floor_db=model.cfg.log_mel.floor_db))
        query_scores = []
        for batch in query_loader:
            speech = model.encode_speech(batch["features"].to(device), batch["lengths"].to(device))
            speech.embeddings = speech.embeddings.float()
            query_scores.append(torch.cat([model.similarity(maps, speech) for maps in image_maps]).cpu())
        metrics.update(semantic_recall(torch.cat(query_scores, dim=1), dataset.queries, dataset.pairs, image_sizes))
    words = [pair.words for pair in dataset.pairs]
    for slot in sorted(codes):
        for key, value in codebook_use(codes[slot], model.cfg.speech.codebook_size).items():
            metrics[f"vq{slot}_{key}"] = value
        if all(w is not None for w in words):
            frame_s = model.cfg.log_mel.hop_s * 2 ** (slot - 1)
            report = word_detection(codes[slot], frame_s, words, settings.code_window_s, settings.stop_words)
            for key, value in report.items():
                metrics[f"vq{slot}_{key}"] = value
    return metrics


def command_impostors(pairs: list[CaptionPair], image_sizes: list[tuple[int, int]]) -> torch.Tensor:
    """(B_img, B_speech) bool: may image i be an impostor of utterance j? Not when it is the same
    scene, nor when utterance j is a command with a referent in scene i (captions fit one scene)."""
    allowed = torch.ones(len(pairs), len(pairs), dtype=torch.bool)
    for i, (scene, (height, width)) in enumerate(zip(pairs, image_sizes)):
        for j, utterance in enumerate(pairs):
            if scene.image_path == utterance.image_path or (
                    utterance.expression is not None
                    and referents(utterance.expression, list(scene.objects), width, height)):
                allowed[i, j] = False
    return allowed


# ----------------------------------------------------------------------------------------
# The task


def load_warm_start(model: Davenet, path: str | Path) -> None:
    """Weights of an earlier stage of the VQ schedule: everything must match except the codebooks
    of VQ layers the earlier stage did not have, which keep their fresh initialisation."""
    state_dict, config_dict = read_checkpoint_dir(path)
    seed_cfg = DavenetConfig.from_dict(config_dict, source=f"{path}/config.yaml")
    earlier, now = set(seed_cfg.speech.vq_layers), set(model.cfg.speech.vq_layers)
    if not earlier <= now:
        raise ValueError(f"task.warm_start {path} has VQ layers {sorted(earlier)}, which are not a subset of this run's "
                         f"{sorted(now)}: the schedule only adds VQ layers ({{}} -> {{3}} -> {{2,3}})")
    new_codebooks = tuple(f"speech_encoder.quantizers.{slot}." for slot in sorted(now - earlier))
    load_into(model, state_dict, str(path), allow_missing=new_codebooks)
    logger.info("warm start from %s (VQ layers %s -> %s)", path, sorted(earlier), sorted(now))


class DavenetTask:
    name = "davenet"
    best_metric = "r10_mean"
    higher_is_better = True
    model_config = staticmethod(davenet_model_config)

    def __init__(self, cfg: TrainConfig, model_cfg: DavenetConfig, dist_info: DistInfo) -> None:
        self.cfg, self.model_cfg, self.dist_info = cfg, model_cfg, dist_info
        self.settings = from_dict(DavenetTaskConfig, cfg.task, "training config", section="task")
        if self.settings.train_on_commands:
            # Commands are trained for the robot's queries: keep the epoch that ranks them best.
            self.best_metric = "semantic_r1"
        self.collate = functools.partial(collate_pairs, floor_db=model_cfg.log_mel.floor_db)

    def build_model(self) -> nn.Module:
        return build_davenet(self.model_cfg)

    def build_dataset(self, split: str, train: bool) -> Dataset:
        pairs = read_caption_split(self.cfg.data, split)
        if train and self.settings.train_on_commands:
            if not pairs.queries:
                raise ValueError(f"task.train_on_commands: the {split} split has no spoken referring expressions "
                                 "(Spoken Shapes data has them; Places does not)")
            commands = [dataclasses.replace(pairs.pairs[q.pair_index], audio_path=q.audio_path, words=None,
                                            expression=q.expression) for q in pairs.queries]
            logger.info("%s: %d caption pairs + %d command pairs", split, len(pairs.pairs), len(commands))
            pairs = CaptionSplit(pairs.pairs + commands, pairs.queries)
        return CaptionPairs(pairs, self.model_cfg)

    def initialise(self, model: nn.Module) -> None:
        if self.settings.warm_start:
            load_warm_start(model, self.settings.warm_start)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> torch.Tensor:
        device = self.dist_info.device
        impostors = None
        if self.settings.train_on_commands:
            impostors = command_impostors(batch["pairs"], batch["image_size"]).to(device)
        loss, _ = model.loss(batch["image"].to(device, non_blocking=True),
                             batch["features"].to(device, non_blocking=True),
                             batch["lengths"].to(device, non_blocking=True), impostors)
        return loss

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        return evaluate_davenet(model, dataset, self.cfg.eval_batch_size, self.dist_info.device, self.settings,
                                num_workers=self.cfg.data.num_workers)


# ----------------------------------------------------------------------------------------
# Subcommands


def evaluate_main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_train_config(args.config, args.overrides)
    settings = from_dict(DavenetTaskConfig, cfg.task, "training config", section="task")
    model, model_cfg = build_davenet_from_checkpoint(args.checkpoint)
    split = read_caption_split(cfg.data, args.split)
    if args.max_pairs is not None:
        split = first_pairs(split, args.max_pairs)
    dataset = CaptionPairs(split, model_cfg)
    metrics = evaluate_davenet(model, dataset, cfg.eval_batch_size, torch.device("cpu"), settings,
                               num_workers=cfg.data.num_workers, subset_pairs=args.subset_pairs)
    print(json.dumps(metrics, indent=2))
    return metrics


def units_main(args: argparse.Namespace) -> dict[int, list[int]]:
    model, model_cfg = build_davenet_from_checkpoint(args.checkpoint)
    slots = [args.layer] if args.layer is not None else model_cfg.speech.vq_layers
    if not slots:
        raise ValueError(f"{args.checkpoint} has no VQ layer (speech.vq_layers is empty): it has no units")
    wave, sample_rate = load_audio(args.audio)
    units = {}
    for slot in slots:
        codes = speech_units(model, wave, sample_rate, slot)
        if args.dedup:
            codes = [code for index, code in enumerate(codes) if index == 0 or code != codes[index - 1]]
        units[slot] = codes
        print(f"vq{slot}: {' '.join(map(str, codes))}")
    return units


def main(argv: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("evaluate", "units"):
        return trainer.main(DavenetTask, __doc__.split("\n")[0], argv)
    parser = argparse.ArgumentParser(prog=f"python -m csref_training.davenet {argv[0]}")
    parser.add_argument("--checkpoint", required=True, type=Path, help="a ResDAVEnet-VQ checkpoint directory")
    if argv[0] == "evaluate":
        parser.add_argument("--config", required=True, help="the training YAML (its data and task sections)")
        parser.add_argument("--split", default="test")
        parser.add_argument("--subset-pairs", type=int, default=None,
                            help="also R@k over 50 random subsets of this many pairs (e.g. the validation size)")
        parser.add_argument("--max-pairs", type=int, default=None,
                            help="only the split's first N pairs (e.g. --split train --max-pairs 1000: the fit on "
                                 "training pairs at the test split's size)")
        parser.add_argument("overrides", nargs="*", help="dotted overrides of the training YAML, e.g. data.root=D")
    else:
        parser.add_argument("audio", help="audio file (WAV/FLAC/OGG, any sample rate)")
        parser.add_argument("--layer", type=int, default=None, help="VQ slot to print (default: every active one)")
        parser.add_argument("--dedup", action="store_true", help="merge runs of the same unit into one")
    args = parser.parse_intermixed_args(argv[1:])
    try:
        return evaluate_main(args) if argv[0] == "evaluate" else units_main(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
