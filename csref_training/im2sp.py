"""Im2Sp: train the region-to-unit decoder and the unit vocoder, and judge the speech they make.

    python -m csref_training.im2sp units --config config/train/im2sp_spoken_shapes.yaml
    python -m csref_training.im2sp vocoder --config config/train/im2sp_vocoder_spoken_shapes.yaml
    python -m csref_training.im2sp --config config/train/im2sp_spoken_shapes.yaml [key=value ...]
    python -m csref_training.im2sp bundle --config Y --decoder runs/im2sp/best --vocoder runs/vocoder/best --out DIR
    python -m csref_training.im2sp evaluate --config Y --answer DIR --split test --out DIR

Models: `csref_model.im2sp` (decoder, vocoder, `Answerer`). Each training YAML's `task:` section is
`Im2SpTaskConfig`; its `units:` part says where the units come from, shared by all commands:

- `units` renders every utterance, extracts frame features, fits k-means on the training split's
  frames (`source: csa_kmeans`, our CSA speech encoder's hidden state `layer`, the stand-in for
  HuBERT + k-means) or reads a ResDAVEnet-VQ model's codes (`source: davenet`, VQ slot `layer`),
  deduplicates them and writes `<units.dir>/units.json` ({key: {units, durations, audio}}).
  Spoken Shapes (`data.format: refcoco`): the key is the target's expression without its carrier
  ("the small circle"), spoken in the answer voice `units.voice` (the robot's one voice, so the
  decoder learns what to say, not who says it). Captions (`data.format: places`, the paper's
  SpokenCOCO / Flickr8k audio as a Places-style listing): the key is the recording's path, the
  audio the recording itself, the box the whole image.
- training (default command): teacher forcing; validation = loss (picks `best`), token accuracy,
  and greedy decoding's unit error rate (edit distance / reference length) and exact-sequence
  rate on `val_scenes` scenes.
- `vocoder` trains the unit-to-mel model on the same utterances (Griffin-Lim makes the waveform).
- `evaluate` generates answers (beam search) for unseen scenes and scores them with the judges of
  `speech_judges.py`, beside the same judges on the generator's own speech (the ceiling) and on
  the vocoder's resynthesis of the reference units.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from sklearn.cluster import MiniBatchKMeans
from torch import nn
from torch.utils.data import Dataset

from csref_model.audio import SAMPLE_RATE, load_audio_16k
from csref_model.boxes import box_iou
from csref_model.checkpoint import load_into, load_speech_encoder, read_config, read_state_dict
from csref_model.csa import load_tokenizer
from csref_model.davenet import build_davenet_from_checkpoint, speech_units
from csref_model.grounder import Grounder
from csref_model.im2sp import (
    ANSWER_DECODER,
    ANSWER_LEXICON,
    ANSWER_VOCODER,
    PAD,
    Answerer,
    ExpressionRetriever,
    Im2Sp,
    Im2SpConfig,
    UnitVocoder,
    UnitVocoderConfig,
    build_vocoder_from_checkpoint,
    deduplicate,
    edit_distance,
    log_mel,
    teacher_forcing_loss,
    units_to_tokens,
)
from csref_model.preprocessing import letterbox
from csref_model.typed_yaml import from_dict, merge
from csref_training import trainer
from csref_training.datasets import image_file_name, refcoco_layout
from csref_training.distributed import DistInfo
from csref_training.speech_judges import GrammarRecogniser, all_expressions, expression_of
from csref_training.spoken_shapes.grammar import Expression, parse_expression
from csref_training.spoken_shapes.speech import synthesize, trim_to_audible
from csref_training.train_config import DataConfig, TrainConfig, load_train_config

logger = logging.getLogger(__name__)

UNITS_FILE = "units.json"
UNIT_SOURCES = ("csa_kmeans", "davenet")
ANSWER_PAD_S = 0.1  # silence around each answer-voice utterance
MAP_NAMES = ("s8", "s16", "s32")  # Im2Sp.encode_image's maps, in prefix order


@dataclass
class UnitsConfig:
    """Where the discrete units come from (the `task.units` section)."""

    source: str = "csa_kmeans"  # or "davenet" (the ResDAVEnet-VQ issue's codes)
    # csa_kmeans: a CSA checkpoint directory; davenet: a ResDAVEnet-VQ checkpoint directory.
    checkpoint: str | None = None
    # csa_kmeans: wav2vec2 hidden state (0 = after the CNN, N = last layer); davenet: VQ slot.
    layer: int = 2
    num_units: int = 100  # k-means k (csa_kmeans); davenet: its codebook size
    kmeans_frames: int = 200_000  # at most this many training frames are clustered
    # Spoken Shapes: the answer voice (espeak-ng voice, rate wpm, pitch) every expression is spoken in.
    voice: str = "en-us"
    rate: int = 160
    pitch: int = 50
    dir: str = "runs/im2sp_units"


@dataclass
class JudgesConfig:
    """The evaluation's judges (checkpoints) and how many scenes they hear."""

    csa_checkpoint: str | None = None  # Judge 1
    srec_checkpoint: str | None = None  # Judge 2
    pocketsphinx: bool = True  # Judge 3
    scenes: int | None = None  # null = every scene of the split


