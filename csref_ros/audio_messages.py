"""audio_common_msgs/Audio content -> float32 mono 16 kHz, and the stamps of a stream of it.

The layout is mgonzs13/audio_common's (see docs/ROS.md): AudioInfo.format is a PortAudio sample
format constant naming the one AudioData array that holds the samples, interleaved by channel.
Its capturer stamps each message with the time its first sample was recorded (the stamp is
taken before the blocking read), so a message covers [stamp, stamp + samples / rate).

Nothing here imports ROS: the node hands over the message objects (attribute access only).
"""

from dataclasses import dataclass

import numpy as np
import soxr

from csref_model.audio import SAMPLE_RATE
from csref_ros.counters import Counters

# PortAudio format constant -> (AudioData field, scale to [-1, 1), offset of unsigned formats)
SAMPLE_FORMATS: dict[int, tuple[str, float, float]] = {
    1: ("float32_data", 1.0, 0.0),  # paFloat32
    2: ("int32_data", 2.0**31, 0.0),  # paInt32
    8: ("int16_data", 2.0**15, 0.0),  # paInt16
    16: ("int8_data", 2.0**7, 0.0),  # paInt8
    32: ("uint8_data", 2.0**7, 128.0),  # paUInt8
}
FLOAT32_FORMAT = 1
# A stamp that disagrees with the stream's own sample count by more than this (a gap, a restart
# of the publisher, a bag played again) starts a new stream instead of bending the timeline.
STREAM_JUMP_S = 0.25
AUDIO_TOPIC_COUNTERS = (
    "audio_messages",  # audio_common_msgs/AudioStamped messages received while listening
    "audio_messages_rejected",  # unknown format, empty, inconsistent channels or rate
    "audio_stream_restarts",  # stamps jumped or the rate changed: the resampler started afresh
)


class AudioMessageError(ValueError):
    """An Audio message this node cannot read; the message says what was wrong."""


def has_samples(audio) -> bool:
    """Whether an audio_common_msgs/Audio carries any samples (in any of its arrays)."""
    return any(len(getattr(audio.audio_data, field)) for field, _, _ in SAMPLE_FORMATS.values())


def audio_to_mono(audio) -> tuple[np.ndarray, int]:
    """An audio_common_msgs/Audio -> (float32 (N,) mono in [-1, 1), its sample rate)."""
    info = audio.info
    if info.format not in SAMPLE_FORMATS:
        known = ", ".join(f"{code} ({field.split('_')[0]})" for code, (field, _, _) in SAMPLE_FORMATS.items())
        raise AudioMessageError(f"audio format {info.format} is not supported; use one of {known}")
    if info.channels < 1:
        raise AudioMessageError(f"audio channels must be >= 1, got {info.channels}")
    if info.rate <= 0:
        raise AudioMessageError(f"audio rate must be positive, got {info.rate}")
    field, scale, offset = SAMPLE_FORMATS[info.format]
    raw = np.asarray(getattr(audio.audio_data, field))  # (N * channels,) interleaved
    if raw.size == 0:
        filled = [name for name, _, _ in SAMPLE_FORMATS.values() if len(getattr(audio.audio_data, name))]
        raise AudioMessageError(
            f"audio format {info.format} means samples in {field}, which is empty"
            + (f" (samples are in {', '.join(filled)}: set info.format to match)" if filled else "")
        )
    if raw.size % info.channels:
        raise AudioMessageError(f"{raw.size} samples in {field} do not divide into {info.channels} channels")
    samples = (raw.astype(np.float32) - np.float32(offset)) / np.float32(scale)
    return samples.reshape(-1, info.channels).mean(axis=1, dtype=np.float32), int(info.rate)  # (N,)


@dataclass(frozen=True)
class StreamChunk:
    samples: np.ndarray  # (N,) float32 16 kHz
    end_stamp_s: float  # stamp (seconds, the publisher's clock) just after the last sample


class AudioStream:
    """Consecutive messages of one audio topic -> 16 kHz chunks stamped with their end.

    Resampling is streaming (soxr keeps the filter state between messages, so no clicks at
    message boundaries, as with the microphone). Chunk stamps come from the stream's first stamp
    plus the 16 kHz samples given out, so the samples the resampler still holds back and any
    jitter in the publisher's stamps do not shift them.
    """

    def __init__(self) -> None:
        self.rate = 0
        self.resampler: soxr.ResampleStream | None = None
        self.start_stamp_s = 0.0  # stamp of the stream's first input sample
        self.samples_in = 0  # input samples since the stream started
        self.samples_out = 0  # 16 kHz samples since the stream started
        self.counters = Counters(AUDIO_TOPIC_COUNTERS)

    def receive(self, audio, stamp_s: float) -> StreamChunk | None:
        """An audio_common_msgs/Audio stamped `stamp_s` -> the next 16 kHz chunk (None while the
        resampler fills); AudioMessageError (counted) if it cannot be read."""
        self.counters.add("audio_messages")
        try:
            samples, rate = audio_to_mono(audio)
        except AudioMessageError:
            self.counters.add("audio_messages_rejected")
            raise
        return self.push(samples, rate, stamp_s)

    def push(self, samples: np.ndarray, rate: int, stamp_s: float) -> StreamChunk | None:
        """`samples` (N,) float32 at `rate`, the first recorded at `stamp_s`; None while the
        resampler has nothing to give yet."""
        expected_s = self.start_stamp_s + self.samples_in / self.rate if self.rate else stamp_s
        if rate != self.rate or abs(stamp_s - expected_s) > STREAM_JUMP_S:
            if self.rate:
                self.counters.add("audio_stream_restarts")
            self.rate, self.start_stamp_s, self.samples_in, self.samples_out = rate, stamp_s, 0, 0
            self.resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")
        self.samples_in += samples.size
        out = samples if self.resampler is None else self.resampler.resample_chunk(samples)
        self.samples_out += out.size
        if out.size == 0:
            return None
        # The stream's own clock (first stamp + samples), which jitter in the stamps cannot bend.
        return StreamChunk(out.astype(np.float32, copy=False), self.start_stamp_s + self.samples_out / SAMPLE_RATE)
