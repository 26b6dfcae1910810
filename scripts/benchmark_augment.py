"""Cost of waveform augmentation (csref_training.augment) per utterance, op by op.

    .venv/bin/python scripts/benchmark_augment.py [--config config/train/csa_spoken_shapes_augmented.yaml]
        [--utterances 40] [--data-root data/spoken_shapes]

Speech: espeak-ng Spoken Shapes expressions (the generator's own rendering, 1-3 s). Each op runs
on every utterance with parameters drawn from the config's ranges (probability 1), then the whole
augmenter at the config's probabilities (the expected cost per training item). Babble talkers
come from the same utterances in memory; with `--data-root` the CSA training dataset of that set
is also read item by item, clean and augmented, so file reads of babble talkers are included.
Times are process CPU milliseconds (the ops are single-threaded) over the utterances.
"""

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from csref_model.audio import SAMPLE_RATE
from csref_training import augment
from csref_training.augment import AugmentConfig, WaveformAugmenter
from csref_training.datasets import build_csa_dataset
from csref_training.reproducibility import SeededItems
from csref_training.spoken_shapes.speech import render_speech
from csref_training.train_config import load_train_config

TEXTS = (
    "the red circle",
    "pick up the small blue square on the left",
    "give me the green triangle next to the yellow star",
    "the big purple hexagon below the orange circle",
    "point at the cross",
)
VOICES = ("en-us+m3", "en-gb+f2", "en-029", "en-gb-scotland+m1")


def cpu_ms(function: Callable[[], object]) -> float:
    start = time.process_time()
    function()
    return 1000 * (time.process_time() - start)


def op_timings(cfg: AugmentConfig, waves: list[np.ndarray], rng: np.random.Generator) -> dict[str, list[float]]:
    """CPU ms of each op (forced on, parameters from the config's ranges) on every wave."""
    ops: dict[str, Callable[[np.ndarray], object]] = {
        "speed": lambda w: augment.change_speed(w, rng.uniform(*cfg.speed.factor)),
        "pitch": lambda w: augment.shift_pitch(w, rng.uniform(*cfg.pitch.semitones)),
        "formant": lambda w: augment.warp_formants(w, rng.uniform(*cfg.formant.warp)),
        "reverb": lambda w: augment.reverberate(w, augment.room_impulse_response(
            rng.uniform(*cfg.reverb.rt60_s), rng.uniform(*cfg.reverb.drr_db), rng)),
        "babble": lambda w: augment.mix_at_snr(w, augment.babble(
            len(w), [waves[i] for i in rng.integers(len(waves), size=cfg.babble.talkers[1])], rng), 10.0),
        "pink_noise": lambda w: augment.mix_at_snr(w, augment.pink_noise(len(w), rng), 10.0),
        "band_limit": lambda w: augment.band_limit(w, rng.uniform(*cfg.band_limit.low_hz),
                                                   rng.uniform(*cfg.band_limit.high_hz)),
    }
    augmenter = WaveformAugmenter(cfg, len(waves), lambda i: waves[i])
    ops["all, at the config's probabilities"] = lambda w: augmenter(w, rng)
    for op in ops.values():  # warm-up: FFT plans, filter design imports
        op(waves[0])
    return {name: [cpu_ms(lambda: op(w)) for w in waves] for name, op in ops.items()}


def dataset_timings(cfg_path: Path, data_root: Path, count: int) -> dict[str, list[float]]:
    """CPU ms to read each of `count` CSA training items, clean and augmented."""
    cfg = load_train_config(cfg_path, [f"data.root={data_root}"])
    result = {}
    for label, augment_cfg in (("clean item", None), ("augmented item", cfg.augment)):
        items = SeededItems(build_csa_dataset(cfg.data, cfg.data.train_split, True, augment_cfg))
        keys = [(i % len(items), i) for i in range(count)]
        items[keys[0]]
        result[label] = [cpu_ms(lambda: items[key]) for key in keys]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/train/csa_spoken_shapes_augmented.yaml"),
                        help="training YAML whose augment: section is measured")
    parser.add_argument("--utterances", type=int, default=40)
    parser.add_argument("--data-root", type=Path, help="also time dataset items of this Spoken Shapes set")
    args = parser.parse_args()

    cfg = load_train_config(args.config).augment
    rng = np.random.default_rng(0)
    waves = [render_speech(rng, TEXTS[i % len(TEXTS)], VOICES[i % len(VOICES)], int(rng.integers(130, 211)),
                           int(rng.integers(20, 81)), None) for i in range(args.utterances)]
    seconds = statistics.median(len(w) / SAMPLE_RATE for w in waves)
    print(f"{len(waves)} utterances, median {seconds:.2f} s; CPU ms per utterance\n")
    print("| op | mean ms | median ms | p90 ms |")
    print("| --- | --- | --- | --- |")
    timings = op_timings(cfg, waves, rng)
    if args.data_root:
        timings.update({f"CSA dataset, {label}": times
                        for label, times in dataset_timings(args.config, args.data_root, args.utterances).items()})
    for name, times in timings.items():
        print(f"| {name} | {statistics.mean(times):.2f} | {statistics.median(times):.2f} | "
              f"{np.percentile(times, 90):.2f} |")


if __name__ == "__main__":
    main()
