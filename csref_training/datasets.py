"""Datasets for SREC (image + speech -> box) and CSA (speech <-> text), real and synthetic alike.

Formats
-------
* RefCOCO-speech layout (``format: refcoco``): an annotation JSON keyed by split, each entry
  ``{"iid", "bbox" | "fbox": [x, y, w, h], "sent_ids": [...], "refs": [{"sent_id", "sent"}]}``,
  images named from ``iid``, and ``<audio_root>/<speaker>/<sent_id>.wav``. Known names
  (``DATASET_LAYOUTS``): refcoco_speech, refcoco+_speech, refcocog_speech (``bbox``) and
  srefface, srefface+, sreffaceg (``fbox``, audio from refcoco_speech), with COCO's
  ``images/train2014/COCO_train2014_%012d.jpg``. Any other name is a Spoken Shapes style set
  (``csref_training.spoken_shapes``): ``anns/<name>.json``, ``images/%012d.jpg``, ``audios/<name>/``.
  ``image_pattern`` names the image files of any other naming: printf style
  (``COCO_train2014_%012d.jpg``) or ``{iid}`` style (``{iid}.png``, ``img_{iid:06d}.jpg``).
* Hugging Face variant (``format: hf``): a local copy of the reference's HF datasets, either a
  ``save_to_disk`` directory (``DatasetDict``) or a dataset repository snapshot (parquet/arrow
  files) loaded with ``datasets.load_dataset(local_dir)``; nothing is downloaded. Columns
  ``image``, ``bbox``/``fbox``, ``image_id``, ``sent_ids``, ``audios`` (list of audio; either HF
  ``Audio`` cells, read here without torchcodec, or ``{"array", "sampling_rate"}`` structs).
* LibriSpeech (``format: librispeech``, CSA): ``<root>/<subset>/<spk>/<chapter>/*.flac`` with
  ``<spk>-<chapter>.trans.txt``. Split ``train`` / ``val`` / ``test`` are the reference's unions of
  subsets; subset names can also be joined with ``+``.
* CSA pairs from a RefCOCO-layout set: every (sentence, speaker) of its ``refs``.

Speakers. ``speakers`` picks the speaker directories to read (default: every one present). A
sentence is read from whichever selected speaker directory has ``<sent_id>.wav``: in the
official data every speaker has every sentence, in Spoken Shapes each sentence has one voice.
A sentence that only unselected speakers have is left out (an entry left with none is dropped),
so ``speakers`` also picks one voice's share of a Spoken Shapes split.
Training draws one sentence and one speaker per entry each time an item is read (the
reference's behaviour; the global numpy RNG, which the trainer seeds per item); evaluation
enumerates every (entry, sentence, speaker) once, in file order.

Splits are joined with ``+`` (``train+val``). Every entry is checked when the dataset is built:
a missing image or audio file, an unreadable file, a box outside the image (by more than
``BOX_TOLERANCE_PX``) or without area, an empty sentence (for CSA) raise ``BrokenEntryError``
naming the file and the entry, or with ``skip_broken=True`` the entry is left out, counted in
``num_broken`` and listed in ``broken``.

Augmentation. Given an enabled ``AugmentConfig`` (``csref_training.augment``), a training
dataset passes each waveform through a ``WaveformAugmenter`` (speed, pitch, formants, room,
babble, pink noise, band limit), whose babble talkers are the dataset's own utterances (all of
the split's audio files, clean). The build functions hand it to training datasets only:
validation and test always read clean speech. Its Generator is drawn from the global numpy RNG,
which the trainer seeds per item, so an item's augmentation depends only on its seed.

Items are raw: the letterboxed image, its ``Letterbox`` geometry, the normalised (cx, cy, w, h)
target, the original-pixel box and the prepared 16 kHz waveform (``csref_model.preprocessing``);
``collate_srec`` / ``collate_csa`` build the padded, normalised speech batch.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np
import soundfile as sf
import torch
from PIL import Image
from torch.utils.data import Dataset

from csref_model.audio import SAMPLE_RATE, load_audio, load_audio_16k, resample
from csref_model.preprocessing import letterbox, prepare_waveform, speech_batch
from csref_training.augment import AugmentConfig, WaveformAugmenter
from csref_training.train_config import DataConfig

logger = logging.getLogger(__name__)

# COCO boxes sometimes overhang the image by rounding; more than this is a broken entry.
BOX_TOLERANCE_PX = 1.0
LIBRISPEECH_SPLITS = {
    "train": ("train-clean-100", "train-clean-360", "train-other-500"),
    "val": ("dev-clean", "dev-other"),
    "test": ("test-clean", "test-other"),
}


class BrokenEntryError(ValueError):
    """An annotation entry whose files or fields cannot be used."""


# --------------------------------------------------------------------------------------
# Where a RefCOCO-layout dataset lives
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RefCocoLayout:
    ann_path: Path
    image_dir: Path
    image_pattern: str  # file name from iid, e.g. "COCO_train2014_%012d.jpg" or "{iid}.png"
    audio_root: Path  # holds one directory per speaker
    box_key: str  # "bbox" or "fbox"


# name -> (annotation file, audio set, box key), paths relative to the data root.
DATASET_LAYOUTS = {
    "refcoco_speech": ("anns/general_object/refcoco_speech.json", "refcoco_speech", "bbox"),
    "refcoco+_speech": ("anns/general_object/refcoco+_speech.json", "refcoco+_speech", "bbox"),
    "refcocog_speech": ("anns/general_object/refcocog_speech.json", "refcocog_speech", "bbox"),
    "srefface": ("anns/face_centric/srefface.json", "refcoco_speech", "fbox"),
    "srefface+": ("anns/face_centric/srefface+.json", "refcoco_speech", "fbox"),
    "sreffaceg": ("anns/face_centric/sreffaceg.json", "refcoco_speech", "fbox"),
}
COCO_IMAGE_DIR = "images/train2014"
COCO_IMAGE_PATTERN = "COCO_train2014_%012d.jpg"
SYNTH_IMAGE_DIR = "images"
SYNTH_IMAGE_PATTERN = "%012d.jpg"


def box_key_for(dataset: str) -> str:
    """The box field of a dataset: "fbox" for the face-centric sets, else "bbox"."""
    return DATASET_LAYOUTS[dataset][2] if dataset in DATASET_LAYOUTS else "bbox"


def image_file_name(pattern: str, iid: int) -> str:
    """The image file name of annotation `iid`: "{iid}..." patterns by str.format, others by %."""
    return pattern.format(iid=iid) if "{" in pattern else pattern % iid


def check_image_pattern(pattern: str) -> str:
    """`pattern` if it turns every iid into its own file name; else a ValueError saying how to write it."""
    try:
        names = {image_file_name(pattern, iid) for iid in (1, 2)}
    except (TypeError, ValueError, KeyError, IndexError) as err:
        names = {f"error: {err}"}
    if len(names) != 2 or any("/" in name for name in names):
        raise ValueError(f"data.image_pattern {pattern!r} does not name one file per image id: use one "
                         "placeholder, printf style ('COCO_train2014_%012d.jpg') or {iid} style ('{iid}.png', "
                         "'img_{iid:06d}.jpg'), and put directories into data.image_dir")
    return pattern


def refcoco_layout(
    dataset: str,
    root: str | Path = "data",
    ann_path: str | Path | None = None,
    image_dir: str | Path | None = None,
    audio_root: str | Path | None = None,
    image_pattern: str | None = None,
) -> RefCocoLayout:
    """Default paths and image names of `dataset` under `root`; explicit values replace them as given."""
    root = Path(root)
    if dataset in DATASET_LAYOUTS:
        ann, audio_set, box_key = DATASET_LAYOUTS[dataset]
        default = RefCocoLayout(root / ann, root / COCO_IMAGE_DIR, COCO_IMAGE_PATTERN, root / "audios" / audio_set, box_key)
    else:
        default = RefCocoLayout(root / "anns" / f"{dataset}.json", root / SYNTH_IMAGE_DIR, SYNTH_IMAGE_PATTERN,
                                root / "audios" / dataset, "bbox")
    return RefCocoLayout(
        ann_path=Path(ann_path) if ann_path else default.ann_path,
        image_dir=Path(image_dir) if image_dir else default.image_dir,
        image_pattern=check_image_pattern(image_pattern) if image_pattern else default.image_pattern,
        audio_root=Path(audio_root) if audio_root else default.audio_root,
        box_key=default.box_key,
    )


# --------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------
def _check_box(box: Any, width: int, height: int, where: str) -> tuple[float, float, float, float]:
    """The entry's x, y, w, h as floats, or BrokenEntryError if unusable for a w x h image."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise BrokenEntryError(f"{where}: box must be [x, y, w, h], got {box!r}")
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError) as err:
        raise BrokenEntryError(f"{where}: box {box!r} is not four numbers") from err
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise BrokenEntryError(f"{where}: box {box!r} has no area or is not finite")
    t = BOX_TOLERANCE_PX
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        raise BrokenEntryError(f"{where}: box [x, y, w, h] = {box!r} lies outside the {width}x{height} image")
    return x, y, w, h


