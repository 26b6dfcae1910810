"""Writing a Spoken Shapes dataset in the RefCOCO-speech layout (docs/SPOKEN_SHAPES.md,
"On-disk layout"); see the package docstring for the files and the annotation entries.

Determinism: every sample draws from its own numpy generator seeded by (seed, split, index),
so the output is identical for any number of workers. The scene caption (`SynthConfig.captions`)
draws from a second generator seeded by (seed, split, index, CAPTION_STREAM), so turning captions
on leaves every other byte of the dataset unchanged.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
import soundfile as sf
from tqdm import tqdm

from csref_model.audio import SAMPLE_RATE
from csref_training.spoken_shapes.grammar import CARRIER_PHRASES, caption_words, describe, overspecify, scene_caption
from csref_training.spoken_shapes.render import BACKGROUNDS, make_background, object_label_map, render_scene
from csref_training.spoken_shapes.scene import sample_layout
from csref_training.spoken_shapes.speech import (
    TRAIN_VOICES,
    check_voices,
    parse_voice,
    render_speech,
    render_word_sequence,
    speaker_dir_name,
)

SPLITS = ("train", "val", "test")
JPEG_QUALITY = 92
MASK_DIR = "masks"
MASK_SPLITS = ("val", "test")  # train too with SynthConfig.train_masks
CAPTION_STREAM = 1  # the fourth seed word of the caption's generator
CAPTION_ORDERS = ("left-to-right", "random")


def caption_dataset_name(dataset_name: str) -> str:
    """The audio directory of the scene captions: audios/<dataset>_captions/<speaker>/<iid>.wav."""
    return f"{dataset_name}_captions"


@dataclass(frozen=True)
class SynthConfig:
    out: Path
    dataset_name: str = "spoken_shapes"
    seed: int = 0
    voices: tuple[str, ...] = TRAIN_VOICES
    rate_range: tuple[int, int] = (130, 210)
    pitch_range: tuple[int, int] = (20, 80)
    snr_db_range: tuple[float, float] = (10.0, 40.0)
    noise_prob: float = 0.5  # fraction of utterances with additive noise; 0 = none
    carrier_prob: float = 0.5
    backgrounds: tuple[str, ...] = BACKGROUNDS
    image_size_range: tuple[int, int] = (320, 640)
    scene_scale: tuple[float, float] | None = None  # None: scene.SMALL_EXTENT / BIG_EXTENT for every scene
    # Also speak a whole-scene caption per image, with word alignments (image<->speech retrieval).
    captions: bool = False
    # The order in which a caption names the objects: "left-to-right", or "random" (drawn per
    # caption), so that the order itself tells nothing of the layout.
    caption_order: str = "left-to-right"
    # Every object's mask for the val and test scenes (evaluation of referring masks only; no
    # training stage reads them): <out>/masks/<iid:012d>.png, pixel = object index + 1.
    masks: bool = False
    # Also the train scenes' masks: only for the fully supervised upper bound of the S+S+C table
    # (python -m csref_training.ssc select --method truth); weakly supervised training never reads them.
    train_masks: bool = False
    # Up to this many referents per scene, each its own entry (same iid, sent_id = iid * this + r);
    # objects without a unique description are never referents.
    referents_per_scene: int = 1
    # Draw an engine uniformly among those in `voices`, then one of its voices; False draws a voice
    # uniformly, so an engine weighs as much as its number of voices (espeak-ng has hundreds).
    balance_engines: bool = False
    # Each attribute a training command leaves out is named anyway with this probability
    # (grammar.overspecify); validation and test commands stay the shortest. 0 keeps the datasets
    # byte-identical to those generated before the option.
    overspecify_prob: float = 0.0


def generate_sample(cfg: SynthConfig, split: str, index: int, iid: int) -> list[dict]:
    """Generates and writes one scene (image, each referent's utterance, its mask file where
    asked) and returns its annotation entries: one per referent, all with the same `iid`."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    width, height = (int(rng.integers(cfg.image_size_range[0], cfg.image_size_range[1] + 1)) for _ in range(2))
    background = make_background(rng, width, height, cfg.backgrounds[rng.integers(len(cfg.backgrounds))])
    objects, target, expression = sample_layout(rng, background, cfg.scene_scale)
    image = render_scene(rng, background, objects)
    cv2.imwrite(str(cfg.out / "images" / f"{iid:012d}.jpg"), image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])

    targets = [(target, expression)]
    if cfg.referents_per_scene > 1:
        # Only this option draws more from `rng`, so datasets without it stay byte-identical.
        for other in rng.permutation(len(objects)):
            if len(targets) == cfg.referents_per_scene:
                break
            other_expression = describe(int(other), objects, width, height, rng) if other != target else None
            if other_expression is not None:
                targets.append((int(other), other_expression))
    if cfg.overspecify_prob > 0 and split == "train":
        targets = [(index, overspecify(expr, index, objects, width, height, rng, cfg.overspecify_prob))
                   for index, expr in targets]
    scene = {
        # Every object of the scene, for the class-agnostic detector and failure analysis by kind;
        # grounding never reads them.
        "objects": [{"bbox": _xywh(obj.box), "shape": obj.shape, "colour": obj.colour, "size": obj.size}
                    for obj in objects],
    }
    if cfg.masks and (split in MASK_SPLITS or cfg.train_masks):
        mask_file = f"{MASK_DIR}/{iid:012d}.png"
        cv2.imwrite(str(cfg.out / mask_file), object_label_map(height, width, objects))
        scene["mask_file"] = mask_file
    if cfg.captions:
        scene["caption"] = generate_caption(cfg, split, index, iid, objects)
    entries = []
    for referent, (target_index, target_expression) in enumerate(targets):
        sent_id = iid * cfg.referents_per_scene + referent
        entries.append({
            "iid": iid,
            "bbox": _xywh(objects[target_index].box),
            **scene,
            "target_index": target_index,
            "sent_ids": [sent_id],
            "refs": [_utterance(cfg, rng, target_expression.text, sent_id)],
        })
    return entries