@dataclass
class Im2SpTaskConfig:
    """The training YAML's `task:` section (decoder and vocoder runs share it)."""

    units: UnitsConfig = field(default_factory=UnitsConfig)
    # SREC checkpoint whose CSPDarknet becomes the decoder's frozen image encoder.
    image_checkpoint: str | None = None
    # Directory where the frozen image encoder's maps of each split are kept between runs
    # (<split>_<scenes>.pt; delete it after changing image_checkpoint); null = recompute each run.
    feature_cache: str | None = None
    # Samples read per split, the first N (null = all; a scene's referents are one sample each).
    max_scenes: dict[str, int] = field(default_factory=dict)
    val_scenes: int = 200  # scenes greedily decoded at each validation
    beam_size: int = 5
    judges: JudgesConfig = field(default_factory=JudgesConfig)


def task_settings(cfg: TrainConfig) -> Im2SpTaskConfig:
    settings = from_dict(Im2SpTaskConfig, cfg.task, "training config", section="task")
    if settings.units.source not in UNIT_SOURCES:
        raise ValueError(f"training config: task.units.source must be one of {', '.join(UNIT_SOURCES)}, "
                         f"got {settings.units.source!r}")
    return settings


# ----------------------------------------------------------------------------------------
# Utterances and units


@dataclass(frozen=True)
class Sample:
    """One (image, box, utterance) triple: the box (x1, y1, x2, y2, original px) is the target's,
    or the whole image for captions; `key` names the utterance in units.json; `recording` is its
    audio file for captions (Spoken Shapes expressions are spoken in the answer voice instead)."""

    image_path: Path
    box_xyxy: tuple[float, float, float, float] | None
    key: str
    recording: Path | None = None


def read_samples(data: DataConfig, split: str, limit: int | None = None) -> list[Sample]:
    """The split's samples (see the module docstring for the two formats), the first `limit`."""
    if data.format == "refcoco":
        layout = refcoco_layout(data.dataset, data.root, data.ann_path, data.image_dir, None, data.image_pattern)
        entries = json.loads(layout.ann_path.read_text())[split][:limit]
        samples = []
        for entry in entries:
            x, y, w, h = entry[layout.box_key]
            samples.append(Sample(layout.image_dir / image_file_name(layout.image_pattern, entry["iid"]),
                                  (x, y, x + w, y + h), expression_of(entry["refs"][0]["sent"])))
        return samples
    if data.format == "places":
        json_path = Path(data.root) / f"{split}.json"
        if not json_path.is_file():
            raise FileNotFoundError(f"caption listing not found: {json_path} (data.root/<split>.json)")
        listing = json.loads(json_path.read_text())
        image_base = Path(data.image_dir or Path(data.root) / listing["image_base_path"])
        audio_base = Path(data.audio_root or Path(data.root) / listing["audio_base_path"])
        return [Sample(image_base / datum["image"], None, datum["wav"], audio_base / datum["wav"])
                for datum in listing["data"][:limit]]
    raise ValueError(f"data.format {data.format!r} is not one Im2Sp reads: use refcoco (Spoken Shapes) or places "
                     "(image + spoken caption listings such as SpokenCOCO / Flickr8k audio)")


def answer_voice_speech(text: str, units: UnitsConfig) -> np.ndarray:
    """`text` in the answer voice: trimmed, ANSWER_PAD_S of silence each side, peak 0.9."""
    speech = trim_to_audible(synthesize(text, units.voice, units.rate, units.pitch))
    speech = speech * (0.9 / np.abs(speech).max())
    pad = np.zeros(int(ANSWER_PAD_S * SAMPLE_RATE), dtype=np.float32)
    return np.concatenate([pad, speech, pad]).astype(np.float32)