def _check_audio_file(path: Path, where: str) -> None:
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as err:
        raise BrokenEntryError(f"{where}: unreadable audio file {path}: {err}") from err
    if info.frames == 0:
        raise BrokenEntryError(f"{where}: audio file {path} holds no samples")


def _read_waveform(path: Path, use_trim: bool, max_duration: float | None, where: str) -> np.ndarray:
    """16 kHz float32 waveform of an audio file, trimmed and capped as configured."""
    try:
        wave, sample_rate = load_audio(path)
        return _prepare(wave, sample_rate, use_trim, max_duration)
    except (ValueError, FileNotFoundError) as err:
        raise BrokenEntryError(f"{where}: {path}: {err}") from err


def _prepare(wave: np.ndarray, sample_rate: int, use_trim: bool, max_duration: float | None) -> np.ndarray:
    wave = prepare_waveform(wave, sample_rate, trim=use_trim)
    if max_duration is not None:
        wave = wave[: int(max_duration * SAMPLE_RATE)]
    return wave


class _UtteranceFiles:
    """The clean 16 kHz waveforms of a list of audio files, by index: a dataset's babble talkers."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        return load_audio_16k(self.paths[index])


def _augmenter(augment: AugmentConfig | None, num_utterances: int,
               read_utterance: Callable[[int], np.ndarray]) -> WaveformAugmenter | None:
    """The augmenter of an enabled config (else None), drawing babble from the dataset's utterances."""
    if augment is None or not augment.enabled:
        return None
    return WaveformAugmenter(augment, num_utterances, read_utterance)


