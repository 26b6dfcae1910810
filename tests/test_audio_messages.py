"""audio_common_msgs/Audio -> float 16 kHz and stream stamps (csref_ros.audio_messages), with the
generated message classes; and the Humble fallback of csref_ros.qos_events."""

import importlib
import sys
import types

import numpy as np
import pytest
from audio_common_msgs.msg import Audio

from csref_model.audio import SAMPLE_RATE, resample
from csref_ros.audio_messages import AudioMessageError, AudioStream, audio_to_mono, has_samples
from speech_support import espeak_16k

FORMATS = {  # PortAudio code -> (field, dtype, full scale, offset)
    1: ("float32_data", np.float32, 1.0, 0),
    2: ("int32_data", np.int32, 2**31, 0),
    8: ("int16_data", np.int16, 2**15, 0),
    16: ("int8_data", np.int8, 2**7, 0),
    32: ("uint8_data", np.uint8, 2**7, 128),
}


def audio_message(samples: np.ndarray, code: int, rate: int, channels: int = 1) -> Audio:
    """float (N, channels) in [-1, 1) -> an Audio message in format `code`, interleaved."""
    field, dtype, scale, offset = FORMATS[code]
    audio = Audio()
    encoded = samples if code == 1 else np.clip(np.round(samples * scale + offset), np.iinfo(dtype).min, np.iinfo(dtype).max)
    setattr(audio.audio_data, field, encoded.astype(dtype).reshape(-1))
    audio.info.format, audio.info.channels, audio.info.rate, audio.info.chunk = code, channels, rate, len(samples)
    return audio


@pytest.mark.parametrize("code", sorted(FORMATS))
def test_every_sample_format_reads_back_as_float(code):
    t = np.arange(480) / 48_000
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 220 * t)
    mono, rate = audio_to_mono(audio_message(np.stack([left, right], axis=1), code, 48_000, channels=2))
    tolerance = {1: 1e-7, 2: 1e-7, 8: 1e-4, 16: 1e-2, 32: 1e-2}[code]
    assert rate == 48_000 and mono.dtype == np.float32
    np.testing.assert_allclose(mono, (left + right) / 2, atol=tolerance)


def test_unreadable_messages_say_what_is_wrong():
    audio = audio_message(np.zeros((10, 1)), 8, 16_000)
    audio.info.format = 1  # samples are in int16_data
    with pytest.raises(AudioMessageError, match="samples are in int16_data: set info.format to match"):
        audio_to_mono(audio)
    audio.info.format = 4  # paInt24
    with pytest.raises(AudioMessageError, match="audio format 4 is not supported"):
        audio_to_mono(audio)
    audio = audio_message(np.zeros((9, 1)), 8, 16_000)
    audio.info.channels = 2
    with pytest.raises(AudioMessageError, match="9 samples in int16_data do not divide into 2 channels"):
        audio_to_mono(audio)
    assert has_samples(audio) and not has_samples(Audio())


@pytest.mark.parametrize("rate", [16_000, 44_100, 48_000])
def test_stream_resamples_like_the_whole_file_and_stamps_by_samples(rate):
    """Speech cut into 512-sample int16 messages: the stream's 16 kHz output equals resampling
    the whole recording, and each chunk's end stamp = first stamp + samples given out, whatever
    jitter the message stamps carry."""
    speech = resample(espeak_16k("the blue square"), SAMPLE_RATE, rate)
    stream, chunks = AudioStream(), []
    rng = np.random.default_rng(0)
    stamps = [1000.0 + begin / rate + rng.uniform(-0.02, 0.02) for begin in range(0, len(speech), 512)]
    for stamp_s, begin in zip(stamps, range(0, len(speech), 512)):
        chunk = stream.receive(audio_message(speech[begin : begin + 512, None], 8, rate), stamp_s)
        if chunk is not None:
            chunks.append(chunk)
    samples = np.concatenate([chunk.samples for chunk in chunks])
    assert chunks[-1].end_stamp_s == pytest.approx(stamps[0] + len(samples) / SAMPLE_RATE, abs=1e-9)
    assert len(speech) / rate - len(samples) / SAMPLE_RATE < 0.05  # what the resampler still holds
    reference = resample(speech, rate)[: len(samples)]
    assert np.abs(samples - reference).max() < 0.02 * np.abs(reference).max() + 1e-4
    counts = stream.counters.snapshot()
    assert counts["audio_messages"] == -(-len(speech) // 512) and counts["audio_stream_restarts"] == 0


def test_stream_restarts_on_a_stamp_jump_or_a_new_rate():
    stream = AudioStream()
    silence = audio_message(np.zeros((1600, 1)), 8, 16_000)
    assert stream.receive(silence, 10.0).end_stamp_s == pytest.approx(10.1)
    assert stream.receive(silence, 10.1).end_stamp_s == pytest.approx(10.2)
    assert stream.receive(silence, 20.0).end_stamp_s == pytest.approx(20.1)  # a gap: the stamps win
    stream.receive(audio_message(np.zeros((4800, 1)), 8, 48_000), 20.1)
    assert stream.counters.snapshot()["audio_stream_restarts"] == 2
    with pytest.raises(AudioMessageError):
        stream.receive(Audio(), 20.2)
    assert stream.counters.snapshot()["audio_messages_rejected"] == 1


def test_qos_events_fall_back_to_the_humble_module(monkeypatch):
    import csref_ros.qos_events as qos_events
    from rclpy.event_handler import SubscriptionEventCallbacks

    assert qos_events.SubscriptionEventCallbacks is SubscriptionEventCallbacks  # Iron and later: the real one
    humble = types.ModuleType("rclpy.qos_event")
    for name in qos_events.__all__:
        setattr(humble, name, type(name, (), {}))
    monkeypatch.setitem(sys.modules, "rclpy.event_handler", None)  # as on Humble: no such module
    monkeypatch.setitem(sys.modules, "rclpy.qos_event", humble)
    try:
        reloaded = importlib.reload(qos_events)
        assert all(getattr(reloaded, name) is getattr(humble, name) for name in qos_events.__all__)
    finally:
        monkeypatch.undo()
        importlib.reload(qos_events)
    assert qos_events.SubscriptionEventCallbacks is SubscriptionEventCallbacks
