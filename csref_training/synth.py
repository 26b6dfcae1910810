"""Spoken Shapes: a synthetic speech-grounding task in the official RefCOCO-speech layout.

The task: RGB images (sides 320-640 px) of 3-6 anti-aliased, non-overlapping shapes (circle,
square, triangle, star, diamond, cross; 8 colours; small or big) on a plain, gradient or photo
background; one target object per sample, described by the SHORTEST unique referring
expression, optionally after a carrier phrase ("pick up ..."), spoken by espeak-ng.

Usage::

    python -m csref_training.synth --out data/spoken_shapes --train 12000 --val 400 --test 600
    python -m csref_training.synth --out data/spoken_shapes_heldout --seed 1 \\
        --train 0 --val 0 --test 600 --voice-set heldout --noise-prob 1 --snr-db-range 10,30

On-disk layout (``--dataset-name`` defaults to ``spoken_shapes``)::

    <out>/anns/<dataset>.json            {"train": [...], "val": [...], "test": [...]}
    <out>/images/<iid:012d>.jpg          e.g. images/000000000042.jpg
    <out>/audios/<dataset>/<speaker>/<sent_id>.wav   16 kHz mono 16-bit PCM
    <out>/<dataset>_generator.json       the generator settings, for provenance

Each annotation entry is ``{"iid", "bbox": [x, y, w, h] (floats, original pixels), "sent_ids":
[sent_id], "refs": [{"sent_id", "sent", "speaker", "rate", "pitch", "snr_db"}]}`` with one image,
one target and one sentence per entry (``sent_id == iid``). Every sentence is rendered with ONE
voice; its speaker directory is the voice string (``en-us+m3``), also recorded in the ref. Loaders
look a sentence up as ``<speaker>/<sent_id>.wav`` in whichever selected speaker directory has it
(see ``csref_training.datasets``), which reads the real RefCOCO-speech layout, where every
speaker directory holds every sentence, the same way.

Referring expressions. An expression names the shape, and optionally a colour, a size
("small"/"big"), a horizontal place ("on the left"/"on the right"/"in the middle") and a
vertical place ("at the top"/"at the bottom"). Its meaning (``referents``): the candidates are
the objects with the named shape, colour and size; place words then keep the candidate x for
which every other candidate o is ruled out by at least one named place word:
"on the left" rules o out when o's centre is at least 10% of the image width to the right of
x's, "on the right" mirrored, "at the top"/"at the bottom" likewise with 10% of the height, and
"in the middle" when o's centre is at least 10% of the width farther from the vertical centre
line than x's (x itself must lie in the central quarter of the image width). The generator
picks, among all combinations whose referents are exactly the target, one with the fewest
optional attributes (ties: fewer place words first, then at random), so place words are used
only when they single the target out with the margin. Sizes: a big object's box area is at least
2.5x any small object's in the same image; by default the sizes come from fixed ranges,
``--scene-scale`` draws them per scene instead (a model must then compare sizes within the
picture). Noise (white, pink or brown) is added to a
``--noise-prob`` fraction of utterances at an SNR drawn from ``--snr-db-range``.

Voices. ``TRAIN_VOICES`` (the default) is every English espeak-ng voice, bare and with each of
``TRAIN_VARIANTS``; ``HELDOUT_VOICES`` pairs the same voices with the disjoint
``HELDOUT_VARIANTS``, for cross-speaker evaluation. Rate and pitch are drawn per utterance.

Determinism: every sample draws from its own ``numpy`` generator seeded by (seed, split, index),
so the output is identical for any ``--workers``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import multiprocessing
import os
import re
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 35),
    "purple": (135, 55, 170),
    "orange": (245, 135, 25),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
}
SIZES = ("small", "big")
HORIZONTAL_PLACES = {"left": "on the left", "right": "on the right", "middle": "in the middle"}
VERTICAL_PLACES = {"top": "at the top", "bottom": "at the bottom"}
CARRIER_PHRASES = ("pick up", "grab", "give me", "point at", "find", "where is")
BACKGROUNDS = ("plain", "gradient", "photo")
SPLITS = ("train", "val", "test")

# The 8 native English espeak-ng voices.
ENGLISH_VOICES = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan",
    "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)
# espeak-ng variants (files in espeak-ng-data/voices/!v) used for training. Strongly
# distorted variants (whisper, robots, echo effects) are left out of both lists.
TRAIN_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f4",
    "Alex", "Andrea", "Andy", "Annie", "Denis", "Gene", "Jacky", "Lee", "Mario", "Michael",
    "Mike", "aunty", "belinda", "boris", "david", "ed", "edward", "grandma", "iven2", "klatt",
    "klatt3", "linda", "max", "paul", "quincy", "robert", "shelby", "steph", "travis", "victor",
)
# Disjoint from TRAIN_VARIANTS: for cross-speaker evaluation only.
HELDOUT_VARIANTS = (
    "m8", "f3", "f5", "Alicia", "anika", "gustave", "john", "kaukovalta",
    "klatt2", "marcelo", "norbert", "rob",
)
TRAIN_VOICES = ENGLISH_VOICES + tuple(
    f"{voice}+{variant}" for voice in ENGLISH_VOICES for variant in TRAIN_VARIANTS
)
HELDOUT_VOICES = tuple(f"{voice}+{variant}" for voice in ENGLISH_VOICES for variant in HELDOUT_VARIANTS)
VOICE_SETS = {"train": TRAIN_VOICES, "heldout": HELDOUT_VOICES}

# skimage.data photos whose files ship inside the package (loaded offline).
PHOTO_NAMES = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "camera", "coins", "brick", "grass", "gravel", "moon", "cell", "clock",
)

SAMPLE_RATE = 16000
ESPEAK_SAMPLE_RATE = 22050
PLACE_MARGIN = 0.10  # fraction of the image width (height) that separates place words
MIDDLE_BAND = 0.125  # "in the middle" needs the centre within this fraction of the width from the centre line
BOX_MARGIN_PX = 8  # minimum gap between object boxes, and between a box and the image border
MIN_CONTRAST = 80.0  # minimum RGB distance between an object's colour and the background under it
SUPERSAMPLING = 4
# Object extent (longest side of the shape) as a fraction of min(width, height). With these
# ranges the smallest big box (a triangle or star at 0.24) has >= 2.5x the area of the largest
# small box (a square at 0.14).
SMALL_EXTENT = (0.09, 0.14)
BIG_EXTENT = (0.24, 0.34)
# With `scene_scale` (--scene-scale) each scene draws its own scale s instead: small objects get
# [s, 1.15 s], big ones [2 s, 3 s] (at most MAX_EXTENT), so the smallest big box (a triangle at
# 2 s) still has >= 2.5x the area of the largest small box (a square at 1.15 s). With 0.05,0.13
# small objects span 0.05-0.15 across scenes and big ones 0.10-0.36: sizes must be compared
# within the picture, as another author's sizes would need.
SMALL_EXTENT_FACTOR = (1.0, 1.15)
BIG_EXTENT_FACTOR = (2.0, 3.0)
MAX_EXTENT = 0.36
BIG_TO_SMALL_AREA = 2.5
# How each distractor relates to the target: another shape (keeping the target's colour with
# probability DISTRACTOR_SAME_COLOUR_P), the same shape in another colour (keeping the target's
# size with probability DISTRACTOR_SAME_SIZE_P), the same shape and colour in the other size, or
# an identical twin. Chosen so that colour, size and place words are all needed often
# (about 39% / 26% / 42% of expressions; 7% name the shape alone).
DISTRACTOR_RELATION_P = (0.40, 0.35, 0.15, 0.10)
DISTRACTOR_SAME_COLOUR_P = 0.3
DISTRACTOR_SAME_SIZE_P = 0.7


# --------------------------------------------------------------------------------------
# Scene layout and referring expressions
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels (tight)

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Expression:
    shape: str
    colour: str | None = None
    size: str | None = None
    horizontal: str | None = None  # a key of HORIZONTAL_PLACES
    vertical: str | None = None  # a key of VERTICAL_PLACES

    @property
    def num_optional(self) -> int:
        return sum(a is not None for a in (self.colour, self.size, self.horizontal, self.vertical))

    @property
    def num_place(self) -> int:
        return (self.horizontal is not None) + (self.vertical is not None)

    @property
    def text(self) -> str:
        words = ["the", self.size, self.colour, self.shape]
        words += [HORIZONTAL_PLACES.get(self.horizontal), VERTICAL_PLACES.get(self.vertical)]
        return " ".join(w for w in words if w)


def _ruled_out(place: str, x: SceneObject, other: SceneObject, width: int, height: int) -> bool:
    """True when `place` said of x excludes `other` (separated by the margin)."""
    dx, dy = PLACE_MARGIN * width, PLACE_MARGIN * height
    if place == "left":
        return other.cx - x.cx >= dx
    if place == "right":
        return x.cx - other.cx >= dx
    if place == "middle":
        return abs(other.cx - width / 2) - abs(x.cx - width / 2) >= dx
    if place == "top":
        return other.cy - x.cy >= dy
    if place == "bottom":
        return x.cy - other.cy >= dy
    raise ValueError(f"unknown place word {place!r}")


def referents(expr: Expression, objects: list[SceneObject], width: int, height: int) -> list[int]:
    """Indices of the objects that `expr` picks out in the scene (see the module docstring)."""
    candidates = [
        i for i, o in enumerate(objects)
        if o.shape == expr.shape
        and expr.colour in (None, o.colour)
        and expr.size in (None, o.size)
    ]
    places = [p for p in (expr.horizontal, expr.vertical) if p is not None]
    if not places:
        return candidates
    picked = []
    for i in candidates:
        x = objects[i]
        if expr.horizontal == "middle" and abs(x.cx - width / 2) > MIDDLE_BAND * width:
            continue
        if all(
            any(_ruled_out(p, x, objects[j], width, height) for p in places)
            for j in candidates if j != i
        ):
            picked.append(i)
    return picked


def describe(
    target: int, objects: list[SceneObject], width: int, height: int, rng: np.random.Generator
) -> Expression | None:
    """The shortest expression whose referents are exactly [target]; None if there is none.

    "Shortest" counts the optional attributes besides the always-said shape. Among equally
    short expressions those with fewer place words win (colour and size are what a speaker
    reaches for first, and place words are the hardest part of the task to learn); the
    remaining ties are drawn with `rng`.
    """
    t = objects[target]
    unique: list[Expression] = []
    for colour, size, horizontal, vertical in itertools.product(
        (None, t.colour), (None, t.size), (None, *HORIZONTAL_PLACES), (None, *VERTICAL_PLACES)
    ):
        expr = Expression(t.shape, colour, size, horizontal, vertical)
        if referents(expr, objects, width, height) == [target]:
            unique.append(expr)
    if not unique:
        return None
    fewest = min(e.num_optional for e in unique)
    shortest = [e for e in unique if e.num_optional == fewest]
    fewest_place = min(e.num_place for e in shortest)
    shortest = [e for e in shortest if e.num_place == fewest_place]
    return shortest[rng.integers(len(shortest))]


def shape_outline(shape: str, extent: float) -> np.ndarray | None:
    """Polygon (K, 2) of a shape whose longest box side is `extent`, centred on its box.

    None for a circle (drawn as an ellipse).
    """
    r = extent / 2
    if shape == "circle":
        return None
    if shape == "square":
        pts = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif shape == "diamond":
        pts = [(0, -r), (r, 0), (0, r), (-r, 0)]
    elif shape == "triangle":  # equilateral, pointing up
        h = extent * np.sqrt(3) / 2
        pts = [(0, -h / 2), (r, h / 2), (-r, h / 2)]
    elif shape == "cross":  # plus sign, arms one third of the extent thick
        a = extent / 6
        pts = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r),
               (-a, a), (-r, a), (-r, -a), (-a, -a)]
    elif shape == "star":  # five points, one pointing up
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        pts = pts - (pts.min(0) + pts.max(0)) / 2  # centre on the box
        pts = pts * (extent / (pts.max(0) - pts.min(0)).max())
        return pts
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(pts, dtype=np.float64)


def shape_box_size(shape: str, extent: float) -> tuple[float, float]:
    """(width, height) of the tight box of a shape of the given extent."""
    outline = shape_outline(shape, extent)
    if outline is None:
        return extent, extent
    span = outline.max(0) - outline.min(0)
    return float(span[0]), float(span[1])


def _boxes_clear(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _contrast_ok(background: np.ndarray, box: tuple[float, ...], colour: str) -> bool:
    x0, y0, x1, y1 = (int(v) for v in box)
    under = background[y0:y1 + 1, x0:x1 + 1].reshape(-1, 3).mean(0)
    return float(np.linalg.norm(under - np.asarray(COLOURS[colour], dtype=np.float64))) >= MIN_CONTRAST


def place_objects(
    rng: np.random.Generator, background: np.ndarray, wanted: list[tuple[str, str, str]],
    scene_scale: tuple[float, float] | None = None,
) -> dict[int, SceneObject]:
    """Each wanted (shape, colour, size) at a random free spot whose background contrasts with its
    colour, big ones first (they are the hardest to fit), 40 tries each. Keyed by the index in
    `wanted`; an object that found no spot is missing."""
    height, width = background.shape[:2]
    unit = min(width, height)
    scale = None if scene_scale is None else rng.uniform(*scene_scale)
    placed: dict[int, SceneObject] = {}
    for i in sorted(range(len(wanted)), key=lambda i: wanted[i][2] != "big"):
        shape, colour, size = wanted[i]
        if scale is None:
            extent = rng.uniform(*(BIG_EXTENT if size == "big" else SMALL_EXTENT))
        else:
            extent = min(scale * rng.uniform(*(BIG_EXTENT_FACTOR if size == "big" else SMALL_EXTENT_FACTOR)), MAX_EXTENT)
        w, h = shape_box_size(shape, unit * extent)
        for _ in range(40):
            x0 = rng.uniform(BOX_MARGIN_PX, width - BOX_MARGIN_PX - w)
            y0 = rng.uniform(BOX_MARGIN_PX, height - BOX_MARGIN_PX - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(_boxes_clear(box, o.box, BOX_MARGIN_PX) for o in placed.values()) and \
                    _contrast_ok(background, box, colour):
                placed[i] = SceneObject(shape, colour, size, box)
                break
    return placed


def sample_layout(
    rng: np.random.Generator, background: np.ndarray, scene_scale: tuple[float, float] | None = None,
    max_attempts: int = 200,
) -> tuple[list[SceneObject], int, Expression]:
    """Draws objects on `background`'s canvas until the target has a unique description.

    Returns (objects, target index, expression).
    """
    height, width = background.shape[:2]
    for _ in range(max_attempts):
        n = int(rng.integers(3, 7))
        target_attrs = (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), str(rng.choice(SIZES)))
        wanted = [target_attrs]
        for _ in range(n - 1):
            wanted.append(distractor_attrs(rng, *target_attrs))
        placed = place_objects(rng, background, wanted, scene_scale)  # index 0 is the target
        if 0 not in placed or len(placed) < 3:
            continue
        indices = sorted(placed)
        objects = [placed[i] for i in indices]
        if not size_classes_separated(objects):
            continue
        expression = describe(0, objects, width, height, rng)
        if expression is None:
            continue
        # Shuffle so the target's index carries no information.
        perm = rng.permutation(len(objects))
        objects = [objects[p] for p in perm]
        return objects, int(np.flatnonzero(perm == 0)[0]), expression
    raise RuntimeError(f"no describable scene after {max_attempts} attempts on a {width}x{height} canvas")


def distractor_attrs(rng: np.random.Generator, shape: str, colour: str, size: str) -> tuple[str, str, str]:
    """Attributes of one distractor, related to the target's as DISTRACTOR_RELATION_P says."""
    relation = rng.choice(len(DISTRACTOR_RELATION_P), p=DISTRACTOR_RELATION_P)
    other_shape = str(rng.choice([s for s in SHAPES if s != shape]))
    other_colour = str(rng.choice([c for c in COLOURS if c != colour]))
    other_size = "big" if size == "small" else "small"
    if relation == 0:
        same_colour = rng.random() < DISTRACTOR_SAME_COLOUR_P
        return other_shape, colour if same_colour else str(rng.choice(list(COLOURS))), str(rng.choice(SIZES))
    if relation == 1:
        return shape, other_colour, size if rng.random() < DISTRACTOR_SAME_SIZE_P else other_size
    if relation == 2:
        return shape, colour, other_size
    return shape, colour, size