def _augmented(augmenter: WaveformAugmenter | None, wave: np.ndarray, max_duration: float | None) -> np.ndarray:
    if augmenter is None:
        return wave
    # The trainer seeds the global numpy RNG per item (reproducibility.SeededItems): a Generator
    # drawn from it makes the augmentation depend on the item's seed only, so resumption is exact.
    wave = augmenter(wave, np.random.default_rng(np.random.randint(2**31)))
    # Slowing down lengthens the utterance; the cap still holds.
    return wave if max_duration is None else wave[: int(max_duration * SAMPLE_RATE)]


def _letterboxed_item(image: np.ndarray, box_xywh: tuple[float, ...] | None, image_size: int) -> dict[str, Any]:
    """Letterboxed image and its box; without a box (weak supervision) an all-zero label ("no
    object", as the reference) and a NaN ground truth that evaluation skips."""
    tensor, geometry = letterbox(image, image_size)  # (3, S, S)
    if box_xywh is None:
        return {"image": tensor, "letterbox": geometry, "label": torch.zeros(4),
                "gt_xyxy": torch.full((4,), float("nan"), dtype=torch.float64)}
    x, y, w, h = box_xywh
    xyxy = np.array([x, y, x + w, y + h], dtype=np.float64)
    return {
        "image": tensor,
        "letterbox": geometry,
        "label": torch.from_numpy(geometry.box_to_label(xyxy)).float(),  # (4,) cx, cy, w, h in [0, 0.99]
        "gt_xyxy": torch.from_numpy(xyxy),  # (4,) original pixels
    }


class _BrokenLog:
    """Collects broken entries when skipping, raises on the first one otherwise."""

    def __init__(self, skip: bool, source: str) -> None:
        self.skip = skip
        self.source = source
        self.messages: list[str] = []

    def add(self, err: BrokenEntryError) -> None:
        if not self.skip:
            raise err
        self.messages.append(str(err))

    def report(self) -> None:
        if self.messages:
            logger.warning("%s: skipped %d broken entries, e.g. %s", self.source, len(self.messages), self.messages[0])


def _split_names(split: str) -> list[str]:
    names = [s for s in split.split("+") if s]
    if not names:
        raise ValueError(f"empty split {split!r}; give split names joined with '+', e.g. 'train+val'")
    return names


# --------------------------------------------------------------------------------------
# RefCOCO-speech layout
# --------------------------------------------------------------------------------------
class SpeakerIndex:
    """Which selected speaker directories under `audio_root` hold which `<sent_id>.wav`."""

    def __init__(self, audio_root: Path, speakers: Sequence[str] | None) -> None:
        if not audio_root.is_dir():
            others = sorted(d.name for d in os.scandir(audio_root.parent) if d.is_dir()) if audio_root.parent.is_dir() else []
            hint = (f"; {audio_root.parent} holds {', '.join(others)}: is data.dataset (evaluate --dataset) one of "
                    "those?" if others else "")
            raise FileNotFoundError(f"audio directory not found: {audio_root} (expected <audio_root>/<speaker>/<sent_id>.wav)"
                                    f"{hint}")
        present = sorted(d.name for d in os.scandir(audio_root) if d.is_dir())
        if speakers is None:
            if not present:
                raise FileNotFoundError(f"no speaker directories in {audio_root}")
            speakers = present
        missing = [s for s in speakers if s not in present]
        if missing:
            raise FileNotFoundError(
                f"speaker directories {missing} not found in {audio_root}; present: {present[:20]}"
                f"{' ...' if len(present) > 20 else ''}"
            )
        self.audio_root = audio_root
        self.speakers = list(speakers)
        self._files = {s: set(os.listdir(audio_root / s)) for s in self.speakers}
        self._unselected_files = set().union(*(os.listdir(audio_root / s) for s in present if s not in self._files))

    def find(self, sent_id: int) -> list[tuple[str, Path]]:
        """(speaker, path) for every selected speaker that has the sentence."""
        name = f"{sent_id}.wav"
        return [(s, self.audio_root / s / name) for s in self.speakers if name in self._files[s]]

    def unselected_have(self, sent_id: int) -> bool:
        """True when a speaker left out of the selection has the sentence: with no selected one
        having it, the speaker choice leaves it out; it is not a missing file (Spoken Shapes has
        one voice per sentence)."""
        return f"{sent_id}.wav" in self._unselected_files


@dataclass(frozen=True)
class Utterance:
    sent_id: int
    text: str
    speaker: str
    audio_path: Path


