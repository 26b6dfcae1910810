"""The speech segmenter on real espeak-ng speech, with both frame classifiers (webrtc, silero):
boundaries, noise, padding, limits, the CLI."""

import json
import subprocess
import sys

import librosa
import numpy as np
import pytest
import soundfile

from csref_model.audio import SAMPLE_RATE
from csref_ros.vad import VAD_BACKENDS, SpeechSegmenter, VadConfig, segment_wave
from speech_support import add_noise, espeak_16k, speech_with_pauses

COMMANDS = [
    ("pick up the red cup on the left", "en-us+m3"),
    ("the small blue square", "en-gb+f2"),
    ("grab the big yellow star at the top", "en-us+f4"),
    ("where is the green triangle", "en-gb-scotland+m1"),
    ("the black cross in the middle", "en-029+m5"),
]
PAUSES_S = [0.8, 1.1, 0.9, 1.4, 1.0, 0.7]


@pytest.fixture(scope="module")
def commands() -> tuple[np.ndarray, list[tuple[float, float]]]:
    return speech_with_pauses([espeak_16k(text, voice) for text, voice in COMMANDS], PAUSES_S)


def assert_segments_match(segments: list[tuple[float, float]], truth: list[tuple[float, float]], tolerance_s: float):
    assert len(segments) == len(truth), f"found {segments}, expected {truth}"
    for (start_s, end_s), (true_start_s, true_end_s) in zip(segments, truth):
        assert abs(start_s - true_start_s) <= tolerance_s, (segments, truth)
        assert abs(end_s - true_end_s) <= tolerance_s, (segments, truth)


@pytest.mark.parametrize("backend", VAD_BACKENDS)
@pytest.mark.parametrize("noise", [None, ("white", 10.0), ("white", 20.0), ("pink", 15.0)])
def test_utterances_between_pauses_are_found(commands, noise, backend):
    wave, truth = commands
    if noise is not None:
        wave = add_noise(wave, snr_db=noise[1], colour=noise[0])
    segments = [(u.start_s, u.end_s) for u in segment_wave(wave, VadConfig(backend=backend))]
    assert_segments_match(segments, truth, tolerance_s=0.2)


def test_silero_without_energy_gate_finds_speech_in_loud_pink_noise(commands):
    wave, truth = commands
    config = VadConfig(backend="silero", energy_margin_db=0.0)
    segments = [(u.start_s, u.end_s) for u in segment_wave(add_noise(wave, snr_db=0.0, colour="pink"), config)]
    assert_segments_match(segments, truth, tolerance_s=0.3)


@pytest.mark.parametrize("backend", VAD_BACKENDS)
def test_quiet_recording_is_segmented_like_a_loud_one(commands, backend):
    wave, truth = commands
    segments = [(u.start_s, u.end_s) for u in segment_wave(wave * 0.03, VadConfig(backend=backend))]
    assert_segments_match(segments, truth, tolerance_s=0.2)


@pytest.mark.parametrize("backend", VAD_BACKENDS)
def test_chunk_size_does_not_change_the_result(commands, backend):
    wave, _ = commands
    config = VadConfig(backend=backend)
    reference = [(u.start_s, u.end_s, len(u.samples)) for u in segment_wave(wave, config)]
    segmenter = SpeechSegmenter(config)
    rng = np.random.default_rng(1)
    found, position = [], 0
    while position < len(wave):
        size = int(rng.integers(1, 5000))
        found += segmenter.feed(wave[position : position + size])
        position += size
    found += segmenter.flush()
    assert [(u.start_s, u.end_s, len(u.samples)) for u in found] == reference


def test_int16_and_float_input_agree(commands):
    wave, _ = commands
    as_int16 = np.round(wave * 32767).astype(np.int16)
    from_float = [(u.start_s, u.end_s) for u in segment_wave(wave)]
    segmenter = SpeechSegmenter()
    from_int16 = [(u.start_s, u.end_s) for u in segmenter.feed(as_int16) + segmenter.flush()]
    assert from_int16 == from_float


@pytest.mark.parametrize("backend", VAD_BACKENDS)
@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_every_frame_length_works(commands, frame_ms, backend):
    wave, truth = commands
    segments = [(u.start_s, u.end_s) for u in segment_wave(wave, VadConfig(frame_ms=frame_ms, backend=backend))]
    assert_segments_match(segments, truth, tolerance_s=0.2)


def test_samples_carry_preroll_and_postroll(commands):
    wave, _ = commands
    config = VadConfig(preroll_ms=300, postroll_ms=210)
    for utterance in segment_wave(wave, config):
        assert utterance.samples.dtype == np.float32
        assert utterance.samples_start_s == pytest.approx(utterance.start_s - 0.3, abs=0.031)
        samples_end_s = utterance.samples_start_s + len(utterance.samples) / SAMPLE_RATE
        assert samples_end_s == pytest.approx(utterance.end_s + 0.21, abs=0.031)
        begin = round(utterance.samples_start_s * SAMPLE_RATE)
        expected = np.round(wave[begin : begin + len(utterance.samples)] * 32767) / 32768
        np.testing.assert_allclose(utterance.samples, expected, atol=1e-6)


