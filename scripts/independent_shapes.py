"""A second, independent Spoken Shapes test set, to check that a model did not learn our generator.

    python scripts/independent_shapes.py --out data/spoken_shapes_independent --count 300
        [--voices en-us,en-gb+f2] [--snr-db-range 10,30 | none]
    python -m csref_training.evaluate --config config/train/srec_spoken_shapes.yaml \
        --checkpoint models/spoken_shapes_tiny --data-root data/spoken_shapes_independent --splits test

Written from docs/SPOKEN_SHAPES.md alone, sharing no code or constants with `csref_training.spoken_shapes`:
other colour values (jittered per object), other shape geometry (a fatter star, a thinner
cross, a rounder triangle), shapes rasterised by PIL at 4x and downsampled instead of drawn by
OpenCV, object sizes from another distribution, espeak-ng voice variants that neither of the
generator's voice lists uses, a wider rate and pitch range, and babble (other espeak-ng speech)
plus pink noise at 5-20 dB SNR on every utterance (the defaults; --voices and --snr-db-range
separate the voice, noise and picture effects). The layout is the official one, so the
evaluator reads it as it reads any RefCOCO-speech dataset.
"""

import argparse
import itertools
import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.signal import resample_poly
from skimage import data as skimage_data

SAMPLE_RATE = 16000
COLOURS = {
    "red": (205, 25, 45), "green": (20, 140, 70), "blue": (25, 60, 190), "yellow": (250, 225, 60),
    "purple": (120, 40, 160), "orange": (235, 120, 20), "white": (240, 240, 235), "black": (25, 25, 30),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
# espeak-ng variants in neither TRAIN_VARIANTS nor HELDOUT_VARIANTS of csref_training.spoken_shapes.speech, and
# not robotic or whispered.
VOICES = tuple(f"{language}+{variant}" for language, variant in itertools.product(
    ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc"),
    ("adam", "antonio", "benjamin", "caleb", "edward2", "grandpa", "iven3", "michel", "miguel",
     "pablo", "pedro", "sandro", "steph2", "zac", "Hugo", "Marco")))
CARRIERS = ("pick up", "grab", "give me", "point at", "find", "where is")
BABBLE_TEXT = ("the weather is nice today", "please close the door", "where did you put my keys",
               "lunch is ready in ten minutes", "turn left at the next corner")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


def shape_polygon(shape: str, x: float, y: float, side: float) -> list[tuple[float, float]] | None:
    """Outline of `shape` in the square (x, y, side); None for the circle (drawn as an ellipse)."""
    cx, cy, r = x + side / 2, y + side / 2, side / 2
    if shape == "square":
        return [(x, y), (x + side, y), (x + side, y + side), (x, y + side)]
    if shape == "diamond":
        return [(cx, y), (x + side, cy), (cx, y + side), (x, cy)]
    if shape == "triangle":
        return [(cx, y), (x + side, y + side * 0.9), (x, y + side * 0.9)]
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.55)
        return [(cx + rad * np.cos(a), cy - rad * np.sin(a)) for a, rad in zip(angles, radii)]
    if shape == "cross":
        t = side * 0.13
        return [(cx - t, y), (cx + t, y), (cx + t, cy - t), (x + side, cy - t), (x + side, cy + t), (cx + t, cy + t),
                (cx + t, y + side), (cx - t, y + side), (cx - t, cy + t), (x, cy + t), (x, cy - t), (cx - t, cy - t)]
    return None


def background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    kind = rng.integers(3)
    if kind == 0:
        return Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(60, 200, 3)))
    if kind == 1:
        a, b = rng.integers(40, 220, 3), rng.integers(40, 220, 3)
        t = np.linspace(0, 1, height)[:, None, None]
        column = (a * (1 - t) + b * t).astype(np.uint8)
        return Image.fromarray(np.repeat(column, width, axis=1))
    photo = Image.fromarray(getattr(skimage_data, PHOTOS[rng.integers(len(PHOTOS))])()).convert("RGB")
    scale = max(width / photo.width, height / photo.height) * rng.uniform(1.0, 1.4)
    photo = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1))
    left, top = rng.integers(photo.width - width + 1), rng.integers(photo.height - height + 1)
    return photo.crop((left, top, left + width, top + height))


def make_scene(rng: np.random.Generator) -> tuple[Image.Image, list[dict]] | None:
    width, height = (int(v) for v in rng.integers(320, 641, 2))
    base = rng.uniform(26, 44) * min(width, height) / 400
    objects: list[dict] = []
    for _ in range(int(rng.integers(3, 7))):
        size = "big" if rng.random() < 0.45 else "small"
        side = base * (rng.uniform(1.75, 2.1) if size == "big" else rng.uniform(0.95, 1.05))
        for _attempt in range(100):
            x, y = rng.uniform(4, width - side - 4), rng.uniform(4, height - side - 4)
            if all(x > o["x"] + o["side"] + 10 or o["x"] > x + side + 10 or
                   y > o["y"] + o["side"] + 10 or o["y"] > y + side + 10 for o in objects):
                break
        else:
            return None
        objects.append({"shape": SHAPES[rng.integers(6)], "colour": list(COLOURS)[rng.integers(8)],
                        "size": size, "x": x, "y": y, "side": side})
    scale = 4
    canvas = background(rng, width, height).resize((width * scale, height * scale))
    for o in objects:
        fill = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in COLOURS[o["colour"]])
        x, y, side = o["x"] * scale, o["y"] * scale, o["side"] * scale
        polygon = shape_polygon(o["shape"], x, y, side)
        mask = Image.new("L", canvas.size)
        if polygon is None:
            ImageDraw.Draw(mask).ellipse((x, y, x + side, y + side), fill=255)
        else:
            ImageDraw.Draw(mask).polygon(polygon, fill=255)
        canvas.paste(Image.new("RGB", canvas.size, fill), mask=mask)
        left, top, right, bottom = mask.getbbox()
        o["box"] = [left / scale, top / scale, (right - left) / scale, (bottom - top) / scale]
    return canvas.resize((width, height), Image.LANCZOS), objects