@dataclass(frozen=True)
class RefEntry:
    where: str  # "<ann file> <split>[<index>] (iid <iid>)", for messages
    iid: int
    box_xywh: tuple[float, float, float, float] | None  # None: box-free data (weak supervision)
    image_path: Path | None
    sentences: tuple[tuple[Utterance, ...], ...]  # per sent_id: one utterance per speaker


def load_refcoco_entries(
    ann_path: Path,
    split: str,
    speakers: SpeakerIndex,
    box_key: str = "bbox",
    image_dir: Path | None = None,
    image_pattern: str = SYNTH_IMAGE_PATTERN,
    need_text: bool = False,
    skip_broken: bool = False,
    need_box: bool = True,
) -> tuple[list[RefEntry], list[str]]:
    """Checked entries of the `split` (joined with '+') of a RefCOCO-layout annotation file.

    With `image_dir` the image and box are checked too (SREC); without, only speech and text
    (CSA). With `need_box=False` an entry may have no box (box-free data for weak supervision).
    Returns (entries, messages of the skipped broken entries).
    """
    if not ann_path.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_path}")
    with open(ann_path) as f:
        annotations = json.load(f)
    if not isinstance(annotations, dict):
        raise ValueError(f"{ann_path}: expected an object keyed by split name, got {type(annotations).__name__}")
    broken = _BrokenLog(skip_broken, str(ann_path))
    image_sizes: dict[Path, tuple[int, int]] = {}
    entries = []
    for split_name in _split_names(split):
        if split_name not in annotations:
            raise ValueError(f"{ann_path} has no split {split_name!r}; it has {sorted(annotations)}")
        for index, raw in enumerate(annotations[split_name]):
            where = f"{ann_path} {split_name}[{index}] (iid {raw.get('iid') if isinstance(raw, dict) else '?'})"
            try:
                entry = _check_entry(raw, where, speakers, box_key, image_dir, image_pattern, need_text,
                                     image_sizes, need_box)
            except BrokenEntryError as err:
                broken.add(err)
                continue
            if entry is not None:
                entries.append(entry)
    broken.report()
    return entries, broken.messages


def _check_entry(
    raw: Any,
    where: str,
    speakers: SpeakerIndex,
    box_key: str,
    image_dir: Path | None,
    image_pattern: str,
    need_text: bool,
    image_sizes: dict[Path, tuple[int, int]],
    need_box: bool = True,
) -> RefEntry | None:
    """The checked entry; None when the speaker choice leaves out every one of its sentences."""
    if not isinstance(raw, dict) or "iid" not in raw or "sent_ids" not in raw:
        raise BrokenEntryError(f"{where}: entry needs 'iid' and 'sent_ids', got {str(raw)[:200]}")
    try:
        iid = int(raw["iid"])
        sent_ids = [int(s) for s in raw["sent_ids"]]
        texts = {int(r["sent_id"]): str(r.get("sent", "")) for r in raw.get("refs", []) if "sent_id" in r}
    except (TypeError, ValueError) as err:
        raise BrokenEntryError(f"{where}: 'iid', 'sent_ids' and refs' 'sent_id' must be integers: {err}") from err
    box, image_path = None, None
    if image_dir is not None:
        if box_key not in raw and need_box:
            raise BrokenEntryError(f"{where}: entry has no {box_key!r} box (keys: {sorted(raw)}); for box-free "
                                   "data (weak supervision) set data.boxes=false")
        image_path = image_dir / image_file_name(image_pattern, iid)
        if image_path not in image_sizes:
            if not image_path.is_file():
                raise BrokenEntryError(f"{where}: image file not found: {image_path}")
            try:
                with Image.open(image_path) as im:
                    image_sizes[image_path] = im.size
            except OSError as err:
                raise BrokenEntryError(f"{where}: unreadable image file {image_path}: {err}") from err
        width, height = image_sizes[image_path]
        if box_key in raw:
            box = _check_box(raw[box_key], width, height, where)
    if not sent_ids:
        raise BrokenEntryError(f"{where}: 'sent_ids' is empty")
    sentences = []
    for sent_id in sent_ids:
        text = texts.get(sent_id, "").strip()
        if need_text and not text:
            raise BrokenEntryError(f"{where}: sentence {sent_id} has no text in 'refs'")
        found = speakers.find(sent_id)
        if not found:
            if speakers.unselected_have(sent_id):
                continue
            raise BrokenEntryError(
                f"{where}: audio file not found: {speakers.audio_root}/<speaker>/{sent_id}.wav "
                f"for none of the speakers {speakers.speakers[:10]}{' ...' if len(speakers.speakers) > 10 else ''}"
            )
        for _, path in found:
            _check_audio_file(path, where)
        sentences.append(tuple(Utterance(sent_id, text, speaker, path) for speaker, path in found))
    if not sentences:
        return None
    return RefEntry(where, iid, box, image_path, tuple(sentences))


def _audio_paths(entries: list[RefEntry]) -> list[Path]:
    """Every audio file of `entries` (each sentence of each speaker), in entry order."""
    return [u.audio_path for entry in entries for utterances in entry.sentences for u in utterances]


