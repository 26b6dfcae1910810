"""Real speech for tests: espeak-ng utterances at 16 kHz with their known speech extent."""

import numpy as np

from csref_model.audio import SAMPLE_RATE, resample
from csref_training.spoken_shapes.speech import ESPEAK_SAMPLE_RATE, espeak

ESPEAK_DEFAULT_PITCH = 50


def espeak_16k(text: str, voice: str = "en-us+m3", words_per_minute: int = 160) -> np.ndarray:
    """espeak-ng speech, float32 mono at SAMPLE_RATE, trimmed to where the voice is audible."""
    wave = resample(espeak(text, voice, words_per_minute, ESPEAK_DEFAULT_PITCH), ESPEAK_SAMPLE_RATE)
    envelope = np.convolve(np.abs(wave), np.ones(160) / 160, mode="same")  # 10 ms moving average
    audible = np.nonzero(envelope > 0.02 * np.abs(wave).max())[0]
    return wave[audible[0] : audible[-1] + 1]


def speech_with_pauses(
    utterances: list[np.ndarray], pauses_s: list[float]
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """pause, utterance, pause, utterance, ..., pause -> (wave, true [(start_s, end_s)] of each utterance)."""
    assert len(pauses_s) == len(utterances) + 1
    parts, truth, time_s = [], [], 0.0
    for pause_s, utterance in zip(pauses_s, utterances):
        parts.append(np.zeros(round(pause_s * SAMPLE_RATE), dtype=np.float32))
        time_s += len(parts[-1]) / SAMPLE_RATE
        parts.append(utterance.astype(np.float32))
        truth.append((time_s, time_s + len(utterance) / SAMPLE_RATE))
        time_s += len(utterance) / SAMPLE_RATE
    parts.append(np.zeros(round(pauses_s[-1] * SAMPLE_RATE), dtype=np.float32))
    return np.concatenate(parts), truth


def add_noise(wave: np.ndarray, snr_db: float, colour: str, seed: int = 0) -> np.ndarray:
    """White or pink Gaussian noise at snr_db relative to the power of the non-silent part."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(len(wave))
    if colour == "pink":
        spectrum = np.fft.rfft(noise)
        spectrum /= np.sqrt(np.maximum(1, np.arange(len(spectrum))))  # 1/f power
        noise = np.fft.irfft(spectrum, len(wave))
    speech_power = np.mean(np.square(wave[np.abs(wave) > 1e-4]))
    noise *= np.sqrt(speech_power / 10 ** (snr_db / 10) / np.mean(np.square(noise)))
    return (wave + noise).astype(np.float32)
