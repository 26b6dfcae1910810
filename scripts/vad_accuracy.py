"""Frame precision, recall and F1 of the VAD backends (csref_ros.vad) on speech with silences,
clean and mixed with babble or pink noise.

    .venv/bin/python scripts/vad_accuracy.py [--utterances 40] [--seed 0] [--snr-db 0,5,10]

There is no human recording on these machines, so the speech comes from TTS engines the VAD was
NOT tuned on (its tests use espeak-ng only): festival's HTS and diphone voices and flite's
voices, one spoken command each, placed between silences of 0.5-2.5 s. The reference labels come
from the placement: a 10 ms frame is speech when it lies inside an utterance, from the first to
the last audible sample (pauses between words inside a command count as speech, since a
segmenter must bridge them). Babble is the sum of 5 other talkers (other voices, other commands,
back to back for the whole stream, so it runs through the silences too); pink noise is 1/f
Gaussian noise. The SNR is speech power (over the speech frames) to noise power.

What is scored is what the node uses: the segmenter's utterances [start_s, end_s] (the
VadConfig defaults, only `backend` differs; plus silero without the energy gate), turned into
frame labels. Prints a markdown table.
"""

import argparse
import time

import numpy as np

from csref_model.audio import SAMPLE_RATE
from csref_ros.vad import VadConfig, segment_wave
from csref_training.spoken_shapes.grammar import CARRIER_PHRASES, COLOURS, HORIZONTAL_PLACES, SHAPES, SIZES
from csref_training.spoken_shapes.speech import synthesize

FRAME_S = 0.01  # label grid
SPEECH_VOICES = ("festival:slt_hts", "festival:ked", "festival:kal", "flite:slt", "flite:awb", "flite:rms")
BABBLE_VOICES = ("flite:kal16", "en-us+m3", "en-gb+f2", "festival:slt_hts", "flite:awb")
PAUSE_RANGE_S = (0.5, 2.5)


def random_command(rng: np.random.Generator) -> str:
    words = [CARRIER_PHRASES[rng.integers(len(CARRIER_PHRASES))], "the"]
    if rng.random() < 0.5:
        words.append(SIZES[rng.integers(len(SIZES))])
    words += [list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]]
    if rng.random() < 0.5:
        words.append(list(HORIZONTAL_PLACES.values())[rng.integers(len(HORIZONTAL_PLACES))])
    return " ".join(words)


def spoken(rng: np.random.Generator, voice: str) -> np.ndarray:
    """One command in `voice`, trimmed to its audible extent, peak 0.3-0.9."""
    wave = synthesize(random_command(rng), voice, rate=int(rng.integers(140, 200)), pitch=int(rng.integers(30, 70)))
    audible = np.flatnonzero(np.abs(wave) > 0.01 * np.abs(wave).max())
    wave = wave[audible[0] : audible[-1] + 1]
    return wave * (rng.uniform(0.3, 0.9) / np.abs(wave).max())


def speech_stream(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """pause, command, pause, ..., pause -> (wave (N,), speech label per FRAME_S frame (F,) bool)."""
    parts, intervals, position = [], [], 0
    for index in range(count + 1):
        pause = np.zeros(int(rng.uniform(*PAUSE_RANGE_S) * SAMPLE_RATE), dtype=np.float32)
        parts.append(pause)
        position += len(pause)
        if index < count:
            utterance = spoken(rng, SPEECH_VOICES[index % len(SPEECH_VOICES)])
            parts.append(utterance)
            intervals.append((position, position + len(utterance)))
            position += len(utterance)
    wave = np.concatenate(parts).astype(np.float32)
    labels = np.zeros(int(len(wave) / SAMPLE_RATE / FRAME_S), dtype=bool)
    for begin, end in intervals:
        labels[round(begin / SAMPLE_RATE / FRAME_S) : round(end / SAMPLE_RATE / FRAME_S)] = True
    return wave, labels


def babble(rng: np.random.Generator, num_samples: int) -> np.ndarray:
    """Sum of len(BABBLE_VOICES) talkers, each speaking commands back to back for num_samples."""
    total = np.zeros(num_samples)
    for voice in BABBLE_VOICES:
        talker = [np.zeros(int(rng.integers(0, SAMPLE_RATE)))]
        while sum(map(len, talker)) < num_samples:
            talker.append(spoken(rng, voice))
        total += np.concatenate(talker)[:num_samples]
    return total


def pink_noise(rng: np.random.Generator, num_samples: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    spectrum /= np.sqrt(np.maximum(1, np.arange(len(spectrum))))  # 1/f power
    return np.fft.irfft(spectrum, num_samples)


def mix(wave: np.ndarray, labels: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    speech_mask = np.repeat(labels, int(FRAME_S * SAMPLE_RATE))
    speech_power = float(np.mean(np.square(wave[: len(speech_mask)][speech_mask], dtype=np.float64)))
    noise = noise * np.sqrt(speech_power / 10 ** (snr_db / 10) / np.mean(np.square(noise)))
    mixed = wave + noise
    return (mixed / max(1.0, float(np.abs(mixed).max()))).astype(np.float32)  # no clipping


# Column name -> the settings scored (the rest are VadConfig's defaults).
SETUPS = {
    "webrtc": {"backend": "webrtc"},
    "silero": {"backend": "silero"},
    "silero, no energy gate": {"backend": "silero", "energy_margin_db": 0.0},
}


def predicted_labels(wave: np.ndarray, settings: dict, num_frames: int) -> np.ndarray:
    labels = np.zeros(num_frames, dtype=bool)
    for utterance in segment_wave(wave, VadConfig(**settings)):
        labels[round(utterance.start_s / FRAME_S) : round(utterance.end_s / FRAME_S)] = True
    return labels


def scores(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float, float]:
    true_positives = float(np.sum(truth & predicted))
    precision = true_positives / max(1.0, float(np.sum(predicted)))
    recall = true_positives / max(1.0, float(np.sum(truth)))
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return precision, recall, f1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=40, help="commands in the stream (default 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snr-db", default="0,5,10", help="comma-separated SNRs in dB (default 0,5,10)")
    args = parser.parse_args()
    if args.utterances < 1:
        parser.error("--utterances must be >= 1")
    snrs_db = [float(value) for value in args.snr_db.split(",") if value]

    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    wave, truth = speech_stream(rng, args.utterances)
    babble_noise, pink = babble(rng, len(wave)), pink_noise(rng, len(wave))
    conditions = [("clean", wave)]
    for snr_db in snrs_db:
        conditions.append((f"babble {snr_db:g} dB", mix(wave, truth, babble_noise, snr_db)))
    for snr_db in snrs_db:
        conditions.append((f"pink noise {snr_db:g} dB", mix(wave, truth, pink, snr_db)))

    header = "| condition | " + " | ".join(f"{name} P | R | F1" for name in SETUPS) + " |"
    print(f"{args.utterances} commands ({', '.join(SPEECH_VOICES)}), {len(wave) / SAMPLE_RATE:.0f} s, "
          f"{truth.mean():.0%} speech frames, seed {args.seed}\n")
    print(header)
    print("|---|" + "---:|" * 3 * len(SETUPS))
    for name, mixed in conditions:
        cells = []
        for settings in SETUPS.values():
            cells += [f"{value:.3f}" for value in scores(truth, predicted_labels(mixed, settings, len(truth)))]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