def describe(target: dict, objects: list[dict], width: int, height: int) -> str | None:
    """The shortest unique description (docs/SPOKEN_SHAPES.md), or None when there is none."""
    def centre(o: dict, axis: int) -> float:
        return o["box"][axis] + o["box"][axis + 2] / 2

    for n_words in range(4):
        for words in itertools.combinations(("colour", "size", "horizontal", "vertical"), n_words):
            rivals = [o for o in objects if o is not target and o["shape"] == target["shape"]
                      and all(o[w] == target[w] for w in words if w in ("colour", "size"))]
            phrase = {}
            for word, axis, extent, names in (("horizontal", 0, width, ("on the left", "on the right")),
                                              ("vertical", 1, height, ("at the top", "at the bottom"))):
                if word not in words:
                    continue
                margin = 0.1 * extent
                if all(centre(target, axis) + margin < centre(o, axis) for o in rivals):
                    phrase[word] = names[0]
                elif all(centre(target, axis) > centre(o, axis) + margin for o in rivals):
                    phrase[word] = names[1]
                else:
                    break
            else:
                if rivals and not any(w in phrase for w in ("horizontal", "vertical")):
                    continue
                if "size" in words and all(o["size"] == target["size"] for o in objects):
                    continue
                return " ".join(["the"] + [target[w] for w in ("size", "colour") if w in words] + [target["shape"]]
                                + [phrase[w] for w in ("horizontal", "vertical") if w in phrase])
    return None


def speak(text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", text],
                         capture_output=True, check=True).stdout
    samples = np.frombuffer(wav[44:], dtype=np.int16).astype(np.float64) / 32768
    return resample_poly(samples, 320, 441)  # espeak-ng writes 22050 Hz


def pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    return np.fft.irfft(spectrum, n)


def utterance(rng: np.random.Generator, text: str, voice: str, snr_db_range: tuple[float, float] | None
              ) -> tuple[np.ndarray, dict]:
    rate, pitch = int(rng.integers(110, 231)), int(rng.integers(15, 86))
    speech = speak(text, voice, rate, pitch)
    pad = [np.zeros(int(rng.uniform(0.1, 0.5) * SAMPLE_RATE)) for _ in range(2)]
    speech = np.concatenate([pad[0], speech, pad[1]])
    snr_db = None
    if snr_db_range is not None:
        babble = np.zeros_like(speech)
        for line in rng.choice(BABBLE_TEXT, 2, replace=False):
            other = speak(line, VOICES[rng.integers(len(VOICES))], int(rng.integers(140, 200)), 50)[: len(speech)]
            start = int(rng.integers(0, len(speech) - len(other) + 1))
            babble[start:start + len(other)] += other
        noise = babble / (np.std(babble) + 1e-9) + pink_noise(rng, len(speech))
        snr_db = round(float(rng.uniform(*snr_db_range)), 2)
        speech = speech + noise * np.sqrt(np.mean(speech ** 2) / np.mean(noise ** 2) / 10 ** (snr_db / 10))
    speech *= rng.uniform(0.3, 0.8) / np.abs(speech).max()
    return (speech * 32767).astype(np.int16), {"rate": rate, "pitch": pitch, "snr_db": snr_db}


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(samples.tobytes())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--voices", default=",".join(VOICES), help="comma-separated espeak-ng voices")
    parser.add_argument("--snr-db-range", default="5,20", help="babble + pink noise SNR range; 'none' = clean")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    voices = args.voices.split(",")
    snr_db_range = None if args.snr_db_range == "none" else tuple(float(v) for v in args.snr_db_range.split(","))
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    while len(entries) < args.count:
        scene = make_scene(rng)
        if scene is None:
            continue
        image, objects = scene
        target = objects[rng.integers(len(objects))]
        text = describe(target, objects, image.width, image.height)
        if text is None:
            continue
        if rng.random() < 0.5:
            text = f"{CARRIERS[rng.integers(len(CARRIERS))]} {text}"
        iid = len(entries)
        voice = voices[rng.integers(len(voices))]
        samples, conditions = utterance(rng, text, voice, snr_db_range)
        audio_dir = args.out / "audios" / "spoken_shapes" / voice
        audio_dir.mkdir(parents=True, exist_ok=True)
        write_wav(audio_dir / f"{iid}.wav", samples)
        image.save(args.out / "images" / f"{iid:012d}.jpg", quality=90)
        entries.append({"iid": iid, "bbox": [round(v, 3) for v in target["box"]], "sent_ids": [iid],
                        "refs": [{"sent_id": iid, "sent": text, "speaker": voice, **conditions}]})
    (args.out / "anns").mkdir(exist_ok=True)
    (args.out / "anns" / "spoken_shapes.json").write_text(json.dumps({"train": [], "val": [], "test": entries}))
    print(f"{len(entries)} samples in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
