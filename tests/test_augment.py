"""Waveform augmentation: each op does what it says on synthetic signals with known answers, the
composition is deterministic per seed, datasets augment training items only, and both trainers
run with augmentation on."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.signal import butter, sosfilt

from csref_model.audio import SAMPLE_RATE
from csref_training import augment
from csref_training.augment import AugmentConfig, WaveformAugmenter, check_augment_config
from csref_training.datasets import build_csa_dataset, build_srec_dataset
from csref_training.reproducibility import SeededItems
from csref_training.spoken_shapes.generate import SynthConfig, generate_dataset
from csref_training.train_config import DataConfig, load_train_config
from training_support import run_module, write_config

F0_HZ = 150.0


def harmonic_tone(seconds: float = 2.0, f0: float = F0_HZ) -> np.ndarray:
    """A voiced-speech stand-in: 20 harmonics of f0 with 1/h amplitudes."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 21)).astype(np.float32)


def white_noise(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)


def fundamental_hz(wave: np.ndarray) -> float:
    """The strongest spectral peak between 60 and 400 Hz (the fundamental of `harmonic_tone`)."""
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    freqs = np.fft.rfftfreq(len(wave), 1 / SAMPLE_RATE)
    band = (freqs > 60) & (freqs < 400)
    return float(freqs[band][np.argmax(spectrum[band])])


def spectral_peak_hz(wave: np.ndarray) -> float:
    """Where the spectrum, smoothed over 50 Hz, peaks: the centre of a resonance."""
    spectrum = np.abs(np.fft.rfft(wave.astype(np.float64))) ** 2
    width = int(50 * len(wave) / SAMPLE_RATE)
    smoothed = np.convolve(spectrum, np.ones(width) / width, mode="same")
    return float(np.fft.rfftfreq(len(wave), 1 / SAMPLE_RATE)[np.argmax(smoothed)])


