"""A noisy copy of a RefCOCO-layout set, for robustness evaluation: babble or pink noise at an SNR.

    python -m csref_training.corrupt --data-root data/engines/espeak_heldout_clean \
        --out data/engines/espeak_heldout_babble --noise babble --snr-db-range 5,20 --seed 0

Every WAV under `<data-root>/audios/` is rewritten under `<out>/audios/` (same relative path, same
length) with noise added; everything else of the set (annotations, images, masks, the generator's
JSON) is copied unchanged, so `python -m csref_training.evaluate --data-root <out>` scores the same
entries on corrupted speech.

- babble: 3-6 other utterances of the same set, spoken by other voices than the one corrupted
  (when the set has them), each looped from a random start and summed at equal RMS
  (`csref_training.augment.babble`);
- pink: 1/f noise (`csref_training.augment.pink_noise`).

The SNR is that of the generator's own noise: speech power over the utterance's audible part (from
the first to the last sample above 1% of its peak), so silence padding does not lower it. Each
file's noise comes from a Generator seeded with (seed, file index), so a rerun writes identical
files; `<out>/corruption.json` records the arguments and every file's SNR and talkers.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from csref_model.audio import SAMPLE_RATE, load_audio_16k
from csref_training.augment import babble, pink_noise
from csref_training.cli_args import number_range
from csref_training.spoken_shapes.speech import trim_to_audible

NOISES = ("babble", "pink")


def audible_power(wave: np.ndarray) -> float:
    """Mean power between the first and last sample above AUDIBLE_FRACTION of the peak."""
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    if peak == 0.0:
        return 0.0
    return float(np.mean(np.square(trim_to_audible(wave), dtype=np.float64)))


def add_noise_at_snr(wave: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """wave + noise scaled to `snr_db` below the audible speech power, clipped to [-1, 1]."""
    speech_power = audible_power(wave)
    noise_power = float(np.mean(np.square(noise, dtype=np.float64)))
    if speech_power == 0.0 or noise_power == 0.0:
        return wave.astype(np.float32, copy=False)
    scale = np.sqrt(speech_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return np.clip(wave + scale * noise, -1.0, 1.0).astype(np.float32)


def corrupt_set(data_root: Path, out: Path, noise: str, snr_db_range: tuple[float, float],
                talkers_range: tuple[int, int], seed: int) -> dict:
    """Writes the noisy copy of `data_root` to `out` (which must not exist) and returns its record."""
    if noise not in NOISES:
        raise ValueError(f"noise {noise!r} is not one of {', '.join(NOISES)}")
    if not (data_root / "audios").is_dir():
        raise FileNotFoundError(f"{data_root} has no audios/ folder: is it a RefCOCO-layout set "
                                "(python -m csref_training.spoken_shapes writes one)?")
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out (a corrupted copy is never overwritten)")
    wavs = sorted(path.relative_to(data_root) for path in (data_root / "audios").rglob("*.wav"))
    if not wavs:
        raise FileNotFoundError(f"{data_root / 'audios'} holds no .wav files")
    if noise == "babble" and len(wavs) < 2:
        raise ValueError(f"babble needs other utterances, and {data_root / 'audios'} holds only one")

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for entry in data_root.iterdir():
        if entry.name == "audios":
            continue
        target = partial / entry.name
        shutil.copytree(entry, target) if entry.is_dir() else shutil.copy2(entry, target)

    files = {}
    for index, relative in enumerate(wavs):
        rng = np.random.default_rng([seed, index])
        wave = load_audio_16k(data_root / relative)
        snr_db = float(round(rng.uniform(*snr_db_range), 2))
        record: dict = {"snr_db": snr_db}
        if noise == "babble":
            others = [other for other in wavs if other.parent != relative.parent] or [w for w in wavs if w != relative]
            count = min(int(rng.integers(talkers_range[0], talkers_range[1] + 1)), len(others))
            chosen = [others[i] for i in rng.choice(len(others), size=count, replace=False)]
            noise_wave = babble(len(wave), [load_audio_16k(data_root / path) for path in chosen], rng)
            record["talkers"] = [str(path) for path in chosen]
        else:
            noise_wave = pink_noise(len(wave), rng)
        (partial / relative).parent.mkdir(parents=True, exist_ok=True)
        sf.write(partial / relative, add_noise_at_snr(wave, noise_wave, snr_db), SAMPLE_RATE, subtype="PCM_16")
        files[str(relative)] = record

    summary = {"source": str(data_root), "noise": noise, "snr_db_range": list(snr_db_range),
               "talkers_range": list(talkers_range), "seed": seed, "files": files}
    (partial / "corruption.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    partial.rename(out)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m csref_training.corrupt", description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, required=True, help="the clean RefCOCO-layout set")
    parser.add_argument("--out", type=Path, required=True, help="where the noisy copy goes (must not exist)")
    parser.add_argument("--noise", choices=NOISES, required=True)
    parser.add_argument("--snr-db-range", type=number_range(float), default=(5.0, 20.0),
                        help="SNR drawn uniformly per utterance, in dB (default 5,20)")
    parser.add_argument("--talkers", type=number_range(int), default=(3, 6),
                        help="babble: number of other utterances mixed (default 3,6)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.talkers[0] < 1:
        parser.error("--talkers must be at least 1")
    try:
        summary = corrupt_set(args.data_root, args.out, args.noise, args.snr_db_range, args.talkers, args.seed)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    print(f"wrote {len(summary['files'])} noisy WAVs ({args.noise}, {args.snr_db_range[0]:g}-"
          f"{args.snr_db_range[1]:g} dB) to {args.out}")


if __name__ == "__main__":
    main()
