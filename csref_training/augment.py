"""Waveform augmentation of 16 kHz float speech for training: other speakers, rooms, noise, channels.

Each operation is a small deterministic function of its parameters (its randomness, where it
has any, comes from the numpy Generator passed in):

| op | function | parameter (config default range) |
| --- | --- | --- |
| speed / tempo | `change_speed` | factor 0.9-1.1: duration / factor, pitch x factor (resampling) |
| pitch | `shift_pitch` | -3..+3 semitones, duration kept (phase vocoder, then resampling) |
| vocal-tract length | `warp_formants` | warp 0.88-1.12 of the frequency axis of the STFT magnitude |
| room | `reverberate` | synthetic RIR: RT60 0.2-0.8 s, direct-to-reverberant ratio 0-10 dB |
| babble | `babble` + `mix_at_snr` | 3-6 other utterances of the training set, SNR 0-20 dB |
| pink noise | `pink_noise` + `mix_at_snr` | 1/f noise, SNR 0-20 dB |
| channel | `band_limit` | telephone 300-3400 Hz, or a cheap microphone's band (low 100-500 Hz, high 2.5-6 kHz) |

`WaveformAugmenter` composes them in that order (the speaker's voice, then the room, then the
noise in the room, then the microphone or line), each with its own probability, as the
`augment:` section of a training config (`AugmentConfig`) says; it is off by default. The
datasets (`csref_training.datasets`) apply it to training items only, with a Generator seeded
from the item's seed, so a resumed run augments exactly as an uninterrupted one would.

Vocal-tract length: the magnitude of each STFT frame is resampled along the frequency axis
(piecewise linear, Nyquist kept in place) and resynthesised with the original phase. The phase
carries each harmonic's frequency, so f0 and duration stay while the spectral envelope
(formants) moves by the warp factor, in one STFT/ISTFT pass. A resample-based formant shift
would need a second, formant-preserving pitch correction (two passes and an envelope model)
for the same effect.

Every op keeps the length of its input except `change_speed` (and so `shift_pitch` keeps it by
construction); all return float32. Costs per op are measured by `scripts/benchmark_augment.py`
(docs/TRAINING.md, "Augmentation").
"""

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import soxr
from numpy.lib.stride_tricks import sliding_window_view
from scipy.fft import next_fast_len
from scipy.signal import butter, fftconvolve, sosfilt

from csref_model.audio import SAMPLE_RATE

# STFT of the phase vocoder and the formant warp: 32 ms Hann frames, 75% overlap.
N_FFT = 512
HOP = 128
OVERLAP = N_FFT // HOP
TELEPHONE_BAND_HZ = (300.0, 3400.0)
# Butterworth band-pass order (per edge): 24 dB/octave, enough to remove a band's energy audibly.
BAND_ORDER = 4
# Amplitude falls by 60 dB over RT60: exp(-DECAY * t / RT60) with DECAY = 3 ln 10.
DECAY_60DB = 3.0 * math.log(10.0)
# The reverberant tail starts after the direct sound (first reflections arrive 1-3 ms later).
REVERB_PREDELAY_S = 0.002


# --------------------------------------------------------------------------------------
# Configuration: the `augment:` section of a training config
# --------------------------------------------------------------------------------------
@dataclass
class SpeedConfig:
    prob: float = 0.5
    factor: list[float] = field(default_factory=lambda: [0.9, 1.1])


@dataclass
class PitchConfig:
    prob: float = 0.5
    semitones: list[float] = field(default_factory=lambda: [-3.0, 3.0])


@dataclass
class FormantConfig:
    prob: float = 0.5
    warp: list[float] = field(default_factory=lambda: [0.88, 1.12])


@dataclass
class ReverbConfig:
    prob: float = 0.3
    rt60_s: list[float] = field(default_factory=lambda: [0.2, 0.8])
    drr_db: list[float] = field(default_factory=lambda: [0.0, 10.0])


@dataclass
class BabbleConfig:
    prob: float = 0.3
    snr_db: list[float] = field(default_factory=lambda: [0.0, 20.0])
    talkers: list[int] = field(default_factory=lambda: [3, 6])


@dataclass
class PinkNoiseConfig:
    prob: float = 0.3
    snr_db: list[float] = field(default_factory=lambda: [0.0, 20.0])


@dataclass
class BandLimitConfig:
    prob: float = 0.3
    # Of the band-limited utterances, this fraction gets the telephone band, the rest a random band.
    telephone_prob: float = 0.5
    low_hz: list[float] = field(default_factory=lambda: [100.0, 500.0])
    high_hz: list[float] = field(default_factory=lambda: [2500.0, 6000.0])