def test_provisional_utterance_is_the_final_one(commands):
    """During the hangover, provisional() already holds exactly the utterance that will come."""
    wave, _ = commands
    segmenter = SpeechSegmenter()
    provisional, final = [], []
    for begin in range(0, len(wave), 480):
        final += segmenter.feed(wave[begin : begin + 480])
        candidate = segmenter.provisional()
        if candidate is not None and (not provisional or candidate.start_s != provisional[-1].start_s):
            provisional.append(candidate)
        elif candidate is not None:
            provisional[-1] = candidate
    assert len(final) == len(COMMANDS)
    for early, late in zip(provisional, final):
        assert (early.start_s, early.end_s, early.samples_start_s) == (late.start_s, late.end_s, late.samples_start_s)
        np.testing.assert_array_equal(early.samples, late.samples)


def test_speech_in_progress_is_reported_and_flushed(commands):
    wave, truth = commands
    cut_at = round((truth[0][0] + 1.0) * SAMPLE_RATE)  # one second into the first command
    segmenter = SpeechSegmenter()
    assert segmenter.feed(wave[:cut_at]) == []
    assert segmenter.in_speech
    assert segmenter.speech_start_s == pytest.approx(truth[0][0], abs=0.1)
    (utterance,) = segmenter.flush()
    assert utterance.start_s == pytest.approx(truth[0][0], abs=0.1)
    assert utterance.end_s <= cut_at / SAMPLE_RATE
    assert not segmenter.in_speech


def test_long_monologue_is_cut_at_max_utterance_length():
    sentences = [espeak_16k(text) for text, _ in COMMANDS * 3]
    gap = np.zeros(round(0.15 * SAMPLE_RATE), dtype=np.float32)  # pauses shorter than the hangover
    monologue = np.concatenate([part for sentence in sentences for part in (sentence, gap)])
    assert len(monologue) / SAMPLE_RATE > 25
    utterances = segment_wave(monologue, VadConfig(max_utterance_s=8.0))
    assert len(utterances) >= 3
    assert all(u.duration_s <= 8.0 + 1e-9 for u in utterances)
    assert all(u.cut for u in utterances[:-1])
    assert sum(u.duration_s for u in utterances) > 0.9 * len(monologue) / SAMPLE_RATE


def test_speech_shorter_than_min_utterance_is_dropped():
    word = espeak_16k("cup")
    assert 0.2 < len(word) / SAMPLE_RATE < 0.6
    wave, _ = speech_with_pauses([word], [1.0, 1.0])
    assert len(segment_wave(wave, VadConfig(min_utterance_s=0.1))) == 1
    segmenter = SpeechSegmenter(VadConfig(min_utterance_s=1.0))
    assert segmenter.feed(wave) + segmenter.flush() == []
    assert segmenter.dropped_short == 1


@pytest.mark.parametrize("backend", VAD_BACKENDS)
def test_silence_and_steady_noise_give_nothing(backend):
    config = VadConfig(backend=backend)
    assert segment_wave(np.zeros(5 * SAMPLE_RATE, dtype=np.float32), config) == []
    hum = 0.2 * np.sin(2 * np.pi * 120 * np.arange(5 * SAMPLE_RATE) / SAMPLE_RATE)
    fan = add_noise(hum.astype(np.float32), snr_db=0.0, colour="pink")
    assert segment_wave(fan, config) == []


def test_bad_settings_and_audio_are_rejected():
    with pytest.raises(ValueError, match="frame_ms must be one of"):
        VadConfig(frame_ms=25)
    with pytest.raises(ValueError, match="aggressiveness must be 0, 1, 2 or 3"):
        VadConfig(aggressiveness=4)
    with pytest.raises(ValueError, match="backend must be one of silero, webrtc"):
        VadConfig(backend="energy")
    with pytest.raises(ValueError, match="silero_threshold"):
        VadConfig(silero_threshold=1.5)
    with pytest.raises(ValueError, match="max_utterance_s"):
        VadConfig(min_utterance_s=2.0, max_utterance_s=1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        SpeechSegmenter().feed(np.array([0.0, np.nan], dtype=np.float32))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "csref_ros.vad", *args], capture_output=True, text=True, timeout=120)


def test_cli_reads_stereo_44k_and_prints_json(commands, tmp_path):
    wave, truth = commands
    wave_44k = librosa.resample(wave, orig_sr=SAMPLE_RATE, target_sr=44100)
    stereo = np.stack([wave_44k, 0.5 * wave_44k], axis=1)  # (N, 2)
    path = tmp_path / "commands.wav"
    soundfile.write(path, stereo, 44100, subtype="PCM_16")

    result = run_cli(str(path), "--json")
    assert result.returncode == 0, result.stderr
    segments = json.loads(result.stdout)
    assert_segments_match([tuple(s) for s in segments], truth, tolerance_s=0.2)

    strict = run_cli(str(path), "--aggressiveness", "3", "--json")
    assert strict.returncode == 0, strict.stderr
    assert len(json.loads(strict.stdout)) == len(truth)

    silero = run_cli(str(path), "--backend", "silero", "--json")
    assert silero.returncode == 0, silero.stderr
    assert_segments_match([tuple(s) for s in json.loads(silero.stdout)], truth, tolerance_s=0.2)


def test_cli_reports_bad_input(tmp_path):
    missing = run_cli(str(tmp_path / "missing.wav"), "--json")
    assert missing.returncode == 2 and "audio file not found" in missing.stderr
    bad_setting = run_cli(str(tmp_path / "missing.wav"), "--aggressiveness", "7")
    assert bad_setting.returncode == 2 and "aggressiveness must be 0, 1, 2 or 3" in bad_setting.stderr
    bad_backend = run_cli(str(tmp_path / "missing.wav"), "--backend", "energy")
    assert bad_backend.returncode == 2 and "invalid choice: 'energy'" in bad_backend.stderr