class _UtteranceChoice:
    """Training: one random sentence and speaker of an entry per read. Eval: all of them, listed."""

    def __init__(self, entries: list[RefEntry], train: bool) -> None:
        self.entries = entries
        self.train = train
        self.items = (
            [(e, None, None) for e in range(len(entries))]
            if train
            else [(e, s, u) for e, entry in enumerate(entries)
                  for s, utterances in enumerate(entry.sentences) for u in range(len(utterances))]
        )

    def __len__(self) -> int:
        return len(self.items)

    def pick(self, index: int) -> tuple[RefEntry, Utterance]:
        e, s, u = self.items[index]
        entry = self.entries[e]
        if self.train:
            utterances = entry.sentences[np.random.randint(len(entry.sentences))]
            return entry, utterances[np.random.randint(len(utterances))]
        return entry, entry.sentences[s][u]


class SpeechGroundingDataset(Dataset):
    """SREC items from the RefCOCO-speech layout (real or Spoken Shapes)."""

    def __init__(
        self,
        layout: RefCocoLayout,
        split: str,
        image_size: int,
        speakers: Sequence[str] | None = None,
        train: bool = False,
        use_trim: bool = True,
        max_duration: float | None = None,
        skip_broken: bool = False,
        augment: AugmentConfig | None = None,
        need_box: bool = True,
    ) -> None:
        self.layout = layout
        self.image_size = image_size
        self.use_trim = use_trim
        self.max_duration = max_duration
        self.speakers = SpeakerIndex(layout.audio_root, speakers)
        entries, self.broken = load_refcoco_entries(
            layout.ann_path, split, self.speakers, layout.box_key, layout.image_dir, layout.image_pattern,
            need_text=False, skip_broken=skip_broken, need_box=need_box,
        )
        self.num_broken = len(self.broken)
        self.choice = _UtteranceChoice(entries, train)
        if len(self.choice) == 0:
            raise ValueError(f"{layout.ann_path} split {split!r} has no usable entries ({self.num_broken} broken)")
        talkers = _UtteranceFiles(_audio_paths(entries))
        self.augmenter = _augmenter(augment, len(talkers), talkers.read)

    def __len__(self) -> int:
        return len(self.choice)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry, utterance = self.choice.pick(index)
        image = cv2.imread(str(entry.image_path), cv2.IMREAD_COLOR)
        if image is None:
            raise BrokenEntryError(f"{entry.where}: cannot decode image {entry.image_path}")
        item = _letterboxed_item(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), entry.box_xywh, self.image_size)
        item.update(
            waveform=_augmented(self.augmenter, _read_waveform(utterance.audio_path, self.use_trim,
                                                               self.max_duration, entry.where), self.max_duration),
            sentence=utterance.text,
            sent_id=utterance.sent_id,
            iid=entry.iid,
            speaker=utterance.speaker,
            image_path=str(entry.image_path),
        )
        return item


class SpeechTextPairs(Dataset):
    """CSA (speech, text) pairs from a RefCOCO-layout dataset's refs."""

    def __init__(
        self,
        ann_path: Path,
        audio_root: Path,
        split: str,
        speakers: Sequence[str] | None = None,
        train: bool = False,
        use_trim: bool = True,
        max_duration: float | None = None,
        skip_broken: bool = False,
        augment: AugmentConfig | None = None,
    ) -> None:
        self.use_trim = use_trim
        self.max_duration = max_duration
        self.speakers = SpeakerIndex(audio_root, speakers)
        entries, self.broken = load_refcoco_entries(ann_path, split, self.speakers, need_text=True, skip_broken=skip_broken)
        self.num_broken = len(self.broken)
        # Each sentence is one pair; training draws its speaker, evaluation lists every one.
        per_sentence = [
            RefEntry(entry.where, entry.iid, entry.box_xywh, None, (utterances,))
            for entry in entries for utterances in entry.sentences
        ]
        self.choice = _UtteranceChoice(per_sentence, train)
        if len(self.choice) == 0:
            raise ValueError(f"{ann_path} split {split!r} has no usable sentences ({self.num_broken} broken)")
        talkers = _UtteranceFiles(_audio_paths(entries))
        self.augmenter = _augmenter(augment, len(talkers), talkers.read)

    def __len__(self) -> int:
        return len(self.choice)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry, utterance = self.choice.pick(index)
        return {
            "waveform": _augmented(self.augmenter, _read_waveform(utterance.audio_path, self.use_trim,
                                                                  self.max_duration, entry.where), self.max_duration),
            "text": utterance.text,
            "utt_id": f"{utterance.speaker}/{utterance.sent_id}",
        }


# --------------------------------------------------------------------------------------
# Hugging Face variant (local copy)
# --------------------------------------------------------------------------------------
HF_COLUMNS = ("image", "image_id", "sent_ids", "audios")


