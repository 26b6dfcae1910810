"""Pictures of scenes: backgrounds (plain, gradient, a crop of a bundled photo) and the objects
drawn on them with anti-aliasing (docs/SPOKEN_SHAPES.md, "Scenes")."""

from __future__ import annotations

import functools

import cv2
import numpy as np
import skimage.data
from PIL import Image, ImageDraw

from csref_training.spoken_shapes.grammar import COLOURS, SceneObject
from csref_training.spoken_shapes.scene import shape_outline

BACKGROUNDS = ("plain", "gradient", "photo")
# skimage.data photos whose files ship inside the package (loaded offline).
PHOTO_NAMES = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
    "retina", "camera", "coins", "brick", "grass", "gravel", "moon", "cell", "clock",
)
SUPERSAMPLING = 4
COLOUR_JITTER = 12  # each object's RGB is its colour's +- up to this much per channel


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[np.ndarray, ...]:
    """The bundled scikit-image photos as RGB uint8 arrays (read once per process)."""
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


def object_alpha(obj: SceneObject) -> tuple[int, int, np.ndarray]:
    """Coverage of `obj`'s pixels: (x0, y0, alpha (h, w) float32 in [0, 1]) of the patch around its box.

    The shape is rasterised at SUPERSAMPLING x resolution and box-filtered down, so edge pixels
    get their coverage.
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
    return px0, py0, np.asarray(alpha, dtype=np.float32) / 255.0


def draw_object(canvas: np.ndarray, obj: SceneObject, rgb: np.ndarray) -> None:
    """Anti-aliased drawing of `obj` into `canvas` (H, W, 3 uint8, in place)."""
    px0, py0, alpha = object_alpha(obj)
    alpha = alpha[:, :, None]  # (h, w, 1)
    h, w = alpha.shape[:2]
    patch = canvas[py0:py0 + h, px0:px0 + w].astype(np.float32)
    canvas[py0:py0 + h, px0:px0 + w] = (patch * (1 - alpha) + rgb * alpha).round().astype(np.uint8)


def object_label_map(height: int, width: int, objects: list[SceneObject]) -> np.ndarray:
    """(H, W) uint8: object i's pixels (coverage >= 0.5) hold i + 1, the background 0; later
    objects are drawn over earlier ones, as in `render_scene`."""
    if len(objects) > 254:
        raise ValueError(f"a uint8 label map holds at most 254 objects, got {len(objects)}")
    labels = np.zeros((height, width), dtype=np.uint8)
    for index, obj in enumerate(objects):
        px0, py0, alpha = object_alpha(obj)
        h, w = alpha.shape
        labels[py0:py0 + h, px0:px0 + w][alpha >= 0.5] = index + 1
    return labels


def render_scene(
    rng: np.random.Generator, background: np.ndarray, objects: list[SceneObject]
) -> np.ndarray:
    """Draws `objects` on a copy of `background`, each with a slightly jittered colour."""
    canvas = background.copy()
    for obj in objects:
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        rgb = np.clip(np.asarray(COLOURS[obj.colour]) + jitter, 0, 255).astype(np.float32)
        draw_object(canvas, obj, rgb)
    return canvas
