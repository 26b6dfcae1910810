"""The words of Spoken Shapes and what they mean: the vocabulary, the objects an expression can
refer to, `referents` (which objects an expression picks out), `describe` (the shortest
expression for an object) and its inverse `parse_expression` (a spoken command's text back
into the attributes it names), and `scene_caption` (a whole-scene description for
image<->speech retrieval).

Meaning (docs/SPOKEN_SHAPES.md, "Referring expressions"): the candidates are the objects with
the named shape, colour and size; place words then keep the candidate x for which every other
candidate o is ruled out by at least one named place word. "on the left" rules o out when o's
centre is at least PLACE_MARGIN of the image width to the right of x's, "on the right"
mirrored, "at the top"/"at the bottom" likewise with the height, and "in the middle" when o's
centre is at least PLACE_MARGIN of the width farther from the vertical centre line than x's
(x itself must lie within MIDDLE_BAND of the width from that line).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
# Colour words and the RGB each is drawn in (render.py jitters it per object).
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
PLACE_MARGIN = 0.10  # fraction of the image width (height) that separates place words
MIDDLE_BAND = 0.125  # "in the middle" needs the centre within this fraction of the width from the centre line


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


def overspecify(
    expr: Expression, target: int, objects: list[SceneObject], width: int, height: int, rng: np.random.Generator,
    prob: float,
) -> Expression:
    """`expr` with each attribute it leaves out added with probability `prob`, as speakers often
    name more than they need ("the small red circle" for the only red circle).

    Colour and size are the target's own. A place word is added only where it holds of the image as
    a whole: "on the left" / "on the right" in the outer thirds of the width, "in the middle"
    within MIDDLE_BAND of the centre line, "at the top" / "at the bottom" in the outer thirds of the
    height. An addition that would let the command fit another object too (a place word that holds
    of the image but not among the candidates) is skipped.
    """
    t = objects[target]
    horizontal = ("left" if t.cx < width / 3 else "right" if t.cx > 2 * width / 3
                  else "middle" if abs(t.cx - width / 2) <= MIDDLE_BAND * width else None)
    vertical = "top" if t.cy < height / 3 else "bottom" if t.cy > 2 * height / 3 else None
    for name, value in (("colour", t.colour), ("size", t.size), ("horizontal", horizontal), ("vertical", vertical)):
        if getattr(expr, name) is not None or value is None or rng.random() >= prob:
            continue
        richer = dataclasses.replace(expr, **{name: value})
        if referents(richer, objects, width, height) == [target]:
            expr = richer
    return expr


# "the [size] [colour] <shape> [horizontal place] [vertical place]": the word order of Expression.text.
EXPRESSION_PATTERN = re.compile(
    r"the"
    rf"(?: (?P<size>{'|'.join(SIZES)}))?"
    rf"(?: (?P<colour>{'|'.join(COLOURS)}))?"
    rf" (?P<shape>{'|'.join(SHAPES)})"
    rf"(?: (?P<horizontal>{'|'.join(HORIZONTAL_PLACES.values())}))?"
    rf"(?: (?P<vertical>{'|'.join(VERTICAL_PLACES.values())}))?"
)
COMMAND_FORM = (
    f"[{' | '.join(CARRIER_PHRASES)}] the [{' | '.join(SIZES)}] [{' | '.join(COLOURS)}] <{' | '.join(SHAPES)}> "
    f"[{' | '.join(HORIZONTAL_PLACES.values())}] [{' | '.join(VERTICAL_PLACES.values())}]"
)


def parse_expression(text: str) -> Expression:
    """The inverse of Expression.text: the attributes a command names, after an optional carrier
    phrase ("pick up ..."); case, commas and extra spaces are ignored. Raises ValueError for a
    sentence outside the grammar."""
    words = " ".join(text.lower().replace(",", " ").split())
    for carrier in CARRIER_PHRASES:
        if words.startswith(carrier + " "):
            words = words[len(carrier) + 1:]
            break
    match = EXPRESSION_PATTERN.fullmatch(words)
    if match is None:
        raise ValueError(
            f"{text!r} is not a Spoken Shapes command. Say: {COMMAND_FORM}, "
            f'e.g. "pick up the small blue square on the left"')
    places = {phrase: key for key, phrase in {**HORIZONTAL_PLACES, **VERTICAL_PLACES}.items()}
    return Expression(
        shape=match["shape"],
        colour=match["colour"],
        size=match["size"],
        horizontal=places.get(match["horizontal"]),
        vertical=places.get(match["vertical"]),
    )


def scene_caption(objects: list[SceneObject]) -> str:
    """A description of every object of a scene, in the order given: "a big red circle, a small
    blue star and a big green cross". Its words (commas are not words) are `caption_words`."""
    phrases = [f"a {o.size} {o.colour} {o.shape}" for o in objects]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_words(caption: str) -> list[str]:
    """The spoken words of a caption, in order."""
    return caption.replace(",", " ").split()