def band_power(wave: np.ndarray, low_hz: float, high_hz: float) -> float:
    """Mean power spectral density of `wave` between two frequencies."""
    spectrum = np.abs(np.fft.rfft(wave.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(len(wave), 1 / SAMPLE_RATE)
    return float(spectrum[(freqs >= low_hz) & (freqs < high_hz)].mean())


def snr_db(speech: np.ndarray, mixed: np.ndarray) -> float:
    noise = mixed.astype(np.float64) - speech
    return 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean(noise**2))


def everything_on() -> AugmentConfig:
    cfg = AugmentConfig(enabled=True)
    for name in ("speed", "pitch", "formant", "reverb", "babble", "pink_noise", "band_limit"):
        getattr(cfg, name).prob = 1.0
    return cfg


# ----------------------------------------------------------------------------------------
# The ops, one by one


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_changes_duration_and_pitch_by_the_factor(factor: float) -> None:
    tone = harmonic_tone()
    faster = augment.change_speed(tone, factor)
    assert faster.dtype == np.float32
    assert len(faster) / len(tone) == pytest.approx(1 / factor, rel=1e-3)
    assert fundamental_hz(faster) == pytest.approx(F0_HZ * factor, rel=0.01)


@pytest.mark.parametrize("semitones", [-3.0, 2.0])
def test_pitch_shift_moves_f0_and_keeps_duration(semitones: float) -> None:
    tone = harmonic_tone()
    shifted = augment.shift_pitch(tone, semitones)
    assert shifted.dtype == np.float32 and shifted.shape == tone.shape
    assert fundamental_hz(shifted) == pytest.approx(F0_HZ * 2 ** (semitones / 12), rel=0.01)


def test_time_stretch_keeps_f0() -> None:
    tone = harmonic_tone()
    longer = augment.stretch_time(tone, 1.2)
    assert len(longer) == round(len(tone) * 1.2)
    assert fundamental_hz(longer) == pytest.approx(F0_HZ, abs=1.0)


@pytest.mark.parametrize("warp", [0.9, 1.12])
def test_formant_warp_moves_the_envelope_and_keeps_f0(warp: float) -> None:
    # A formant stand-in: white noise through a resonance at 1 kHz.
    resonance = sosfilt(butter(2, [900, 1100], btype="bandpass", fs=SAMPLE_RATE, output="sos"), white_noise())
    resonance = resonance.astype(np.float32)
    warped = augment.warp_formants(resonance, warp)
    assert warped.dtype == np.float32 and warped.shape == resonance.shape
    assert spectral_peak_hz(resonance) == pytest.approx(1000, rel=0.03)
    assert spectral_peak_hz(warped) == pytest.approx(1000 * warp, rel=0.03)
    assert fundamental_hz(augment.warp_formants(harmonic_tone(), warp)) == pytest.approx(F0_HZ, abs=1.0)


def test_stft_round_trip_is_exact() -> None:
    tone = harmonic_tone(0.7)
    assert np.max(np.abs(augment._istft(augment._stft(tone), len(tone)) - tone)) < 1e-5


@pytest.mark.parametrize("rt60_s", [0.3, 0.7])
def test_room_impulse_response_has_the_requested_rt60_and_drr(rt60_s: float) -> None:
    rir = augment.room_impulse_response(rt60_s, drr_db=5.0, rng=np.random.default_rng(1))
    assert 10 * np.log10(rir[0] ** 2 / np.sum(rir[1:].astype(np.float64) ** 2)) == pytest.approx(5.0, abs=0.01)
    # Schroeder backward integration of the tail: the -5 to -25 dB slope, extrapolated to 60 dB.
    energy = np.cumsum((rir[1:].astype(np.float64) ** 2)[::-1])[::-1]
    decay_db = 10 * np.log10(energy / energy[0])
    t5, t25 = (np.argmax(decay_db <= level) / SAMPLE_RATE for level in (-5.0, -25.0))
    assert 3 * (t25 - t5) == pytest.approx(rt60_s, rel=0.15)


def test_reverberation_lengthens_the_decay() -> None:
    burst = np.concatenate([white_noise(0.25), np.zeros(int(0.75 * SAMPLE_RATE), dtype=np.float32)])
    late = slice(int(0.35 * SAMPLE_RATE), int(0.45 * SAMPLE_RATE))  # 100-200 ms after the burst
    late_db = {}
    for rt60_s in (0.2, 0.8):
        wet = augment.reverberate(burst, augment.room_impulse_response(rt60_s, 0.0, np.random.default_rng(2)))
        assert wet.dtype == np.float32 and wet.shape == burst.shape
        late_db[rt60_s] = 10 * np.log10(np.mean(wet[late].astype(np.float64) ** 2) / np.mean(burst[:4000] ** 2))
    assert not burst[late].any()
    # 60 dB per RT60: 150 ms later, about -45 dB for 0.2 s and -11 dB for 0.8 s (plus the DRR).
    assert late_db[0.8] > -25 and late_db[0.2] < late_db[0.8] - 20


@pytest.mark.parametrize("target_db", [0.0, 7.5, 20.0])
def test_pink_noise_and_babble_mix_at_the_requested_snr(target_db: float) -> None:
    rng = np.random.default_rng(3)
    speech = harmonic_tone()
    pink = augment.pink_noise(len(speech), rng)
    talkers = [harmonic_tone(0.8, f0) for f0 in (110.0, 180.0, 230.0)]
    crowd = augment.babble(len(speech), talkers, rng)
    assert crowd.shape == speech.shape and crowd.dtype == np.float32
    for noise in (pink, crowd):
        mixed = augment.mix_at_snr(speech, noise, target_db)
        assert mixed.dtype == np.float32 and mixed.shape == speech.shape
        assert snr_db(speech, mixed) == pytest.approx(target_db, abs=0.5)


def test_pink_noise_has_equal_power_per_octave() -> None:
    noise = augment.pink_noise(4 * SAMPLE_RATE, np.random.default_rng(4))
    low_octave = band_power(noise, 250, 500) * 250
    high_octave = band_power(noise, 2000, 4000) * 2000
    assert 10 * np.log10(low_octave / high_octave) == pytest.approx(0.0, abs=1.0)
    assert np.sqrt(np.mean(noise.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-3)


def test_band_limit_removes_energy_outside_the_band() -> None:
    noise = white_noise(4.0)
    for low, high in (augment.TELEPHONE_BAND_HZ, (400.0, 2500.0)):
        filtered = augment.band_limit(noise, low, high)
        assert filtered.dtype == np.float32 and filtered.shape == noise.shape
        inside = band_power(filtered, low * 1.5, high / 1.2) / band_power(noise, low * 1.5, high / 1.2)
        below = band_power(filtered, 20, low / 3) / band_power(noise, 20, low / 3)
        above = band_power(filtered, high * 1.6, SAMPLE_RATE / 2) / band_power(noise, high * 1.6, SAMPLE_RATE / 2)
        assert 10 * np.log10(inside) > -1.5
        assert 10 * np.log10(below) < -30 and 10 * np.log10(above) < -25


# ----------------------------------------------------------------------------------------
# Composition and config


def test_augmenter_is_deterministic_per_seed_and_reads_its_talkers() -> None:
    pool = [harmonic_tone(0.5 + 0.1 * i, 100.0 + 20 * i) for i in range(8)]
    read = []

    def read_utterance(index: int) -> np.ndarray:
        read.append(index)
        return pool[index]

    augmenter = WaveformAugmenter(everything_on(), len(pool), read_utterance)
    speech = harmonic_tone(1.5)
    first = augmenter(speech, np.random.default_rng(11))
    talkers_first = list(read)
    again = augmenter(speech, np.random.default_rng(11))
    other = augmenter(speech, np.random.default_rng(12))
    assert first.dtype == np.float32 and np.all(np.isfinite(first))
    np.testing.assert_array_equal(first, again)
    assert read[len(talkers_first):2 * len(talkers_first)] == talkers_first and 3 <= len(talkers_first) <= 6
    assert len(first) != len(other) or not np.array_equal(first, other)
    # Speed is the only op that changes the length: 1.5 s / [0.9, 1.1].
    assert len(speech) / 1.1 - 2 <= len(first) <= len(speech) / 0.9 + 2


def test_disabled_ops_leave_the_waveform_alone() -> None:
    cfg = AugmentConfig(enabled=True)
    for name in ("speed", "pitch", "formant", "reverb", "babble", "pink_noise", "band_limit"):
        getattr(cfg, name).prob = 0.0
    speech = harmonic_tone(1.0)
    np.testing.assert_array_equal(WaveformAugmenter(cfg, 0, lambda i: speech)(speech, np.random.default_rng(0)), speech)


def test_bad_ranges_name_their_key(tmp_path: Path) -> None:
    cfg = AugmentConfig(enabled=True)
    cfg.speed.factor = [1.2, 0.8]
    with pytest.raises(ValueError, match=r"augment\.speed\.factor must be \[min, max\]"):
        check_augment_config(cfg)
    cfg = AugmentConfig(enabled=True)
    cfg.band_limit.prob = 1.5
    with pytest.raises(ValueError, match=r"augment\.band_limit\.prob must lie in \[0, 1\]"):
        check_augment_config(cfg)
    path = write_config(tmp_path / "c.yaml", tmp_path, tmp_path / "out")
    loaded = load_train_config(path, ["augment.enabled=true", "augment.pitch.semitones=[-2, 2]"])
    assert loaded.augment.enabled and loaded.augment.pitch.semitones == [-2, 2]
    assert load_train_config(path).augment.enabled is False
    with pytest.raises(ValueError, match=r"unknown key 'tempo' in section 'augment'"):
        load_train_config(path, ["augment.tempo.prob=1"])


# ----------------------------------------------------------------------------------------
# Datasets and trainers


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("augment_shapes")
    generate_dataset(SynthConfig(out=root, seed=5, voices=("en-us+m3", "en-gb+f2")), {"train": 8, "val": 4, "test": 2})
    return root


def test_datasets_augment_training_items_only(small_shapes: Path) -> None:
    data = DataConfig(dataset="spoken_shapes", root=str(small_shapes))
    cfg = everything_on()
    for build in (lambda split, train, aug: build_csa_dataset(data, split, train, aug),
                  lambda split, train, aug: build_srec_dataset(data, split, 64, train, aug)):
        clean = SeededItems(build("train", True, None))
        noisy = SeededItems(build("train", True, cfg))
        key = (3, 1234)
        clean_wave, noisy_wave = clean[key]["waveform"], noisy[key]["waveform"]
        assert not (len(clean_wave) == len(noisy_wave) and np.allclose(clean_wave, noisy_wave))
        np.testing.assert_array_equal(noisy[key]["waveform"], noisy_wave)
        assert not np.array_equal(noisy[(3, 99)]["waveform"], noisy_wave)
        # Validation reads clean speech even when given the config.
        for index in range(2):
            np.testing.assert_array_equal(build("val", False, cfg)[index]["waveform"],
                                          build("val", False, None)[index]["waveform"])


@pytest.mark.parametrize("module", ["csref_training.csa", "csref_training.srec"])
def test_training_steps_with_augmentation(module: str, small_shapes: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", small_shapes, output_dir, max_steps=2, **{"ema.enabled": False})
    run_module(module, config, "augment.enabled=true", "augment.babble.prob=1.0", "augment.reverb.prob=1.0")
    log = (output_dir / f"{module.rsplit('.', 1)[1]}.log").read_text()
    assert re.search(r"step 2 loss \d+\.\d+", log), log[-2000:]
    assert (output_dir / "last").is_dir()
    assert load_train_config(output_dir / "train_config.yaml").augment.babble.prob == 1.0


@pytest.mark.parametrize("name", ["csa_spoken_shapes", "srec_spoken_shapes"])
def test_augmented_configs_differ_from_their_base_by_augmentation_only(name: str) -> None:
    configs = Path(__file__).resolve().parent.parent / "config" / "train"
    base = load_train_config(configs / f"{name}.yaml")
    augmented = load_train_config(configs / f"{name}_augmented.yaml")
    check_augment_config(augmented.augment)
    assert augmented.augment.enabled and not base.augment.enabled
    assert augmented.output_dir == f"{base.output_dir}_augmented"
    if augmented.init_speech_encoder is not None:
        assert augmented.init_speech_encoder == "runs/csa_spoken_shapes_augmented/best"
    for cfg in (base, augmented):
        cfg.augment, cfg.output_dir, cfg.init_speech_encoder = AugmentConfig(), "", None
    assert augmented == base


def test_augmented_run_resumes_exactly(small_shapes: Path, tmp_path: Path) -> None:
    # 2 steps per epoch; stopped after step 1 and resumed to step 3 (across an epoch end) must
    # equal 3 uninterrupted steps: augmentation depends only on each item's seed.
    everything = [f"augment.{name}.prob=1.0" for name in ("speed", "pitch", "formant", "reverb", "babble",
                                                          "pink_noise", "band_limit")]
    overrides = ["augment.enabled=true", "data.num_workers=1", *everything]
    weights = {}
    for name, stops in (("uninterrupted", (3,)), ("resumed", (1, 3))):
        output_dir = tmp_path / name
        config = write_config(tmp_path / f"{name}.yaml", small_shapes, output_dir)
        for max_steps in stops:
            result = run_module("csref_training.srec", config, f"max_steps={max_steps}", *overrides)
        assert ("resumed from" in result.stderr) == (name == "resumed")
        weights[name] = load_file(str((output_dir / "last").resolve() / "model.safetensors"))
    assert weights["uninterrupted"].keys() == weights["resumed"].keys()
    for key, value in weights["uninterrupted"].items():
        assert torch.equal(value, weights["resumed"][key]), key