@dataclass
class AugmentConfig:
    """Training-set waveform augmentation (csref_training.augment); each op has its probability."""

    # Off by default: configs without this section train exactly as before.
    enabled: bool = False
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    pitch: PitchConfig = field(default_factory=PitchConfig)
    formant: FormantConfig = field(default_factory=FormantConfig)
    reverb: ReverbConfig = field(default_factory=ReverbConfig)
    babble: BabbleConfig = field(default_factory=BabbleConfig)
    pink_noise: PinkNoiseConfig = field(default_factory=PinkNoiseConfig)
    band_limit: BandLimitConfig = field(default_factory=BandLimitConfig)


def _check_range(values: list[float], key: str, low: float, high: float) -> tuple[float, float]:
    if len(values) != 2 or not (low <= values[0] <= values[1] <= high):
        raise ValueError(f"augment.{key} must be [min, max] with {low} <= min <= max <= {high}, got {values}")
    return float(values[0]), float(values[1])


def check_augment_config(cfg: AugmentConfig) -> None:
    """Raise ValueError naming the first key of `cfg` outside its valid range."""
    for name in ("speed", "pitch", "formant", "reverb", "babble", "pink_noise", "band_limit"):
        prob = getattr(cfg, name).prob
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"augment.{name}.prob must lie in [0, 1], got {prob}")
    if not 0.0 <= cfg.band_limit.telephone_prob <= 1.0:
        raise ValueError(f"augment.band_limit.telephone_prob must lie in [0, 1], got {cfg.band_limit.telephone_prob}")
    _check_range(cfg.speed.factor, "speed.factor", 0.5, 2.0)
    _check_range(cfg.pitch.semitones, "pitch.semitones", -12.0, 12.0)
    _check_range(cfg.formant.warp, "formant.warp", 0.7, 1.4)
    _check_range(cfg.reverb.rt60_s, "reverb.rt60_s", 0.05, 3.0)
    _check_range(cfg.reverb.drr_db, "reverb.drr_db", -20.0, 40.0)
    _check_range(cfg.babble.snr_db, "babble.snr_db", -20.0, 60.0)
    _check_range(cfg.babble.talkers, "babble.talkers", 1, 20)
    _check_range(cfg.pink_noise.snr_db, "pink_noise.snr_db", -20.0, 60.0)
    nyquist = SAMPLE_RATE / 2
    low = _check_range(cfg.band_limit.low_hz, "band_limit.low_hz", 20.0, nyquist)
    high = _check_range(cfg.band_limit.high_hz, "band_limit.high_hz", 20.0, nyquist - 100.0)
    if low[1] >= high[0]:
        raise ValueError(f"augment.band_limit.low_hz {cfg.band_limit.low_hz} must lie below high_hz {cfg.band_limit.high_hz}")


# --------------------------------------------------------------------------------------
# STFT shared by the phase vocoder and the formant warp
# --------------------------------------------------------------------------------------
_WINDOW = np.hanning(N_FFT + 1)[:N_FFT].astype(np.float32)  # periodic Hann; `_istft` divides by the summed squares


