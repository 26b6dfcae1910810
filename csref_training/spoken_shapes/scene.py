"""Scene layout: the shapes' geometry, where objects go (sizes, margins, contrast with the
background) and which objects share a scene with the target.

Sizes (docs/SPOKEN_SHAPES.md, "Scenes"): a big object's box area is at least BIG_TO_SMALL_AREA
times any small object's in the same image. By default the sizes come from fixed ranges;
`scene_scale` draws them per scene instead (a model must then compare sizes within the picture).
"""

from __future__ import annotations

import numpy as np

from csref_training.spoken_shapes.grammar import (
    COLOURS,
    SHAPES,
    SIZES,
    Expression,
    SceneObject,
    describe,
    referents,
)

BOX_MARGIN_PX = 8  # minimum gap between object boxes, and between a box and the image border
MIN_CONTRAST = 80.0  # minimum RGB distance between an object's colour and the background under it
PLACEMENT_TRIES = 40  # random spots tried per object
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
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
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
    colour, big ones first (they are the hardest to fit), PLACEMENT_TRIES tries each. Keyed by
    the index in `wanted`; an object that found no spot is missing."""
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
        for _ in range(PLACEMENT_TRIES):
            x0 = rng.uniform(BOX_MARGIN_PX, width - BOX_MARGIN_PX - w)
            y0 = rng.uniform(BOX_MARGIN_PX, height - BOX_MARGIN_PX - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(_boxes_clear(box, o.box, BOX_MARGIN_PX) for o in placed.values()) and \
                    _contrast_ok(background, box, colour):
                placed[i] = SceneObject(shape, colour, size, box)
                break
    return placed


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


def sample_layout(
    rng: np.random.Generator, background: np.ndarray, scene_scale: tuple[float, float] | None = None,
    max_attempts: int = 200,
) -> tuple[list[SceneObject], int, Expression]:
    """Draws 3-6 objects on `background`'s canvas until the target has a unique description.

    Returns (objects, target index, its shortest expression).
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


def layout_for_expression(
    expression: Expression, rng: np.random.Generator, background: np.ndarray, max_attempts: int = 5000,
) -> tuple[list[SceneObject], int]:
    """The inverse of sample_layout: (objects, target index) of a scene in which `expression` is
    what the generator would say of the target. It picks out exactly the target, and no
    expression with fewer attributes (or as many but fewer place words) does.

    Besides distractors drawn as sample_layout draws them, each attribute the expression names
    gets a foil that only that attribute tells apart from the target (another colour, the other
    size, an identical twin per place word), so that long expressions are needed often enough.
    Raises ValueError when no such scene came up in `max_attempts` draws.
    """
    height, width = background.shape[:2]
    for _ in range(max_attempts):
        shape = expression.shape
        colour = expression.colour or str(rng.choice(list(COLOURS)))
        size = expression.size or str(rng.choice(SIZES))
        foils = [(shape, colour, size)] * expression.num_place
        if expression.colour:
            foils.append((shape, str(rng.choice([c for c in COLOURS if c != colour])), size))
        if expression.size:
            foils.append((shape, colour, "big" if size == "small" else "small"))
        extra = max(0, int(rng.integers(2, 6)) - len(foils))
        wanted = [(shape, colour, size), *foils, *(distractor_attrs(rng, shape, colour, size) for _ in range(extra))]
        placed = place_objects(rng, background, wanted)
        if len(placed) < len(wanted):
            continue
        objects = [placed[i] for i in range(len(wanted))]
        if not size_classes_separated(objects):
            continue
        if referents(expression, objects, width, height) != [0]:
            continue
        shortest = describe(0, objects, width, height, rng)
        if (shortest.num_optional, shortest.num_place) != (expression.num_optional, expression.num_place):
            continue
        order = rng.permutation(len(objects))  # the target's index carries no information
        return [objects[i] for i in order], int(np.flatnonzero(order == 0)[0])
    raise ValueError(
        f'could not draw a scene in which "{expression.text}" is the shortest description of one object '
        f"in {max_attempts} tries on a {width}x{height} canvas")