def build_units(cfg: TrainConfig) -> dict[str, Any]:
    """Renders (or finds) every utterance of the train/val/test splits, computes its units and
    writes <units.dir>/units.json; returns its content."""
    settings = task_settings(cfg)
    units_cfg = settings.units
    if not units_cfg.checkpoint:
        raise ValueError("training config: task.units.checkpoint is required (a CSA checkpoint for csa_kmeans, "
                         "a ResDAVEnet-VQ checkpoint for davenet)")
    out_dir = Path(units_cfg.dir)
    audio_dir = out_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    split_keys, recordings = {}, {}
    for split in (cfg.data.train_split, cfg.data.val_split, "test"):
        samples = read_samples(cfg.data, split, settings.max_scenes.get(split))
        split_keys[split] = sorted({s.key for s in samples})
        recordings.update({s.key: s.recording for s in samples})
    keys = sorted(set().union(*split_keys.values()))
    audio = {}
    for index, key in enumerate(keys):
        if recordings[key] is None:
            audio[key] = audio_dir / f"{index:05d}.wav"
            sf.write(audio[key], answer_voice_speech(key, units_cfg), SAMPLE_RATE, subtype="PCM_16")
        else:
            audio[key] = recordings[key]
    logger.info("%d utterances (%s)", len(keys), ", ".join(f"{s} {len(k)}" for s, k in split_keys.items()))

    if units_cfg.source == "davenet":
        model, model_cfg = build_davenet_from_checkpoint(units_cfg.checkpoint)
        frames = {key: speech_units(model, load_audio_16k(audio[key]), SAMPLE_RATE, units_cfg.layer) for key in keys}
        frame_s = model_cfg.log_mel.hop_s * 2 ** (units_cfg.layer - 1)
        num_units = model_cfg.speech.codebook_size
    else:
        encoder = load_speech_encoder(units_cfg.checkpoint)
        encoder.check_hidden_state(units_cfg.layer, f"task.units.checkpoint {units_cfg.checkpoint}")
        feats = {key: encoder.hidden_state(load_audio_16k(audio[key]), units_cfg.layer) for key in keys}
        train_frames = np.concatenate([feats[key] for key in split_keys[cfg.data.train_split]])
        rng = np.random.default_rng(cfg.seed)
        if len(train_frames) > units_cfg.kmeans_frames:
            train_frames = train_frames[rng.choice(len(train_frames), units_cfg.kmeans_frames, replace=False)]
        kmeans = MiniBatchKMeans(n_clusters=units_cfg.num_units, random_state=cfg.seed, n_init=3, batch_size=4096)
        kmeans.fit(train_frames)
        np.save(out_dir / "kmeans_centroids.npy", kmeans.cluster_centers_.astype(np.float32))
        frames = {key: kmeans.predict(feats[key]).tolist() for key in keys}
        frame_s, num_units = float(np.prod(encoder.model.config.conv_stride)) / SAMPLE_RATE, units_cfg.num_units
    utterances = {}
    for key in keys:
        runs, durations = deduplicate(frames[key])
        utterances[key] = {"audio": str(audio[key]), "units": runs, "durations": durations}
    content = {"source": units_cfg.source, "checkpoint": units_cfg.checkpoint, "layer": units_cfg.layer,
               "num_units": num_units, "frame_s": frame_s, "voice": units_cfg.voice, "splits": split_keys,
               "utterances": utterances}
    (out_dir / UNITS_FILE).write_text(json.dumps(content))
    mean_frames = np.mean([len(frames[k]) for k in keys])
    mean_units = np.mean([len(utterances[k]["units"]) for k in keys])
    logger.info("units: %s layer %d, %d units, %.1f frames -> %.1f after deduplication per utterance; %s",
                units_cfg.source, units_cfg.layer, num_units, mean_frames, mean_units, out_dir / UNITS_FILE)
    return content