def _stft(wave: np.ndarray) -> np.ndarray:
    """float32 (N,) -> complex (T, N_FFT // 2 + 1), frames centred on multiples of HOP."""
    padded = np.pad(wave, (N_FFT // 2, N_FFT // 2 + HOP), mode="constant")
    frames = sliding_window_view(padded, N_FFT)[::HOP]  # (T, N_FFT)
    return np.fft.rfft(frames * _WINDOW, axis=1)


def _istft(spec: np.ndarray, length: int) -> np.ndarray:
    """complex (T, F) -> float32 (length,) by weighted overlap-add (inverse of `_stft`)."""
    frames = np.fft.irfft(spec, n=N_FFT, axis=1) * _WINDOW  # (T, N_FFT)
    num_frames = frames.shape[0]
    out = np.zeros(HOP * (num_frames + OVERLAP - 1), dtype=np.float64)
    norm = np.zeros_like(out)
    window_sq = np.tile(_WINDOW.astype(np.float64) ** 2, (num_frames, 1))  # (T, N_FFT)
    # Frame t covers [t * HOP, t * HOP + N_FFT): add its k-th hop-long piece at hop t + k.
    for k in range(OVERLAP):
        piece = slice(k * HOP, (k + 1) * HOP)
        out[k * HOP: (k + num_frames) * HOP] += frames[:, piece].reshape(-1)
        norm[k * HOP: (k + num_frames) * HOP] += window_sq[:, piece].reshape(-1)
    out = out / np.maximum(norm, 1e-8)
    out = out[N_FFT // 2: N_FFT // 2 + length]
    return np.pad(out, (0, length - len(out))).astype(np.float32)


# --------------------------------------------------------------------------------------
# The operations
# --------------------------------------------------------------------------------------
def change_speed(wave: np.ndarray, factor: float) -> np.ndarray:
    """Play `wave` `factor` times faster: duration / factor, every frequency x factor (resampling)."""
    if factor == 1.0:
        return wave.astype(np.float32, copy=False)
    # Read as if sampled at factor * SAMPLE_RATE, convert to SAMPLE_RATE. "MQ" is plenty for augmentation.
    return soxr.resample(wave, SAMPLE_RATE * factor, SAMPLE_RATE, quality="MQ").astype(np.float32, copy=False)


def stretch_time(wave: np.ndarray, factor: float) -> np.ndarray:
    """Duration x `factor` with frequencies kept (phase vocoder over `_stft` frames)."""
    spec = _stft(wave)  # (T, F)
    num_frames = spec.shape[0]
    out_length = int(round(len(wave) * factor))
    # Output frame j reads input frame position j / factor (interpolated magnitude, accumulated phase).
    positions = np.arange(0, num_frames - 1, 1.0 / factor)  # (T',)
    lower = positions.astype(np.int64)
    frac = (positions - lower)[:, None].astype(np.float32)  # (T', 1)
    spec_magnitude, spec_phase = np.abs(spec), np.angle(spec)  # (T, F) each
    magnitude = (1.0 - frac) * spec_magnitude[lower] + frac * spec_magnitude[lower + 1]  # (T', F)
    expected = (2.0 * np.pi * HOP / N_FFT) * np.arange(spec.shape[1], dtype=np.float32)  # (F,) phase advance per hop
    delta = spec_phase[lower + 1] - spec_phase[lower] - expected  # (T', F)
    delta -= (2.0 * np.pi) * np.round(delta / (2.0 * np.pi))
    phase = np.empty_like(delta)
    phase[0] = spec_phase[0]
    np.cumsum(expected + delta[:-1], axis=0, out=phase[1:])
    phase[1:] += spec_phase[0]
    return _istft(magnitude * (np.cos(phase) + 1j * np.sin(phase)), out_length)


def shift_pitch(wave: np.ndarray, semitones: float) -> np.ndarray:
    """Every frequency x 2^(semitones / 12), duration kept: stretch by that ratio, then speed it up by it."""
    if semitones == 0.0:
        return wave.astype(np.float32, copy=False)
    ratio = 2.0 ** (semitones / 12.0)
    shifted = change_speed(stretch_time(wave, ratio), ratio)
    # Resampling rounds the length by a sample or two; the op keeps its input's.
    return np.pad(shifted[: len(wave)], (0, max(0, len(wave) - len(shifted))))


def warp_formants(wave: np.ndarray, warp: float) -> np.ndarray:
    """Spectral envelope's frequencies x `warp` (vocal-tract length), f0 and duration kept.

    Each STFT frame's magnitude at output frequency f is read from frequency f / warp below a
    boundary (80% of Nyquist, lowered for warp > 1), linearly in between above it so that
    Nyquist maps to itself (Jaitly & Hinton's VTLP); the phase is the original.
    """
    if warp == 1.0:
        return wave.astype(np.float32, copy=False)
    spec = _stft(wave)  # (T, F)
    nyquist_bin = spec.shape[1] - 1
    boundary = 0.8 * nyquist_bin / max(warp, 1.0)  # source bin below which the warp is linear
    out_bins = np.arange(spec.shape[1], dtype=np.float64)
    source_bins = np.interp(out_bins, [0.0, warp * boundary, nyquist_bin], [0.0, boundary, nyquist_bin])  # (F,)
    lower = np.minimum(source_bins.astype(np.int64), nyquist_bin - 1)
    frac = (source_bins - lower).astype(np.float32)
    magnitude = np.abs(spec)
    warped = (1.0 - frac) * magnitude[:, lower] + frac * magnitude[:, lower + 1]  # (T, F)
    # Original phase: spec / |spec| (bins of zero magnitude stay zero).
    return _istft(spec * (warped / np.maximum(magnitude, 1e-12)), len(wave))


def room_impulse_response(rt60_s: float, drr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Synthetic RIR: a unit direct path, then Gaussian noise decaying by 60 dB over `rt60_s`,
    scaled so that direct energy / reverberant energy = `drr_db`."""
    length = int(rt60_s * SAMPLE_RATE)
    t = np.arange(length) / SAMPLE_RATE
    tail = rng.standard_normal(length) * np.exp(-DECAY_60DB * t / rt60_s)
    tail[: int(REVERB_PREDELAY_S * SAMPLE_RATE)] = 0.0
    tail *= math.sqrt(10.0 ** (-drr_db / 10.0) / np.sum(tail**2))
    tail[0] = 1.0
    return tail.astype(np.float32)


def reverberate(wave: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """`wave` in the room of `rir`, cut to its own length (the tail past the end is dropped)."""
    return fftconvolve(wave, rir)[: len(wave)].astype(np.float32)


def pink_noise(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """1/f-power (pink) noise of unit RMS: white noise shaped by 1 / sqrt(f) in the frequency domain."""
    # An FFT of a length with large prime factors costs up to 10x more: shape a longer noise, cut it.
    fft_length = next_fast_len(num_samples, real=True)
    spectrum = np.fft.rfft(rng.standard_normal(fft_length))
    frequencies = np.arange(len(spectrum), dtype=np.float64)
    frequencies[0] = 1.0
    spectrum /= np.sqrt(frequencies)
    spectrum[0] = 0.0
    noise = np.fft.irfft(spectrum, n=fft_length)[:num_samples]
    return (noise / max(np.sqrt(np.mean(noise**2)), 1e-12)).astype(np.float32)


def babble(num_samples: int, talkers: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The sum of `talkers` at equal RMS, each looped from a random start to `num_samples`."""
    mixture = np.zeros(num_samples, dtype=np.float64)
    for talker in talkers:
        rms = np.sqrt(np.mean(np.square(talker, dtype=np.float64)))
        if rms == 0.0:
            continue
        start = int(rng.integers(len(talker)))
        looped = np.resize(np.roll(talker, -start), num_samples)
        mixture += looped / rms
    return mixture.astype(np.float32)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """speech + noise scaled so that power(speech) / power(noise) = `snr_db` over the whole signal."""
    speech_power = np.mean(np.square(speech, dtype=np.float64))
    noise_power = np.mean(np.square(noise, dtype=np.float64))
    if speech_power == 0.0 or noise_power == 0.0:
        return speech.astype(np.float32, copy=False)
    scale = math.sqrt(speech_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return (speech + scale * noise).astype(np.float32)


def band_limit(wave: np.ndarray, low_hz: float, high_hz: float) -> np.ndarray:
    """Butterworth band-pass between `low_hz` and `high_hz` (a telephone line, a cheap microphone)."""
    sos = butter(BAND_ORDER, [low_hz, high_hz], btype="bandpass", fs=SAMPLE_RATE, output="sos")
    return sosfilt(sos, wave).astype(np.float32)


# --------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------
class WaveformAugmenter:
    """Applies each op of an `AugmentConfig` with its probability, parameters drawn from a Generator.

    `read_utterance(i)` returns the 16 kHz waveform of utterance i of the `num_utterances` the
    dataset holds: babble is made of them (the dataset's own speech, so the talkers speak its
    language and come from its voices).
    """

    def __init__(self, cfg: AugmentConfig, num_utterances: int, read_utterance: Callable[[int], np.ndarray]) -> None:
        check_augment_config(cfg)
        if num_utterances < 1 and cfg.babble.prob > 0:
            raise ValueError("augment.babble needs at least one utterance in the training set to draw talkers from")
        self.cfg = cfg
        self.num_utterances = num_utterances
        self.read_utterance = read_utterance

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """float32 (N,) -> augmented float32 (N', N' = N unless the speed changed)."""
        cfg = self.cfg
        wave = wave.astype(np.float32, copy=False)
        if rng.random() < cfg.speed.prob:
            wave = change_speed(wave, rng.uniform(*cfg.speed.factor))
        if rng.random() < cfg.pitch.prob:
            wave = shift_pitch(wave, rng.uniform(*cfg.pitch.semitones))
        if rng.random() < cfg.formant.prob:
            wave = warp_formants(wave, rng.uniform(*cfg.formant.warp))
        if rng.random() < cfg.reverb.prob:
            rir = room_impulse_response(rng.uniform(*cfg.reverb.rt60_s), rng.uniform(*cfg.reverb.drr_db), rng)
            wave = reverberate(wave, rir)
        if rng.random() < cfg.babble.prob:
            num_talkers = int(rng.integers(cfg.babble.talkers[0], cfg.babble.talkers[1] + 1))
            talkers = [self.read_utterance(int(i)) for i in rng.integers(self.num_utterances, size=num_talkers)]
            wave = mix_at_snr(wave, babble(len(wave), talkers, rng), rng.uniform(*cfg.babble.snr_db))
        if rng.random() < cfg.pink_noise.prob:
            wave = mix_at_snr(wave, pink_noise(len(wave), rng), rng.uniform(*cfg.pink_noise.snr_db))
        if rng.random() < cfg.band_limit.prob:
            if rng.random() < cfg.band_limit.telephone_prob:
                low, high = TELEPHONE_BAND_HZ
            else:
                low, high = rng.uniform(*cfg.band_limit.low_hz), rng.uniform(*cfg.band_limit.high_hz)
            wave = band_limit(wave, low, high)
        return wave