def load_hf_split(path: str | Path, split: str):
    """The rows of `split` (joined with '+') of a locally stored HF dataset, undecoded."""
    # Imported here: Hugging Face `datasets` is slow to import (pyarrow, pandas) and only the
    # `hf` format needs it.
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Hugging Face dataset directory not found: {path} (a save_to_disk directory or a local "
            "snapshot of the dataset repository; nothing is downloaded)"
        )
    if (path / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(path))
    else:
        splits = datasets.load_dataset(str(path))
    parts = []
    for name in _split_names(split):
        if name not in splits:
            raise ValueError(f"{path} has no split {name!r}; it has {sorted(splits)}")
        parts.append(splits[name])
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _hf_open_image(cell: Any, where: str) -> Image.Image:
    """An undecoded HF Image cell ({"bytes", "path"}) opened lazily (header read only)."""
    try:
        return Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"])
    except (OSError, TypeError, AttributeError, KeyError) as err:
        raise BrokenEntryError(f"{where}: unreadable image: {err}") from err


def _hf_image(cell: Any, where: str) -> np.ndarray:
    """An undecoded HF Image cell -> H x W x 3 uint8 RGB (greyscale and RGBA converted)."""
    try:
        return np.asarray(_hf_open_image(cell, where).convert("RGB"))
    except OSError as err:
        raise BrokenEntryError(f"{where}: unreadable image: {err}") from err


def _hf_audio_source(cell: Any) -> Any:
    return io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]


def _hf_check_audio(cell: Any, where: str) -> None:
    """Raises BrokenEntryError unless the audio cell holds samples (header read only)."""
    try:
        frames = len(cell["array"]) if "array" in cell else sf.info(_hf_audio_source(cell)).frames
    except (sf.LibsndfileError, RuntimeError, TypeError, KeyError, AttributeError) as err:
        raise BrokenEntryError(f"{where}: unreadable audio: {err}") from err
    if frames == 0:
        raise BrokenEntryError(f"{where}: empty audio in 'audios'")


def _hf_audio(cell: Any, where: str) -> tuple[np.ndarray, int]:
    """An undecoded HF Audio cell ({"bytes", "path"}) or an {"array", "sampling_rate"} struct."""
    try:
        if "array" in cell:
            return np.asarray(cell["array"], dtype=np.float32), int(cell["sampling_rate"])
        wave, sample_rate = sf.read(_hf_audio_source(cell), dtype="float32", always_2d=True)
        return wave.mean(axis=1, dtype=np.float32), int(sample_rate)
    except (sf.LibsndfileError, RuntimeError, TypeError, KeyError) as err:
        raise BrokenEntryError(f"{where}: unreadable audio: {err}") from err


class HFSpeechGroundingDataset(Dataset):
    """SREC items from a local copy of the reference's Hugging Face datasets.

    Rows are read lazily from the memory-mapped arrow files (the reference materialises the
    whole split). Images decode with PIL as the reference's HF path does; audio decodes with
    soundfile. Construction reads every row's image and audio headers once to find broken ones.
    """

    def __init__(
        self,
        path: str | Path,
        split: str,
        image_size: int,
        box_key: str = "bbox",
        train: bool = False,
        use_trim: bool = True,
        max_duration: float | None = None,
        skip_broken: bool = False,
        augment: AugmentConfig | None = None,
    ) -> None:
        self.source = f"{path} [{split}]"
        self.rows = load_hf_split(path, split).with_format("arrow")
        missing = [c for c in (*HF_COLUMNS, box_key) if c not in self.rows.column_names]
        if missing:
            raise ValueError(f"{self.source}: missing columns {missing}; it has {self.rows.column_names}")
        self.image_size = image_size
        self.box_key = box_key
        self.train = train
        self.use_trim = use_trim
        self.max_duration = max_duration
        broken = _BrokenLog(skip_broken, self.source)
        self.items: list[tuple[int, int | None]] = []  # (row, audio index; None = drawn per read)
        self.utterances: list[tuple[int, int]] = []  # (row, audio index) of every usable audio
        for row, record in enumerate(self._records()):
            try:
                num_audios = self._check_row(row, record)
            except BrokenEntryError as err:
                broken.add(err)
                continue
            self.items += [(row, None)] if train else [(row, a) for a in range(num_audios)]
            self.utterances += [(row, a) for a in range(num_audios)]
        broken.report()
        self.broken = broken.messages
        self.num_broken = len(self.broken)
        if not self.items:
            raise ValueError(f"{self.source} has no usable rows ({self.num_broken} broken)")
        self.augmenter = _augmenter(augment, len(self.utterances), self._read_utterance)

    def _read_utterance(self, index: int) -> np.ndarray:
        """Clean 16 kHz audio `index` of `utterances` (babble talkers)."""
        row, audio_index = self.utterances[index]
        record = self.rows[row].to_pylist()[0]
        return resample(*_hf_audio(record["audios"][audio_index], self._where(row, record)))

    def _records(self) -> Iterator[dict[str, Any]]:
        for batch in self.rows.iter(batch_size=64):
            yield from batch.to_pylist()

    def _where(self, row: int, record: dict[str, Any]) -> str:
        return f"{self.source} row {row} (image_id {record.get('image_id')})"

    def _check_row(self, row: int, record: dict[str, Any]) -> int:
        where = self._where(row, record)
        width, height = _hf_open_image(record["image"] or {}, where).size
        _check_box(record[self.box_key], width, height, where)
        audios = record["audios"] or []
        if not audios:
            raise BrokenEntryError(f"{where}: no audio in 'audios'")
        for cell in audios:
            _hf_check_audio(cell, where)
        return len(audios)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row, audio_index = self.items[index]
        record = self.rows[row].to_pylist()[0]
        where = self._where(row, record)
        audios = record["audios"]
        if audio_index is None:
            audio_index = np.random.randint(len(audios))
        item = _letterboxed_item(_hf_image(record["image"], where), tuple(float(v) for v in record[self.box_key]),
                                 self.image_size)
        wave, sample_rate = _hf_audio(audios[audio_index], where)
        try:
            wave = _prepare(wave, sample_rate, self.use_trim, self.max_duration)
        except ValueError as err:
            raise BrokenEntryError(f"{where}: audio {audio_index}: {err}") from err
        wave = _augmented(self.augmenter, wave, self.max_duration)
        sent_ids = record["sent_ids"] or []
        item.update(
            waveform=wave,
            sentence=None,
            sent_id=int(sent_ids[audio_index]) if audio_index < len(sent_ids) else None,
            iid=int(record["image_id"]),
            speaker=None,
            image_path=None,
        )
        return item


