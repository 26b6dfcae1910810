"""Pictures of grounding results: the one drawing module of the project.

Used by the ground CLI, evaluation's --save-vis, the node's debug image and the demo. A
prediction is a solid box, a ground truth a dashed one; each may carry a filled tag placed
where it hides no other tag. Lines are outlined in dark grey so they show on any background.
A target mask (a model with a mask head) is a translucent fill in the prediction colour with a
solid edge, under the boxes.
"""

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
PREDICTION_COLOUR: RGB = (255, 40, 200)
TARGET_COLOUR: RGB = (40, 220, 70)
OUTLINE_COLOUR: RGB = (20, 20, 20)
CAPTION_BACKGROUND: RGB = (30, 30, 30)
CAPTION_TEXT: RGB = (235, 235, 235)
REFERENCE_WIDTH = 720  # px at which line widths and text sizes below hold; they scale with the picture
MASK_OPACITY = 0.45  # of the mask's fill; its edge is opaque


@dataclass(frozen=True)
class DrawnBox:
    xyxy: tuple[float, float, float, float]  # original-image pixels
    colour: RGB = PREDICTION_COLOUR
    label: str | None = None
    dashed: bool = False


def draw_boxes(image_rgb: np.ndarray, boxes: Sequence[DrawnBox], caption: Sequence[str] = (),
               min_width: int = 0, mask: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> a new uint8 RGB picture with the (H, W) bool `mask` if given, the
    boxes, their tags and caption lines under the image. Pictures narrower than `min_width` are
    enlarged first (legible text)."""
    if mask is not None:
        image_rgb = tint_mask(image_rgb, mask)
    height, width = image_rgb.shape[:2]
    zoom = max(1.0, min_width / width)
    picture = Image.fromarray(np.ascontiguousarray(image_rgb, dtype=np.uint8))
    if zoom > 1.0:
        picture = picture.resize((round(width * zoom), round(height * zoom)), Image.LANCZOS)
    width, height = picture.size
    unit = width / REFERENCE_WIDTH
    line_h = round(24 * unit)
    caption_h = line_h * len(caption) + round(12 * unit) if caption else 0
    canvas = Image.new("RGB", (width, height + caption_h), CAPTION_BACKGROUND)
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)

    scaled = [tuple(v * zoom for v in box.xyxy) for box in boxes]
    line_width = max(2, round(3 * unit))
    for box, xyxy in zip(boxes, scaled):
        if box.dashed:
            dashed_rectangle(draw, xyxy, box.colour, width=line_width, dash=max(2, round(10 * unit)))
        else:
            x1, y1, x2, y2 = xyxy
            draw.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=OUTLINE_COLOUR, width=line_width + 2)
            draw.rectangle(xyxy, outline=box.colour, width=line_width)
    font = ImageFont.load_default(size=max(8, round(17 * unit)))
    tags: list[tuple[float, ...]] = []
    for box, xyxy in zip(boxes, scaled):
        if box.label:
            tags.append(place_tag(draw, box.label, xyxy, box.colour, font, (width, height), tags))
    if caption:
        caption_font = fitting_font(draw, list(caption), round(16 * unit), width - 16 * unit)
        for i, line in enumerate(caption):
            draw.text((round(8 * unit), height + round(8 * unit) + i * line_h), line, fill=CAPTION_TEXT, font=caption_font)
    return np.asarray(canvas)


def tint_mask(image_rgb: np.ndarray, mask: np.ndarray, colour: RGB = PREDICTION_COLOUR) -> np.ndarray:
    """(H, W, 3) uint8 RGB + (H, W) bool -> a copy with the mask filled at MASK_OPACITY and its
    edge (mask pixels with a 4-neighbour outside it) in `colour`."""
    if mask.shape != image_rgb.shape[:2]:
        raise ValueError(f"mask of shape {mask.shape} does not match the image's {image_rgb.shape[:2]}")
    mask = mask.astype(bool)
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    tinted = image_rgb.astype(np.float32)
    tinted[mask] = (1 - MASK_OPACITY) * tinted[mask] + MASK_OPACITY * np.asarray(colour, dtype=np.float32)
    tinted[mask & ~inner] = colour
    return tinted.round().astype(np.uint8)


def dashed_rectangle(draw: ImageDraw.ImageDraw, box: Sequence[float], colour: RGB, width: int, dash: int) -> None:
    """Dashes of `colour` over a dark outline, visible on any background."""
    x1, y1, x2, y2 = box
    draw.rectangle(tuple(box), outline=OUTLINE_COLOUR, width=width)
    for (ax, ay), (bx, by) in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        length = max(abs(bx - ax), abs(by - ay), 1e-6)
        for start in np.arange(0.0, length, 2 * dash):
            t0, t1 = start / length, min(start + dash, length) / length
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                      fill=colour, width=width)


def _overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_tag(draw: ImageDraw.ImageDraw, text: str, box: Sequence[float], colour: RGB,
              font: ImageFont.FreeTypeFont, image_size: tuple[int, int],
              avoid: list[tuple[float, ...]]) -> tuple[float, float, float, float]:
    """A filled tag with `text` at a box's top-left corner: above the box, else below it, else
    just inside it; the first spot inside the image that covers none of `avoid`. Returns it."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(2, (bottom - top) // 5)
    tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
    x = min(max(0.0, box[0]), image_size[0] - tag_w)
    spots = [(x, box[1] - tag_h), (x, box[3]), (x, box[1])]
    inside = [(sx, sy) for sx, sy in spots if 0 <= sy and sy + tag_h <= image_size[1]] or [(x, 0.0)]
    free = [(sx, sy) for sx, sy in inside if not any(_overlaps((sx, sy, sx + tag_w, sy + tag_h), a) for a in avoid)]
    sx, sy = (free or inside)[0]
    draw.rectangle([sx, sy, sx + tag_w, sy + tag_h], fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text((sx + pad - left, sy + pad - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
    return sx, sy, sx + tag_w, sy + tag_h


def fitting_font(draw: ImageDraw.ImageDraw, lines: list[str], size: int, max_width: float) -> ImageFont.FreeTypeFont:
    """The bundled font at `size`, smaller if a line would not fit into max_width."""
    while True:
        font = ImageFont.load_default(size=size)
        if size <= 8 or max(draw.textlength(line, font=font) for line in lines) <= max_width:
            return font
        size -= 1


def save_picture(picture_rgb: np.ndarray, path: str) -> None:
    """Write an RGB picture; the format follows the extension (PNG, JPEG, ...)."""
    try:
        Image.fromarray(picture_rgb).save(path)
    except (ValueError, OSError) as error:
        raise ValueError(f"could not write picture to {path}: {error} (use a .png or .jpg path in a writable folder)") from error