def pick_voice(cfg: SynthConfig, rng: np.random.Generator) -> str:
    """One voice of `cfg.voices`, uniformly, or uniformly within an engine drawn uniformly."""
    if not cfg.balance_engines:
        return cfg.voices[rng.integers(len(cfg.voices))]
    engines = sorted({parse_voice(voice).engine for voice in cfg.voices})
    engine = engines[rng.integers(len(engines))]
    candidates = [voice for voice in cfg.voices if parse_voice(voice).engine == engine]
    return candidates[rng.integers(len(candidates))]


def _utterance(cfg: SynthConfig, rng: np.random.Generator, text: str, sent_id: int) -> dict:
    """Speaks `text` (after a carrier phrase, sometimes), writes its WAV and returns its ref."""
    if rng.random() < cfg.carrier_prob:
        text = f"{CARRIER_PHRASES[rng.integers(len(CARRIER_PHRASES))]} {text}"
    voice = pick_voice(cfg, rng)
    rate = int(rng.integers(cfg.rate_range[0], cfg.rate_range[1] + 1))
    pitch = int(rng.integers(cfg.pitch_range[0], cfg.pitch_range[1] + 1))
    snr_db = float(round(rng.uniform(*cfg.snr_db_range), 2)) if rng.random() < cfg.noise_prob else None
    wave = render_speech(rng, text, voice, rate, pitch, snr_db)
    speaker = speaker_dir_name(voice)
    audio_dir = cfg.out / "audios" / cfg.dataset_name / speaker
    audio_dir.mkdir(parents=True, exist_ok=True)
    sf.write(audio_dir / f"{sent_id}.wav", wave, SAMPLE_RATE, subtype="PCM_16")
    return {"sent_id": sent_id, "sent": text, "speaker": speaker, "rate": rate, "pitch": pitch, "snr_db": snr_db}