# --------------------------------------------------------------------------------------
# LibriSpeech (CSA)
# --------------------------------------------------------------------------------------
class LibriSpeechDataset(Dataset):
    """(speech, transcript) pairs of LibriSpeech subsets, in sorted file order."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        use_trim: bool = True,
        max_duration: float | None = None,
        skip_broken: bool = False,
        augment: AugmentConfig | None = None,
    ) -> None:
        root = Path(root)
        self.use_trim = use_trim
        self.max_duration = max_duration
        subsets = [s for name in _split_names(split) for s in LIBRISPEECH_SPLITS.get(name, (name,))]
        broken = _BrokenLog(skip_broken, f"{root} [{split}]")
        self.pairs: list[tuple[Path, str, str]] = []  # (flac, transcript, where)
        for subset in subsets:
            if not (root / subset).is_dir():
                raise FileNotFoundError(f"LibriSpeech subset not found: {root / subset}")
            for transcript_file in sorted((root / subset).glob("*/*/*.trans.txt")):
                for line_no, line in enumerate(transcript_file.read_text().splitlines(), start=1):
                    if not line.strip():
                        continue
                    utt_id, _, text = line.strip().partition(" ")
                    where = f"{transcript_file}:{line_no} ({utt_id})"
                    flac = transcript_file.parent / f"{utt_id}.flac"
                    try:
                        if not text.strip():
                            raise BrokenEntryError(f"{where}: empty transcript")
                        if not flac.is_file():
                            raise BrokenEntryError(f"{where}: audio file not found: {flac}")
                        _check_audio_file(flac, where)
                    except BrokenEntryError as err:
                        broken.add(err)
                        continue
                    self.pairs.append((flac, text.strip(), where))
        broken.report()
        self.broken = broken.messages
        self.num_broken = len(self.broken)
        if not self.pairs:
            raise ValueError(f"no usable utterances in {root} for split {split!r} ({self.num_broken} broken)")
        talkers = _UtteranceFiles([flac for flac, _, _ in self.pairs])
        self.augmenter = _augmenter(augment, len(talkers), talkers.read)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        flac, text, where = self.pairs[index]
        return {
            "waveform": _augmented(self.augmenter, _read_waveform(flac, self.use_trim, self.max_duration, where),
                                   self.max_duration),
            "text": text,
            "utt_id": flac.stem,
        }


# --------------------------------------------------------------------------------------
# Batching and config entry points
# --------------------------------------------------------------------------------------
def collate_srec(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and boxes; pad and normalise the speech (`speech_batch`)."""
    input_values, attention_mask = speech_batch([item["waveform"] for item in items])  # (B, L) each
    return {
        "image": torch.stack([item["image"] for item in items]),  # (B, 3, S, S)
        "label": torch.stack([item["label"] for item in items]),  # (B, 4) cx, cy, w, h
        "gt_xyxy": torch.stack([item["gt_xyxy"] for item in items]),  # (B, 4) original pixels
        "input_values": input_values,
        "attention_mask": attention_mask,
        "letterbox": [item["letterbox"] for item in items],
        "sentence": [item["sentence"] for item in items],
        "sent_id": [item["sent_id"] for item in items],
        "iid": [item["iid"] for item in items],
        "speaker": [item["speaker"] for item in items],
        "image_path": [item["image_path"] for item in items],
    }