def size_classes_separated(objects: list[SceneObject]) -> bool:
    """Every big box has at least BIG_TO_SMALL_AREA times the area of every small box."""
    def area(o: SceneObject) -> float:
        return (o.box[2] - o.box[0]) * (o.box[3] - o.box[1])

    big = [area(o) for o in objects if o.size == "big"]
    small = [area(o) for o in objects if o.size == "small"]
    return not big or not small or min(big) >= BIG_TO_SMALL_AREA * max(small)


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[np.ndarray, ...]:
    """The bundled scikit-image photos as RGB uint8 arrays (read once per process)."""
    import skimage.data

    photos = []
    for name in PHOTO_NAMES:
        photo = getattr(skimage.data, name)()
        if photo.ndim == 2:
            photo = np.repeat(photo[:, :, None], 3, axis=2)
        photos.append(np.ascontiguousarray(photo[:, :, :3]).astype(np.uint8))
    return tuple(photos)


def make_background(rng: np.random.Generator, width: int, height: int, kind: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB background of the given kind."""
    if kind == "plain":
        colour = rng.integers(0, 256, size=3)
        return np.broadcast_to(colour.astype(np.uint8), (height, width, 3)).copy()
    if kind == "gradient":
        start, end = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        xs = np.arange(width, dtype=np.float32)[None, :] * np.float32(np.cos(angle))  # (1, W)
        ys = np.arange(height, dtype=np.float32)[:, None] * np.float32(np.sin(angle))  # (H, 1)
        proj = xs + ys  # (H, W)
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
        return (start + t[:, :, None] * (end - start)).round().astype(np.uint8)
    if kind == "photo":
        photos = load_photos()
        photo = photos[rng.integers(len(photos))]
        ph, pw = photo.shape[:2]
        # Largest crop with the canvas' aspect ratio, then a random zoom into it.
        scale = min(pw / width, ph / height) * rng.uniform(0.5, 1.0)
        cw, ch = max(int(width * scale), 8), max(int(height * scale), 8)
        x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
        crop = cv2.resize(photo[y0:y0 + ch, x0:x0 + cw], (width, height), interpolation=cv2.INTER_LINEAR)
        # Fade the photo towards its mean a little so drawn shapes stay the salient objects.
        fade = rng.uniform(0.0, 0.4)
        mean = crop.reshape(-1, 3).mean(0)
        return (crop * (1 - fade) + mean * fade).round().astype(np.uint8)
    raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")


def draw_object(canvas: np.ndarray, obj: SceneObject, rgb: np.ndarray) -> None:
    """Anti-aliased drawing of `obj` into `canvas` (H, W, 3 uint8, in place).

    The shape is rasterised at SUPERSAMPLING x resolution on a patch around its box and
    box-filtered down, so edge pixels get their coverage as alpha.
    """
    x0, y0, x1, y1 = obj.box
    px0, py0 = int(np.floor(x0)), int(np.floor(y0))
    px1, py1 = int(np.ceil(x1)), int(np.ceil(y1))
    s = SUPERSAMPLING
    mask = Image.new("L", ((px1 - px0) * s, (py1 - py0) * s), 0)
    draw = ImageDraw.Draw(mask)
    # PIL puts integer coordinates at pixel centres; our box coordinates put them at corners.
    to_patch = np.array([px0, py0])
    outline = shape_outline(obj.shape, max(x1 - x0, y1 - y0))
    if outline is None:
        draw.ellipse([(x0 - px0) * s, (y0 - py0) * s, (x1 - px0) * s - 1, (y1 - py0) * s - 1], fill=255)
    else:
        pts = (outline + np.array([obj.cx, obj.cy]) - to_patch) * s - 0.5
        draw.polygon([tuple(p) for p in pts], fill=255)
    alpha = mask.resize((px1 - px0, py1 - py0), Image.BOX)
    alpha = np.asarray(alpha, dtype=np.float32)[:, :, None] / 255.0  # (h, w, 1)
    patch = canvas[py0:py1, px0:px1].astype(np.float32)
    canvas[py0:py1, px0:px1] = (patch * (1 - alpha) + rgb * alpha).round().astype(np.uint8)


def render_scene(
    rng: np.random.Generator, background: np.ndarray, objects: list[SceneObject]
) -> np.ndarray:
    """Draws `objects` on a copy of `background`, each with a slightly jittered colour."""
    canvas = background.copy()
    for obj in objects:
        jitter = rng.integers(-12, 13, size=3)
        rgb = np.clip(np.asarray(COLOURS[obj.colour]) + jitter, 0, 255).astype(np.float32)
        draw_object(canvas, obj, rgb)
    return canvas


# --------------------------------------------------------------------------------------
# Speech
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def espeak_data_dir() -> Path:
    """espeak-ng's data directory, as printed by `espeak-ng --version`."""
    try:
        out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError as err:
        raise RuntimeError("espeak-ng is not installed; install the Debian package `espeak-ng`") from err
    match = re.search(r"Data at:\s*(\S+)", out)
    if match is None:
        raise RuntimeError(f"cannot find the data directory in `espeak-ng --version` output: {out!r}")
    return Path(match.group(1))


def check_voices(voices: list[str]) -> None:
    """Raises ValueError listing every voice espeak-ng does not have.

    espeak-ng silently ignores an unknown `+variant`, so variants are checked against its files.
    """
    listing = subprocess.run(["espeak-ng", "--voices"], capture_output=True, text=True, check=True).stdout
    languages = {line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1}
    variants = {p.name for p in (espeak_data_dir() / "voices" / "!v").iterdir()}
    bad = []
    for voice in voices:
        language, _, variant = voice.partition("+")
        if language not in languages or (variant and variant not in variants):
            bad.append(voice)
    if bad:
        raise ValueError(
            f"unknown espeak-ng voice(s): {', '.join(bad)}. Voices are `language+variant`; see "
            f"`espeak-ng --voices` for languages and {espeak_data_dir() / 'voices' / '!v'} for variants."
        )


def speaker_dir_name(voice: str) -> str:
    """File-system safe speaker directory name for a voice string."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", voice)


def _parse_espeak_wav(data: bytes) -> np.ndarray:
    """int16 mono samples from espeak-ng's --stdout WAV (its size fields are not filled in)."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE" or data[12:16] != b"fmt ":
        raise RuntimeError("espeak-ng did not write a WAV stream")
    fmt, channels, rate = struct.unpack("<HHI", data[20:28])
    bits = struct.unpack("<H", data[34:36])[0]
    if (fmt, channels, rate, bits) != (1, 1, ESPEAK_SAMPLE_RATE, 16) or data[36:40] != b"data":
        raise RuntimeError(f"unexpected espeak-ng WAV format {(fmt, channels, rate, bits)}")
    payload = data[44:]
    return np.frombuffer(payload[: len(payload) // 2 * 2], dtype="<i2")


def espeak(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    """Speech for `text` as float32 in [-1, 1] at 22050 Hz."""
    cmd = ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"espeak-ng failed ({' '.join(cmd)}): {proc.stderr.decode(errors='replace')}")
    return _parse_espeak_wav(proc.stdout).astype(np.float32) / 32768.0


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-power white, pink or brown noise."""
    white = rng.standard_normal(n)
    colour = rng.choice(["white", "pink", "brown"])
    if colour != "white":
        spectrum = np.fft.rfft(white)
        freqs = np.maximum(np.arange(len(spectrum)), 1.0)
        spectrum /= np.sqrt(freqs) if colour == "pink" else freqs
        white = np.fft.irfft(spectrum, n)
    return white / max(float(np.sqrt(np.mean(white ** 2))), 1e-12)


def render_speech(
    rng: np.random.Generator,
    text: str,
    voice: str,
    rate: int,
    pitch: int,
    snr_db: float | None,
) -> np.ndarray:
    """16 kHz float32 utterance: espeak-ng speech, trimmed, padded with 0.1-0.5 s silence on
    each side, peak level drawn from [0.3, 0.9], optional additive noise at `snr_db`."""
    speech = soxr.resample(espeak(text, voice, rate, pitch), ESPEAK_SAMPLE_RATE, SAMPLE_RATE, quality="HQ")
    loud = np.flatnonzero(np.abs(speech) > 0.01 * np.abs(speech).max())
    speech = speech[loud[0]:loud[-1] + 1]
    speech *= rng.uniform(0.3, 0.9) / np.abs(speech).max()
    lead, trail = (int(rng.uniform(0.1, 0.5) * SAMPLE_RATE) for _ in range(2))
    wave = np.concatenate([np.zeros(lead), speech, np.zeros(trail)])
    if snr_db is not None:
        speech_power = float(np.mean(speech.astype(np.float64) ** 2))
        wave = wave + _noise(rng, len(wave)) * np.sqrt(speech_power / 10 ** (snr_db / 10))
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------------------
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
    scene_scale: tuple[float, float] | None = None  # None: SMALL_EXTENT / BIG_EXTENT for every scene


def generate_sample(cfg: SynthConfig, split: str, index: int, iid: int) -> dict:
    """Generates, writes and returns the annotation entry of one sample (image, target, utterance)."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    width, height = (int(rng.integers(cfg.image_size_range[0], cfg.image_size_range[1] + 1)) for _ in range(2))
    background = make_background(rng, width, height, cfg.backgrounds[rng.integers(len(cfg.backgrounds))])
    objects, target, expression = sample_layout(rng, background, cfg.scene_scale)
    image = render_scene(rng, background, objects)

    text = expression.text
    if rng.random() < cfg.carrier_prob:
        text = f"{CARRIER_PHRASES[rng.integers(len(CARRIER_PHRASES))]} {text}"
    voice = cfg.voices[rng.integers(len(cfg.voices))]
    rate = int(rng.integers(cfg.rate_range[0], cfg.rate_range[1] + 1))
    pitch = int(rng.integers(cfg.pitch_range[0], cfg.pitch_range[1] + 1))
    snr_db = float(round(rng.uniform(*cfg.snr_db_range), 2)) if rng.random() < cfg.noise_prob else None
    wave = render_speech(rng, text, voice, rate, pitch, snr_db)

    sent_id = iid
    speaker = speaker_dir_name(voice)
    cv2.imwrite(str(cfg.out / "images" / f"{iid:012d}.jpg"), image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
    audio_dir = cfg.out / "audios" / cfg.dataset_name / speaker
    audio_dir.mkdir(parents=True, exist_ok=True)
    sf.write(audio_dir / f"{sent_id}.wav", wave, SAMPLE_RATE, subtype="PCM_16")

    x0, y0, x1, y1 = objects[target].box
    return {
        "iid": iid,
        "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
        "sent_ids": [sent_id],
        "refs": [{
            "sent_id": sent_id,
            "sent": text,
            "speaker": speaker,
            "rate": rate,
            "pitch": pitch,
            "snr_db": snr_db,
        }],
    }


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already


def _generate_job(args: tuple[SynthConfig, str, int, int]) -> dict:
    return generate_sample(*args)


def generate_dataset(cfg: SynthConfig, counts: dict[str, int], workers: int = 1, progress: bool = False) -> dict:
    """Writes the whole dataset under cfg.out and returns the annotation dict."""
    ann_path = cfg.out / "anns" / f"{cfg.dataset_name}.json"
    if ann_path.exists():
        raise FileExistsError(f"{ann_path} already exists; choose another --out or --dataset-name, or delete it")
    check_voices(list(cfg.voices))
    for sub in ("anns", "images"):
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
            results = pool.imap(_generate_job, jobs, chunksize=8)
            results = _with_progress(results, len(jobs), progress)
            for (_, split, _, _), entry in zip(jobs, results):
                annotations[split].append(entry)
    else:
        for job, entry in zip(jobs, _with_progress(map(_generate_job, jobs), len(jobs), progress)):
            annotations[job[1]].append(entry)
    tmp = ann_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(annotations))
    os.replace(tmp, ann_path)
    return annotations


def _with_progress(iterable, total: int, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, unit="sample")


def _pair(text: str, kind: type) -> tuple:
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}")
    lo, hi = (kind(p) for p in parts)
    if lo > hi:
        raise argparse.ArgumentTypeError(f"range {text!r} has its lower end above its upper end")
    return lo, hi


def _espeak_version() -> str:
    return subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m csref_training.synth",
        description="Generate the Spoken Shapes task in the RefCOCO-speech on-disk layout.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output root directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000, help="number of train samples")
    parser.add_argument("--val", type=int, default=200, help="number of val samples")
    parser.add_argument("--test", type=int, default=200, help="number of test samples")
    voices = parser.add_mutually_exclusive_group()
    voices.add_argument("--voices", help="comma-separated espeak-ng voices, e.g. en-us+m3,en-gb+f2")
    voices.add_argument("--voice-set", choices=sorted(VOICE_SETS), default="train",
                        help="a documented voice list (default: train)")
    parser.add_argument("--rate-range", type=lambda s: _pair(s, int), default=(130, 210),
                        help="speaking rate range in words per minute (default 130,210)")
    parser.add_argument("--pitch-range", type=lambda s: _pair(s, int), default=(20, 80),
                        help="espeak-ng pitch range 0-99 (default 20,80)")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--snr-db-range", type=lambda s: _pair(s, float), default=(10.0, 40.0),
                       help="SNR range of the additive noise in dB (default 10,40)")
    noise.add_argument("--no-noise", action="store_true", help="no additive noise at all")
    parser.add_argument("--noise-prob", type=float, default=0.5,
                        help="fraction of utterances that get noise (default 0.5)")
    parser.add_argument("--carrier-prob", type=float, default=0.5,
                        help='fraction of utterances with a carrier phrase such as "pick up" (default 0.5)')
    parser.add_argument("--backgrounds", default=",".join(BACKGROUNDS),
                        help="comma-separated subset of plain,gradient,photo")
    parser.add_argument("--scene-scale", type=lambda s: _pair(s, float), default=None,
                        help="per-scene object scale range, e.g. 0.05,0.13: small objects get "
                             f"{SMALL_EXTENT_FACTOR[0]}-{SMALL_EXTENT_FACTOR[1]}x and big ones "
                             f"{BIG_EXTENT_FACTOR[0]}-{BIG_EXTENT_FACTOR[1]}x a scale drawn per scene, as a "
                             f"fraction of the shorter image side (default: fixed ranges, small {SMALL_EXTENT[0]}-{SMALL_EXTENT[1]}, "
                             f"big {BIG_EXTENT[0]}-{BIG_EXTENT[1]})")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dataset-name", default="spoken_shapes")
    args = parser.parse_args(argv)

    backgrounds = tuple(b for b in args.backgrounds.split(",") if b)
    unknown = [b for b in backgrounds if b not in BACKGROUNDS]
    if unknown or not backgrounds:
        parser.error(f"--backgrounds: unknown {unknown}; choose from {','.join(BACKGROUNDS)}")
    if min(args.train, args.val, args.test) < 0:
        parser.error("sample counts must be >= 0")
    if not 0.0 <= args.noise_prob <= 1.0 or not 0.0 <= args.carrier_prob <= 1.0:
        parser.error("--noise-prob and --carrier-prob must lie in [0, 1]")
    if args.scene_scale is not None and not 0.0 < args.scene_scale[0] <= args.scene_scale[1] <= MAX_EXTENT / 2:
        parser.error(f"--scene-scale must be two increasing numbers in (0, {MAX_EXTENT / 2}]")
    voice_list = tuple(v for v in args.voices.split(",") if v) if args.voices else VOICE_SETS[args.voice_set]
    cfg = SynthConfig(
        out=args.out,
        dataset_name=args.dataset_name,
        seed=args.seed,
        voices=voice_list,
        rate_range=args.rate_range,
        pitch_range=args.pitch_range,
        snr_db_range=args.snr_db_range,
        noise_prob=0.0 if args.no_noise else args.noise_prob,
        carrier_prob=args.carrier_prob,
        backgrounds=backgrounds,
        scene_scale=args.scene_scale,
    )
    counts = {"train": args.train, "val": args.val, "test": args.test}
    start = time.perf_counter()
    try:
        generate_dataset(cfg, counts, workers=args.workers, progress=True)
    except (ValueError, FileExistsError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    elapsed = time.perf_counter() - start
    total = sum(counts.values())
    info = {
        "argv": sys.argv if argv is None else ["python", "-m", "csref_training.synth", *argv],
        "counts": counts,
        "seed": cfg.seed,
        "voices": list(cfg.voices),
        "rate_range": list(cfg.rate_range),
        "pitch_range": list(cfg.pitch_range),
        "snr_db_range": list(cfg.snr_db_range),
        "noise_prob": cfg.noise_prob,
        "carrier_prob": cfg.carrier_prob,
        "backgrounds": list(backgrounds),
        "scene_scale": None if cfg.scene_scale is None else list(cfg.scene_scale),
        "espeak_ng": _espeak_version(),
        "wall_time_s": round(elapsed, 1),
    }
    (cfg.out / f"{cfg.dataset_name}_generator.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {total} samples to {cfg.out} in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.1f} samples/s)")


if __name__ == "__main__":
    main()