def generate_caption(cfg: SynthConfig, split: str, index: int, iid: int, objects: list) -> dict:
    """Speaks the scene's caption word by word (exact word alignments), writes it to
    audios/<dataset>_captions/<speaker>/<iid>.wav and returns its entry."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index, CAPTION_STREAM])
    voice = pick_voice(cfg, rng)
    rate = int(rng.integers(cfg.rate_range[0], cfg.rate_range[1] + 1))
    pitch = int(rng.integers(cfg.pitch_range[0], cfg.pitch_range[1] + 1))
    snr_db = float(round(rng.uniform(*cfg.snr_db_range), 2)) if rng.random() < cfg.noise_prob else None
    if cfg.caption_order == "random":
        ordered = [objects[i] for i in rng.permutation(len(objects))]
    else:
        ordered = sorted(objects, key=lambda o: o.cx)
    text = scene_caption(ordered)
    words = caption_words(text)
    wave, spans = render_word_sequence(rng, words, voice, rate, pitch, snr_db)
    speaker = speaker_dir_name(voice)
    audio_dir = cfg.out / "audios" / caption_dataset_name(cfg.dataset_name) / speaker
    audio_dir.mkdir(parents=True, exist_ok=True)
    sf.write(audio_dir / f"{iid}.wav", wave, SAMPLE_RATE, subtype="PCM_16")
    return {
        "sent_id": iid,
        "sent": text,
        "speaker": speaker,
        "rate": rate,
        "pitch": pitch,
        "snr_db": snr_db,
        "words": [{"word": word, "start": round(start, 4), "end": round(end, 4)}
                  for word, (start, end) in zip(words, spans)],
    }


def _xywh(box: tuple[float, float, float, float]) -> list[float]:
    x0, y0, x1, y1 = box
    return [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)]


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already


def _generate_job(args: tuple[SynthConfig, str, int, int]) -> list[dict]:
    return generate_sample(*args)


def generate_dataset(cfg: SynthConfig, counts: dict[str, int], workers: int = 1, progress: bool = False) -> dict:
    """Writes the whole dataset under cfg.out and returns the annotation dict."""
    ann_path = cfg.out / "anns" / f"{cfg.dataset_name}.json"
    if ann_path.exists():
        raise FileExistsError(f"{ann_path} already exists; choose another --out or --dataset-name, or delete it")
    check_voices(list(cfg.voices))
    if cfg.referents_per_scene < 1:
        raise ValueError(f"referents_per_scene must be >= 1, got {cfg.referents_per_scene}")
    if not 0 <= cfg.overspecify_prob <= 1:
        raise ValueError(f"overspecify_prob must be in [0, 1], got {cfg.overspecify_prob}")
    if cfg.train_masks and not cfg.masks:
        raise ValueError("train_masks needs masks (the train masks come on top of the val/test ones)")
    if cfg.caption_order not in CAPTION_ORDERS:
        raise ValueError(f"caption_order must be one of {', '.join(CAPTION_ORDERS)}, got {cfg.caption_order!r}")
    for sub in ("anns", "images", *((MASK_DIR,) if cfg.masks else ())):
        (cfg.out / sub).mkdir(parents=True, exist_ok=True)
    jobs, next_iid = [], 0
    for split in SPLITS:
        for index in range(counts.get(split, 0)):
            jobs.append((cfg, split, index, next_iid))
            next_iid += 1
    annotations: dict[str, list] = {split: [] for split in SPLITS}
    if workers > 1:
        # forkserver: workers never inherit a parent's thread pools (torch, OpenCV), which fork can deadlock.
        ctx = multiprocessing.get_context("forkserver")
        with ctx.Pool(workers, initializer=_init_worker) as pool:
            results = _with_progress(pool.imap(_generate_job, jobs, chunksize=8), len(jobs), progress)
            for (_, split, _, _), entries in zip(jobs, results):
                annotations[split].extend(entries)
    else:
        for job, entries in zip(jobs, _with_progress(map(_generate_job, jobs), len(jobs), progress)):
            annotations[job[1]].extend(entries)
    tmp = ann_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(annotations))
    os.replace(tmp, ann_path)
    return annotations


def _with_progress(entries: Iterable[list[dict]], total: int, enabled: bool) -> Iterable[list[dict]]:
    return tqdm(entries, total=total, unit="sample") if enabled else entries