def collate_csa(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Pad and normalise the speech; texts stay strings for the tokenizer."""
    input_values, attention_mask = speech_batch([item["waveform"] for item in items])  # (B, L) each
    return {
        "input_values": input_values,
        "attention_mask": attention_mask,
        "text": [item["text"] for item in items],
        "utt_id": [item["utt_id"] for item in items],
    }


def build_srec_dataset(data: DataConfig, split: str, image_size: int, train: bool,
                       augment: AugmentConfig | None = None) -> Dataset:
    """The SREC dataset a training config's `data:` section describes; `augment` applies to
    training datasets only."""
    augment = augment if train else None
    if data.format == "refcoco":
        layout = refcoco_layout(data.dataset, data.root, data.ann_path, data.image_dir, data.audio_root,
                                data.image_pattern)
        return SpeechGroundingDataset(layout, split, image_size, data.speakers, train, data.use_trim,
                                      data.max_duration, data.skip_broken, augment, need_box=data.boxes)
    if data.format == "hf":
        return HFSpeechGroundingDataset(data.root, split, image_size, box_key_for(data.dataset), train,
                                        data.use_trim, data.max_duration, data.skip_broken, augment)
    raise ValueError(f"data.format {data.format!r} cannot feed SREC; use 'refcoco' or 'hf'")


def build_csa_dataset(data: DataConfig, split: str, train: bool, augment: AugmentConfig | None = None) -> Dataset:
    """The CSA dataset a training config's `data:` section describes; `augment` applies to
    training datasets only."""
    augment = augment if train else None
    if data.format == "librispeech":
        return LibriSpeechDataset(data.root, split, data.use_trim, data.max_duration, data.skip_broken, augment)
    if data.format == "refcoco":
        layout = refcoco_layout(data.dataset, data.root, data.ann_path, data.image_dir, data.audio_root,
                                data.image_pattern)
        return SpeechTextPairs(layout.ann_path, layout.audio_root, split, data.speakers, train, data.use_trim,
                               data.max_duration, data.skip_broken, augment)
    raise ValueError(f"data.format {data.format!r} cannot feed CSA; use 'librispeech' or 'refcoco'")


# --------------------------------------------------------------------------------------
# Every object's box, for the class-agnostic detector
# --------------------------------------------------------------------------------------
class SceneObjectsDataset(Dataset):
    """One item per image of a RefCOCO-layout split whose entries list every object's box
    (`"objects": [{"bbox": [x, y, w, h]}, ...]`, written by the Spoken Shapes generator).

    No expression, speaker or target is read: the detector learns "object" and nothing else.
    """

    def __init__(self, layout: RefCocoLayout, split: str, image_size: int) -> None:
        if not layout.ann_path.is_file():
            raise FileNotFoundError(f"annotation file not found: {layout.ann_path}")
        annotations = json.loads(layout.ann_path.read_text())
        self.image_size = image_size
        self.images: dict[int, tuple[Path, list[tuple[float, float, float, float]], str]] = {}
        for split_name in _split_names(split):
            if split_name not in annotations:
                raise ValueError(f"{layout.ann_path} has no split {split_name!r}; it has {sorted(annotations)}")
            for index, raw in enumerate(annotations[split_name]):
                where = f"{layout.ann_path} {split_name}[{index}] (iid {raw.get('iid')})"
                if "objects" not in raw:
                    raise ValueError(f"{where} lists no objects: the detector needs every object's box "
                                     "(regenerate with python -m csref_training.spoken_shapes)")
                path = layout.image_dir / image_file_name(layout.image_pattern, raw["iid"])
                boxes = [tuple(float(v) for v in obj["bbox"]) for obj in raw["objects"]]
                self.images.setdefault(raw["iid"], (path, boxes, where))
        self.iids = sorted(self.images)
        if not self.iids:
            raise ValueError(f"{layout.ann_path} split {split!r} has no images")

    def __len__(self) -> int:
        return len(self.iids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, boxes, where = self.images[self.iids[index]]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise BrokenEntryError(f"{where}: cannot read image {path}")
        tensor, geometry = letterbox(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), self.image_size)  # (3, S, S)
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in boxes], dtype=np.float64)  # (M, 4) original
        labels = geometry.box_to_label(xyxy) * self.image_size  # (M, 4) cx, cy, w, h input px
        return {"image": tensor, "letterbox": geometry, "boxes": torch.from_numpy(labels).float(),
                "gt_xyxy": xyxy, "iid": self.iids[index]}


def collate_detector(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the images; each image keeps its own number of boxes."""
    return {
        "image": torch.stack([item["image"] for item in items]),  # (B, 3, S, S)
        "boxes": [item["boxes"] for item in items],  # B x (M_b, 4) cx, cy, w, h input px
        "gt_xyxy": [item["gt_xyxy"] for item in items],  # B x (M_b, 4) original pixels
        "letterbox": [item["letterbox"] for item in items],
        "iid": [item["iid"] for item in items],
    }


def build_detector_dataset(data: DataConfig, split: str, image_size: int) -> Dataset:
    """The detector dataset a training config's `data:` section describes (RefCOCO layout with objects)."""
    if data.format != "refcoco":
        raise ValueError(f"data.format {data.format!r} cannot feed the detector; use 'refcoco' with per-object "
                         "boxes (Spoken Shapes writes them)")
    layout = refcoco_layout(data.dataset, data.root, data.ann_path, data.image_dir, data.audio_root,
                            data.image_pattern)
    return SceneObjectsDataset(layout, split, image_size)
