"""Audio sources: the WAV file player and a real sounddevice/PortAudio/ALSA capture path."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from csref_ros.audio import WavFileSource, sanitize_chunk
from csref_ros.vad import SpeechSegmenter
from speech_support import SAMPLE_RATE, espeak_16k

PROGRAMS = Path(__file__).resolve().parent / "programs"
LEADING_SILENCE_S = 1.0


@pytest.fixture(scope="module")
def command() -> np.ndarray:
    return espeak_16k("pick up the red cup on the left")


def test_sanitize_reports_nan_and_clipping():
    clean = np.linspace(-0.5, 0.5, 480, dtype=np.float32)
    assert sanitize_chunk(clean)[1] == []
    broken = clean.copy()
    broken[[3, 7]] = [np.nan, np.inf]
    fixed, problems = sanitize_chunk(broken)
    assert np.isfinite(fixed).all() and fixed[3] == 0 and fixed[7] == 0
    assert problems == ["NaN/infinite audio samples replaced by 0: 2 of 480 in a chunk"]
    loud = np.clip(clean * 10, -1, 1)
    assert "audio clipped" in sanitize_chunk(loud)[1][0]


def test_wav_file_source_resamples_and_mixes(tmp_path, command):
    wave_44k = soxr.resample(command, SAMPLE_RATE, 44100)
    soundfile.write(tmp_path / "stereo.wav", np.stack([wave_44k, wave_44k], axis=1), 44100)
    loaded = WavFileSource(tmp_path / "stereo.wav", lambda chunk, t: None, tail_silence_s=0.0).wave
    assert loaded.dtype == np.float32
    assert abs(len(loaded) - len(command)) <= 2
    n = min(len(loaded), len(command))
    assert np.corrcoef(loaded[:n], command[:n])[0, 1] > 0.99


def test_wav_file_source_errors(tmp_path):
    def open_file(name: str) -> WavFileSource:
        return WavFileSource(tmp_path / name, lambda chunk, t: None)

    with pytest.raises(FileNotFoundError, match="audio file not found"):
        open_file("missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF but not really a wave file")
    with pytest.raises(ValueError, match="could not read audio file .*junk.wav"):
        open_file("junk.wav")
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="contains no samples"):
        open_file("empty.wav")


def test_wav_file_plays_in_real_time(tmp_path, command):
    path = tmp_path / "command.wav"
    soundfile.write(path, np.concatenate([np.zeros(SAMPLE_RATE // 2, np.float32), command]), SAMPLE_RATE)
    chunks, stamps = [], []
    source = WavFileSource(path, lambda chunk, t: (chunks.append(chunk), stamps.append(t)), tail_silence_s=0.7)
    started = time.time()
    source.start()
    assert source.finished.wait(source.duration_s + 5)
    elapsed = time.time() - started
    source.stop()

    assert source.duration_s - 0.05 <= elapsed <= source.duration_s + 0.5
    played = np.concatenate(chunks)
    np.testing.assert_allclose(played, source.wave, atol=1e-7)
    assert all(len(chunk) == 320 for chunk in chunks[:-1])
    assert np.all(np.diff(stamps) > 0) and stamps[-1] - started >= source.duration_s - 0.05
    segmenter = SpeechSegmenter()
    utterances = segmenter.feed(played) + segmenter.flush()
    assert len(utterances) == 1 and utterances[0].start_s == pytest.approx(0.5, abs=0.1)


def test_wav_file_loops_and_stops(tmp_path, command):
    path = tmp_path / "command.wav"
    soundfile.write(path, command[: SAMPLE_RATE // 4], SAMPLE_RATE)
    source = WavFileSource(path, lambda chunk, t: None, loop=True, tail_silence_s=0.05, realtime=False)
    source.start()
    deadline = time.monotonic() + 10
    while source.passes < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    source.stop()
    assert source.passes >= 3 and not source.finished.is_set()


def write_fake_microphone(tmp_path: Path, infile: Path) -> dict[str, str]:
    """ALSA config whose default capture device reads raw s16le samples from `infile`."""
    config = tmp_path / "asound.conf"
    config.write_text(
        "pcm.!default {\n  type asym\n  playback.pcm \"null\"\n"
        f"  capture.pcm {{ type file; slave.pcm \"null\"; file \"/dev/null\"; infile \"{infile}\"; format \"raw\" }}\n}}\n"
    )
    env = dict(os.environ)
    env["ALSA_CONFIG_PATH"] = f"/usr/share/alsa/alsa.conf:{config}"
    return env


def run_mic_capture(env: dict[str, str], *args: str, timeout: float = 60) -> dict:
    result = subprocess.run(
        [sys.executable, str(PROGRAMS / "mic_capture.py"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def raw_recording(command: np.ndarray, rate: int, channels: int) -> bytes:
    """1 s silence, the command, 2 s silence at `rate` Hz, interleaved s16le."""
    wave = np.concatenate([np.zeros(SAMPLE_RATE, np.float32), command, np.zeros(2 * SAMPLE_RATE, np.float32)])
    if rate != SAMPLE_RATE:
        wave = soxr.resample(wave, SAMPLE_RATE, rate)
    samples = np.round(np.clip(wave, -1, 1) * 32767).astype("<i2")
    return np.repeat(samples[:, None], channels, axis=1).tobytes()


@pytest.mark.parametrize("rate, channels", [(16000, 1), (48000, 2), (44100, 1)])
def test_microphone_capture_through_alsa(tmp_path, command, rate, channels):
    infile = tmp_path / "mic.raw"
    infile.write_bytes(raw_recording(command, rate, channels))
    env = write_fake_microphone(tmp_path, infile)
    report = run_mic_capture(env, "--rate", str(rate), "--channels", str(channels))
    assert report["errors"] == [] and report["device_rate"] == rate
    assert len(report["utterances"]) == 1, report
    start_s, end_s = report["utterances"][0]
    assert start_s == pytest.approx(LEADING_SILENCE_S, abs=0.1)
    assert end_s == pytest.approx(LEADING_SILENCE_S + len(command) / SAMPLE_RATE, abs=0.2)


def test_missing_microphone_is_reported_not_fatal(tmp_path):
    infile = tmp_path / "mic.raw"
    infile.write_bytes(bytes(3200))
    report = run_mic_capture(write_fake_microphone(tmp_path, infile), "--device", "no such mic", "--stop-when", "error")
    assert report["opened"] == 0
    assert report["errors"][0].startswith("no microphone 'no such mic'") and "input devices: 0: default" in report["errors"][0]

    no_sound_card = {key: value for key, value in os.environ.items() if key != "ALSA_CONFIG_PATH"}
    report = run_mic_capture(no_sound_card, "--stop-when", "error")
    assert report["opened"] == 0 and report["errors"][0].startswith("no microphone 'default'")


def test_stalled_microphone_is_reported_and_reopened(tmp_path):
    """The device delivers audio, then nothing for 3 s (a blocked driver), then audio again."""
    fifo = tmp_path / "mic.fifo"
    os.mkfifo(fifo)
    finished = threading.Event()

    def device() -> None:
        # PortAudio opens and closes the device while probing it: start over when the reader goes.
        while not finished.is_set():
            try:
                with open(fifo, "wb") as pipe:  # blocks until a reader opens the device
                    pipe.write(bytes(2 * SAMPLE_RATE))  # 1 s of silence
                    pipe.flush()
                    finished.wait(3.0)
                    while not finished.is_set():
                        pipe.write(bytes(3200))
                        pipe.flush()
                        time.sleep(0.05)
            except BrokenPipeError:
                continue

    writer = threading.Thread(target=device, daemon=True)
    writer.start()
    try:
        report = run_mic_capture(write_fake_microphone(tmp_path, fifo), "--stall-timeout", "1", "--stop-when", "reopened")
    finally:
        finished.set()
        # The device may be waiting for a reader again: be one until it has seen `finished`.
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.join(timeout=10)
        os.close(reader)
    assert not writer.is_alive(), "the fake device thread did not stop"
    assert report["opened"] >= 2, report
    assert report["errors"][0] == "no audio from microphone 'default' for 1.0 s (unplugged or blocked); reopening"