def read_units(units_cfg: UnitsConfig) -> dict[str, Any]:
    path = Path(units_cfg.dir) / UNITS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m csref_training.im2sp units --config ...` first")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------
# The decoder's data


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"could not read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class RegionUnits(Dataset):
    """Items {"s8", "s16", "s32" maps, "box" (4,) letterboxed px, "tokens", "index"}. The frozen
    image encoder's maps are computed once per image here (fp16 in memory; a scene's referents
    share them): training never runs it."""

    def __init__(self, samples: list[Sample], units: dict[str, Any], image_encoder: Im2Sp | None,
                 cache: Path | None = None, batch_size: int = 32):
        missing = [s.key for s in samples if s.key not in units["utterances"]]
        if missing:
            raise ValueError(f"{len(missing)} utterances have no units (e.g. {missing[0]!r}); rerun the units command")
        self.samples = samples
        self.tokens = [torch.tensor(units_to_tokens(units["utterances"][s.key]["units"])) for s in samples]
        image_paths = list(dict.fromkeys(s.image_path for s in samples))
        row_of = {path: row for row, path in enumerate(image_paths)}
        self.image_rows = [row_of[s.image_path] for s in samples]
        if cache is not None and cache.is_file():
            cached = torch.load(cache, weights_only=True)
            if cached.get("images") != [str(path) for path in image_paths]:
                raise ValueError(f"the feature cache {cache} holds other images (or an older layout) than this "
                                 "split: delete it (or point task.feature_cache elsewhere)")
            self.maps, self.boxes = cached["maps"], cached["boxes"]
            return
        if image_encoder is None:
            raise ValueError(f"no feature cache at {cache} and no image encoder to compute one")
        size = image_encoder.cfg.image_size
        geometries, maps = {}, []
        for start in range(0, len(image_paths), batch_size):
            images = []
            for path in image_paths[start:start + batch_size]:
                rgb = read_rgb(path)
                image, geometries[path] = letterbox(rgb, size)
                images.append(image)
            maps.append([level.half() for level in image_encoder.encode_image(torch.stack(images))])
        self.maps = [torch.cat(level) for level in zip(*maps)]  # s8, s16, s32: (N_images, C, h, w)
        boxes = []
        for sample in samples:
            geometry = geometries[sample.image_path]
            box = sample.box_xyxy or (0.0, 0.0, float(geometry.w), float(geometry.h))
            boxes.append(torch.from_numpy(geometry.box_to_input(np.asarray(box, dtype=np.float32))).float())
        self.boxes = torch.stack(boxes)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"images": [str(path) for path in image_paths], "maps": self.maps, "boxes": self.boxes}, cache)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.image_rows[index]
        return {**{name: level[row].float() for name, level in zip(MAP_NAMES, self.maps)},
                "box": self.boxes[index], "tokens": self.tokens[index], "index": index}


def collate_region_units(items: list[dict[str, Any]]) -> dict[str, Any]:
    longest = max(len(item["tokens"]) for item in items)
    tokens = torch.full((len(items), longest), PAD, dtype=torch.long)
    for row, item in enumerate(items):
        tokens[row, :len(item["tokens"])] = item["tokens"]
    return {**{name: torch.stack([i[name] for i in items]) for name in MAP_NAMES},
            "box": torch.stack([i["box"] for i in items]), "tokens": tokens,
            "index": torch.tensor([i["index"] for i in items])}


def unit_scores(hypotheses: list[list[int]], references: list[list[int]]) -> dict[str, float]:
    """Unit error rate (edit distance over reference length, pooled) and exact-sequence rate."""
    errors = sum(edit_distance(h, r) for h, r in zip(hypotheses, references))
    return {"unit_error_rate": errors / max(sum(len(r) for r in references), 1),
            "unit_exact": float(np.mean([h == r for h, r in zip(hypotheses, references)]))}


@torch.no_grad()
def evaluate_decoder(model: Im2Sp, dataset: RegionUnits, batch_size: int, greedy_scenes: int) -> dict[str, float]:
    model.eval()
    losses, accuracies, counts = [], [], []
    hypotheses, references = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate_region_units([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        prefix = model.prefix(*(batch[name] for name in MAP_NAMES), batch["box"])
        loss, accuracy = teacher_forcing_loss(model.logits(prefix, batch["tokens"][:, :-1]), batch["tokens"])
        n = (batch["tokens"][:, 1:] != PAD).sum().item()
        losses.append(loss.item() * n)
        accuracies.append(accuracy.item() * n)
        counts.append(n)
        if start < greedy_scenes:
            keep = min(batch_size, greedy_scenes - start)
            hypotheses += model.greedy(prefix[:keep])
            references += [[t - 3 for t in row.tolist() if t > 2] for row in batch["tokens"][:keep]]
    return {"loss": sum(losses) / sum(counts), "token_accuracy": sum(accuracies) / sum(counts),
            **unit_scores(hypotheses, references)}


# ----------------------------------------------------------------------------------------
# The decoder task


def load_image_encoder(model: Im2Sp, checkpoint: str) -> None:
    """The frozen CSPDarknet from an SREC checkpoint's visual_encoder.* weights."""
    state_dict = read_state_dict(checkpoint)
    backbone = {k[len("visual_encoder."):]: v for k, v in state_dict.items() if k.startswith("visual_encoder.")}
    if not backbone:
        raise ValueError(f"{checkpoint} has no visual_encoder.* weights: task.image_checkpoint must be an SREC "
                         "checkpoint (e.g. models/spoken_shapes_tiny)")
    load_into(model.image_encoder, backbone, checkpoint)


def im2sp_model_config(cfg: TrainConfig) -> Im2SpConfig:
    """Defaults + `cfg.model_overrides`, with the image encoder's config from task.image_checkpoint
    and the unit count from units.json, so shapes always match."""
    settings = task_settings(cfg)
    if not settings.image_checkpoint:
        raise ValueError("training config: task.image_checkpoint is required (an SREC checkpoint whose image "
                         "encoder Im2Sp reads, e.g. models/spoken_shapes_tiny)")
    if cfg.model != "im2sp":
        raise ValueError(f"training config: model must be 'im2sp' for this task, got {cfg.model!r}")
    srec_cfg = read_config(settings.image_checkpoint)
    tree = merge(Im2SpConfig().to_dict(), cfg.model_overrides)
    tree["visual_backbone"] = {**srec_cfg.to_dict()["visual_backbone"], "pretrained_path": None}
    tree["image_size"] = srec_cfg.image_size
    tree["num_units"] = read_units(settings.units)["num_units"]
    return Im2SpConfig.from_dict(tree, source="im2sp + model_overrides + task checkpoints")


class Im2SpTask:
    name = "im2sp"
    # The teacher-forced loss, not greedy's unit error rate: a wrong expression shares most of its
    # units with the right one ("the ... circle"), so that rate barely moves while the choice improves.
    best_metric = "loss"
    higher_is_better = False
    model_config = staticmethod(im2sp_model_config)
    collate = staticmethod(collate_region_units)

    def __init__(self, cfg: TrainConfig, model_cfg: Im2SpConfig, dist_info: DistInfo) -> None:
        self.cfg, self.model_cfg, self.dist_info = cfg, model_cfg, dist_info
        self.settings = task_settings(cfg)
        self.units = read_units(self.settings.units)
        self.image_encoder = Im2Sp(model_cfg).eval()  # only its frozen CSPDarknet is used, for the feature cache
        load_image_encoder(self.image_encoder, self.settings.image_checkpoint)

    def build_model(self) -> nn.Module:
        return Im2Sp(self.model_cfg)

    def build_dataset(self, split: str, train: bool) -> Dataset:
        started = time.perf_counter()
        samples = read_samples(self.cfg.data, split, self.settings.max_scenes.get(split))
        cache = self.settings.feature_cache
        dataset = RegionUnits(samples, self.units, self.image_encoder,
                              Path(cache) / f"{split}_{len(samples)}.pt" if cache else None)
        logger.info("%s: %d samples, image features in %.0f s", split, len(dataset), time.perf_counter() - started)
        return dataset

    def initialise(self, model: nn.Module) -> None:
        load_image_encoder(model, self.settings.image_checkpoint)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> torch.Tensor:
        device = self.dist_info.device
        tokens = batch["tokens"].to(device)
        logits = model(*(batch[name].to(device) for name in MAP_NAMES), batch["box"].to(device), tokens[:, :-1])
        return teacher_forcing_loss(logits, tokens)[0]

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        return evaluate_decoder(model, dataset, self.cfg.eval_batch_size, self.settings.val_scenes)


# ----------------------------------------------------------------------------------------
# The vocoder task


class UnitMels(Dataset):
    """Items {"units", "durations", "mel" (frames, n_mels)} of the split's utterances."""

    def __init__(self, keys: list[str], units: dict[str, Any], model_cfg: UnitVocoderConfig):
        self.items = []
        for key in keys:
            utterance = units["utterances"][key]
            durations = torch.tensor(utterance["durations"])
            frames = int(durations.sum()) * model_cfg.frames_per_unit
            mel = torch.from_numpy(log_mel(load_audio_16k(utterance["audio"]), model_cfg.mel))
            if len(mel) < frames:  # the last unit frame may reach past the last mel frame
                mel = torch.cat([mel, mel[-1:].expand(frames - len(mel), -1)])
            self.items.append({"units": torch.tensor(utterance["units"]), "durations": durations, "mel": mel[:frames]})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def collate_unit_mels(items: list[dict[str, Any]], pad_unit: int) -> dict[str, Any]:
    batch, longest_units = len(items), max(len(i["units"]) for i in items)
    longest_frames = max(len(i["mel"]) for i in items)
    units = torch.full((batch, longest_units), pad_unit, dtype=torch.long)
    durations = torch.zeros(batch, longest_units, dtype=torch.long)
    mel = torch.zeros(batch, longest_frames, items[0]["mel"].shape[1])
    for row, item in enumerate(items):
        units[row, :len(item["units"])] = item["units"]
        durations[row, :len(item["durations"])] = item["durations"]
        mel[row, :len(item["mel"])] = item["mel"]
    return {"units": units, "unit_valid": units != pad_unit, "durations": durations, "mel": mel}


def vocoder_losses(model: UnitVocoder, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    mel, valid, log_duration = model(batch["units"], batch["unit_valid"], batch["durations"])
    frames = min(mel.shape[1], batch["mel"].shape[1])
    mel_error = (mel[:, :frames] - batch["mel"][:, :frames]).abs().mean(-1)  # (B, F)
    mel_loss = (mel_error * valid[:, :frames]).sum() / valid[:, :frames].sum()
    target = torch.log1p(batch["durations"].float())
    duration_loss = F.mse_loss(log_duration[batch["unit_valid"]], target[batch["unit_valid"]])
    return {"mel_l1": mel_loss, "duration_mse": duration_loss, "loss": mel_loss + duration_loss}


def vocoder_model_config(cfg: TrainConfig) -> UnitVocoderConfig:
    settings = task_settings(cfg)
    if cfg.model != "unit_vocoder":
        raise ValueError(f"training config: model must be 'unit_vocoder' for the vocoder, got {cfg.model!r}")
    units = read_units(settings.units)
    tree = merge(UnitVocoderConfig().to_dict(), cfg.model_overrides)
    tree["num_units"] = units["num_units"]
    config = UnitVocoderConfig.from_dict(tree, source="unit_vocoder + model_overrides + units.json")
    unit_frames = units["frame_s"] * SAMPLE_RATE / config.mel.hop_length
    if abs(unit_frames - config.frames_per_unit) > 1e-6:
        raise ValueError(f"the units are {units['frame_s'] * 1000:.0f} ms frames = {unit_frames:g} mel hops, but "
                         f"frames_per_unit is {config.frames_per_unit}: set model_overrides.frames_per_unit")
    return config


class VocoderTask:
    name = "vocoder"
    best_metric = "mel_l1"
    higher_is_better = False
    model_config = staticmethod(vocoder_model_config)

    def __init__(self, cfg: TrainConfig, model_cfg: UnitVocoderConfig, dist_info: DistInfo) -> None:
        self.cfg, self.model_cfg, self.dist_info = cfg, model_cfg, dist_info
        self.units = read_units(task_settings(cfg).units)
        self.collate = functools.partial(collate_unit_mels, pad_unit=model_cfg.num_units)

    def build_model(self) -> nn.Module:
        return UnitVocoder(self.model_cfg)

    def build_dataset(self, split: str, train: bool) -> Dataset:
        return UnitMels(self.units["splits"][split], self.units, self.model_cfg)

    def initialise(self, model: nn.Module) -> None:
        """Nothing to load: the vocoder starts from random weights."""

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int) -> torch.Tensor:
        return vocoder_losses(model, batch)["loss"]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        model.eval()
        totals: dict[str, float] = {}
        for start in range(0, len(dataset), self.cfg.eval_batch_size):
            batch = self.collate([dataset[i] for i in range(start, min(start + self.cfg.eval_batch_size, len(dataset)))])
            for key, value in vocoder_losses(model, batch).items():
                totals[key] = totals.get(key, 0.0) + value.item() * len(batch["units"])
        return {key: value / len(dataset) for key, value in totals.items()}


# ----------------------------------------------------------------------------------------
# Evaluation with the judges


def judge_speech(waves: list[np.ndarray | None], samples: list[Sample], images: list[np.ndarray],
                 retrievers: dict[str, ExpressionRetriever], grounder: Grounder | None,
                 recogniser: GrammarRecogniser | None) -> dict[str, Any]:
    """Each judge's score of `waves` (one per sample; None = nothing was said, a miss for every
    judge) against the samples' expressions and boxes. Judge 1 runs once per candidate set."""
    said = [index for index, wave in enumerate(waves) if wave is not None]
    scores: dict[str, Any] = {"count": len(waves), "silent": len(waves) - len(said)}
    for name, retriever in retrievers.items():
        heard = [text for start in range(0, len(said), 16)
                 for text in retriever.retrieve([waves[i] for i in said[start:start + 16]])]
        scores[f"judge1_csa_exact_{name}"] = sum(h == samples[i].key for h, i in zip(heard, said)) / len(waves)
    if grounder is not None:
        hits = 0
        for i in said:
            box = grounder.ground(images[i], waves[i]).box_xyxy
            hits += float(box_iou(np.asarray(box, np.float64), np.asarray(samples[i].box_xyxy, np.float64))) > 0.5
        scores["judge2_srec_acc50"] = hits / len(waves)
    if recogniser is not None:
        scores["judge3_pocketsphinx_exact"] = sum(recogniser.recognise(waves[i]) == samples[i].key
                                                  for i in said) / len(waves)
    return scores


def attribute_errors(meant: list[str | None], wanted: list[str]) -> dict[str, int]:
    """How the expressions meant differ from those wanted, per attribute: "colour_missing" (not
    said but needed), "colour_extra" (said, not needed), "colour_wrong" (another value), ...; an
    answer that says nothing counts once as "silent"."""
    counts: Counter[str] = Counter()
    for said_text, wanted_text in zip(meant, wanted):
        if said_text is None:
            counts["silent"] += 1
            continue
        said, target = parse_expression(said_text), parse_expression(wanted_text)
        for attribute in (f.name for f in fields(Expression)):
            have, need = getattr(said, attribute), getattr(target, attribute)
            if have != need:
                counts[f"{attribute}_{'missing' if have is None else 'extra' if need is None else 'wrong'}"] += 1
    return dict(counts.most_common())


def evaluate_main(args: argparse.Namespace) -> dict[str, Any]:
    """Judges the answers of `args.answer` for the split's scenes, beside the reference units
    resynthesised and the two ceilings; with `args.vocoder` instead, only the latter three (how
    well a unit inventory and its vocoder carry the expressions, before any decoder)."""
    cfg = load_train_config(args.config, args.overrides)
    settings = task_settings(cfg)
    if cfg.data.format != "refcoco":
        raise ValueError("evaluate judges Spoken Shapes expressions: data.format must be refcoco")
    judges = settings.judges
    answerer = Answerer.from_directory(args.answer, beam_size=settings.beam_size) if args.answer else None
    vocoder = answerer.vocoder if answerer else build_vocoder_from_checkpoint(args.vocoder)[0]
    units = read_units(settings.units)
    if args.split not in units["splits"]:
        raise ValueError(f"{settings.units.dir}/{UNITS_FILE} has no units for split {args.split!r} "
                         f"(it has {', '.join(units['splits'])})")
    if vocoder.cfg.num_units != units["num_units"]:
        raise ValueError(f"the vocoder speaks {vocoder.cfg.num_units} units but {settings.units.dir}/{UNITS_FILE} "
                         f"has {units['num_units']}: pass the vocoder trained on these units (task.units.dir)")
    samples = read_samples(cfg.data, args.split, judges.scenes)
    images = [read_rgb(s.image_path) for s in samples]
    ann = json.loads(refcoco_layout(cfg.data.dataset, cfg.data.root, cfg.data.ann_path).ann_path.read_text())
    dataset_audio = refcoco_layout(cfg.data.dataset, cfg.data.root).audio_root
    recordings = [load_audio_16k(dataset_audio / e["refs"][0]["speaker"] / f"{e['refs'][0]['sent_id']}.wav")
                  for e in ann[args.split][:len(samples)]]
    # Judge 1's candidates: every expression of the grammar, and (easier) the split's own expressions.
    retrievers: dict[str, ExpressionRetriever] = {}
    if judges.csa_checkpoint:
        retrievers["grammar"] = ExpressionRetriever.from_checkpoint(judges.csa_checkpoint, all_expressions())
        retrievers["split"] = ExpressionRetriever(retrievers["grammar"].csa, load_tokenizer(
            read_config(judges.csa_checkpoint).text_encoder), units["splits"][args.split])
    grounder = Grounder.from_checkpoint(judges.srec_checkpoint) if judges.srec_checkpoint else None
    recogniser = GrammarRecogniser() if judges.pocketsphinx else None
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    references = [units["utterances"][s.key]["units"] for s in samples]
    resynthesised = [vocoder.synthesise(u) for u in references]
    for index, wave in enumerate(resynthesised[:args.save_wavs]):
        sf.write(out_dir / f"{index:04d}_resynthesised.wav", wave, SAMPLE_RATE, subtype="PCM_16")
    report: dict[str, Any] = {
        "split": args.split, "answer": str(args.answer or ""), "vocoder": str(args.vocoder or ""),
        "units": {k: units[k] for k in ("source", "layer", "num_units")},
        "units_per_utterance": float(np.mean([len(u) for u in references])),
    }
    conditions: dict[str, list[np.ndarray | None]] = {}
    if answerer is not None:
        started = time.perf_counter()
        generated_units = [answerer.answer_units(image, s.box_xyxy) for image, s in zip(images, samples)]
        decode_s = time.perf_counter() - started
        started = time.perf_counter()
        conditions["generated"] = [vocoder.synthesise(u) if u else None for u in generated_units]
        vocode_s = time.perf_counter() - started
        for index, wave in enumerate(conditions["generated"][:args.save_wavs]):
            if wave is not None:
                sf.write(out_dir / f"{index:04d}_generated.wav", wave, SAMPLE_RATE, subtype="PCM_16")
        meant = [answerer.text_of(u) if u else None for u in generated_units]
        report.update({"decode_s_per_answer": decode_s / len(samples), "vocode_s_per_answer": vocode_s / len(samples),
                       **unit_scores(generated_units, references),
                       "lexicon_text_exact": float(np.mean([m == s.key for m, s in zip(meant, samples)])),
                       "attribute_errors": attribute_errors(meant, [s.key for s in samples])})
    conditions["resynthesised_reference_units"] = resynthesised
    conditions["answer_voice_espeak"] = [load_audio_16k(units["utterances"][s.key]["audio"]) for s in samples]
    conditions["dataset_recording"] = recordings
    for name, waves in conditions.items():
        report[name] = judge_speech(waves, samples, images, retrievers, grounder, recogniser)
        logger.info("%s: %s", name, report[name])
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


def bundle_main(args: argparse.Namespace) -> Path:
    """An answer directory (csref_model.im2sp.Answerer.from_directory) from the trained parts, with
    the training split's expressions and their units as the lexicon."""
    cfg = load_train_config(args.config, args.overrides)
    units = read_units(task_settings(cfg).units)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for part, source in ((ANSWER_DECODER, args.decoder), (ANSWER_VOCODER, args.vocoder)):
        target = out / part
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
        for name in ("model.safetensors", "config.yaml"):
            shutil.copy2(Path(source) / name, target / name)
    lexicon = {key: units["utterances"][key]["units"] for key in units["splits"][cfg.data.train_split]}
    (out / ANSWER_LEXICON).write_text(json.dumps(lexicon, indent=0))
    Answerer.from_directory(out)  # fails here, not on the robot, if the parts do not fit
    print(f"answer directory: {out} ({len(lexicon)} expressions in the lexicon)")
    return out


def main(argv: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if argv is None else argv
    commands = ("units", "vocoder", "evaluate", "bundle")
    if not argv or argv[0] not in commands:
        return trainer.main(Im2SpTask, __doc__.split("\n")[0], argv)
    if argv[0] == "vocoder":
        return trainer.main(VocoderTask, "Im2Sp: train the unit vocoder (units -> log-mel; Griffin-Lim)", argv[1:])
    parser = argparse.ArgumentParser(prog=f"python -m csref_training.im2sp {argv[0]}")
    parser.add_argument("--config", required=True, help="the Im2Sp training YAML (its data and task sections)")
    if argv[0] == "evaluate":
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--answer", help="answer directory (the bundle command makes one): judge its answers")
        source.add_argument("--vocoder", help="a unit vocoder checkpoint: judge only the reference units "
                                              "resynthesised (and the ceilings), to compare unit inventories")
        parser.add_argument("--split", default="test")
        parser.add_argument("--out", required=True, help="directory for report.json and example WAVs")
        parser.add_argument("--save-wavs", type=int, default=8, help="generated/resynthesised WAVs to keep")
    elif argv[0] == "bundle":
        parser.add_argument("--decoder", required=True)
        parser.add_argument("--vocoder", required=True)
        parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the training YAML")
    args = parser.parse_intermixed_args(argv[1:])
    if argv[0] in ("units", "evaluate"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if argv[0] == "units":
            return build_units(load_train_config(args.config, args.overrides))
        return evaluate_main(args) if argv[0] == "evaluate" else bundle_main(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
