"""Audio sources for the grounding node: a microphone (sounddevice/PortAudio) or a WAV file.

Both deliver float32 mono 16 kHz chunks to `on_audio(chunk, end_time_s)`, where end_time_s is
the wall-clock time (time.time()) of the chunk's last sample, from their own thread. Problems
never raise out of the capture thread: they go to `on_error(reason)` and capture carries on
(the microphone is reopened every `retry_s` until it is back).
"""

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soxr

from csref_model.audio import SAMPLE_RATE, load_audio_16k

try:
    # Imported with this module (in the main thread, before the node's threads start): importing
    # initialises PortAudio, which points the whole process's stderr at /dev/null meanwhile to hide
    # ALSA's probing, so log lines that other threads wrote then were lost.
    import sounddevice
    PORTAUDIO_PROBLEM = ""
except OSError as error:  # no PortAudio library: only the microphone and answer playback need it
    sounddevice = None
    PORTAUDIO_PROBLEM = f"PortAudio is not available ({error}); install it (Debian: libportaudio2)"

logger = logging.getLogger(__name__)

AudioCallback = Callable[[np.ndarray, float], None]
ErrorCallback = Callable[[str], None]
AUDIO_SOURCE_COUNTERS = (
    "microphone_overflows",  # PortAudio reported lost input
    "microphone_blocks_dropped",  # capture queue full: the VAD fell behind
    "microphone_opens",  # successful (re)opens of the device
    "audio_file_passes",  # complete passes of audio_file
)
CLIPPING_LEVEL = 0.999  # |sample| at or above this is taken as clipped
CLIPPING_FRACTION = 0.01  # report a chunk with more clipped samples than this


class AudioSourceError(RuntimeError):
    """A live audio source (microphone) or the sound output that cannot work; the message says why and what to do."""


def play_sound(waveform: np.ndarray, sample_rate: int) -> None:
    """Start playing `waveform` on the default output and return at once (PortAudio plays it);
    AudioSourceError with the reason if impossible."""
    if sounddevice is None:
        raise AudioSourceError(PORTAUDIO_PROBLEM)
    try:
        sounddevice.play(waveform, sample_rate)
    except sounddevice.PortAudioError as error:
        raise AudioSourceError(f"cannot play on the default output ({error})") from error


def sanitize_chunk(chunk: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Replace NaN/inf samples by 0 and describe what was wrong (NaN, clipping); [] when fine."""
    problems = []
    finite = np.isfinite(chunk)
    if not finite.all():
        problems.append(f"NaN/infinite audio samples replaced by 0: {int((~finite).sum())} of {chunk.size} in a chunk")
        chunk = np.where(finite, chunk, 0.0).astype(np.float32)
    clipped = float(np.mean(np.abs(chunk) >= CLIPPING_LEVEL))
    if clipped > CLIPPING_FRACTION:
        problems.append(f"audio clipped: {clipped:.0%} of samples at full scale (lower the input gain)")
    return chunk, problems


class AudioThread:
    """Runs `run` on a daemon thread from `start` until `stop`; `run` returns when `stopping` is set."""

    def __init__(self, thread_name: str) -> None:
        self.thread_name = thread_name
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.stopping.clear()
        self.thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5.0)
            self.thread = None

    def run(self) -> None:
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        """This source's counters (reported in /diagnostics), all of AUDIO_SOURCE_COUNTERS."""
        raise NotImplementedError


class MicrophoneSource(AudioThread):
    """Capture from a PortAudio input device through sounddevice, resampled to 16 kHz mono.

    device: PortAudio device index or (part of) its name; None or "" = system default.
    sample_rate: capture rate; 0 = the device's default rate. channels are averaged to mono.
    """

    def __init__(
        self,
        on_audio: AudioCallback,
        on_error: ErrorCallback,
        device: int | str | None = None,
        sample_rate: int = 0,
        channels: int = 1,
        block_ms: int = 30,
        queue_seconds: float = 5.0,
        stall_timeout_s: float = 2.0,
        retry_s: float = 2.0,
    ) -> None:
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if sample_rate < 0:
            raise ValueError(f"sample_rate must be 0 (device default) or positive, got {sample_rate}")
        super().__init__("microphone")
        self.on_audio, self.on_error = on_audio, on_error
        self.device = device if device not in ("", None) else None
        self.requested_rate, self.channels, self.block_ms = sample_rate, channels, block_ms
        self.stall_timeout_s, self.retry_s = stall_timeout_s, retry_s
        self.blocks: queue.Queue = queue.Queue(maxsize=max(1, int(queue_seconds * 1000 / block_ms)))
        self.stream_finished = threading.Event()
        self.device_name = ""
        self.device_rate = 0
        self.dropped_blocks = 0  # queue full: the consumer fell behind
        self.overflows = 0  # PortAudio reported lost input
        self.opened = 0  # successful (re)opens

    def open_stream(self):
        """Open and start the input stream; AudioSourceError with the reason if impossible."""
        if sounddevice is None:
            raise AudioSourceError(PORTAUDIO_PROBLEM)
        try:
            info = sounddevice.query_devices(self.device, kind="input")
        except (ValueError, sounddevice.PortAudioError) as error:
            raise AudioSourceError(
                f"no microphone '{self.device if self.device is not None else 'default'}': {error}; "
                f"input devices: {self.input_device_names()}"
            ) from error
        rate = self.requested_rate or int(info["default_samplerate"])
        try:
            stream = sounddevice.InputStream(
                samplerate=rate,
                blocksize=max(1, rate * self.block_ms // 1000),
                device=self.device,
                channels=self.channels,
                dtype="int16",  # what microphones deliver; PortAudio converts if needed
                callback=self.capture_callback,
                finished_callback=self.stream_finished.set,
            )
            stream.start()
        except (ValueError, sounddevice.PortAudioError) as error:
            raise AudioSourceError(
                f"cannot open microphone '{info['name']}' at {rate} Hz with {self.channels} channel(s): {error}"
            ) from error
        self.device_name, self.device_rate = info["name"], rate
        return stream

    def counts(self) -> dict[str, int]:
        return {"microphone_overflows": self.overflows, "microphone_blocks_dropped": self.dropped_blocks,
                "microphone_opens": self.opened, "audio_file_passes": 0}

    @staticmethod
    def input_device_names() -> str:
        try:
            names = [f"{index}: {d['name']}" for index, d in enumerate(sounddevice.query_devices()) if d["max_input_channels"] > 0]
        except sounddevice.PortAudioError:
            names = []
        return ", ".join(names) or "none"

    def capture_callback(self, indata: np.ndarray, frames: int, time_info, status) -> None:
        """PortAudio's thread: only copy the block out; everything else happens in our thread."""
        if status.input_overflow:
            self.overflows += 1
        try:
            self.blocks.put_nowait((indata.copy(), time.time()))
        except queue.Full:
            self.dropped_blocks += 1

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                stream = self.open_stream()
            except AudioSourceError as error:
                self.on_error(str(error))
                self.stopping.wait(self.retry_s)
                continue
            self.opened += 1
            logger.info("capturing from '%s' at %d Hz, %d channel(s)", self.device_name, self.device_rate, self.channels)
            try:
                self.deliver_until_failure(soxr.ResampleStream(self.device_rate, SAMPLE_RATE, 1, dtype="float32"))
            finally:
                self.close_stream(stream)
                self.stream_finished.clear()
                while not self.blocks.empty():
                    self.blocks.get_nowait()
            if not self.stopping.is_set():
                self.stopping.wait(self.retry_s)

    def close_stream(self, stream) -> None:
        """Abort and close, without letting a driver stuck in a read block this thread for good."""

        def abort_and_close() -> None:
            try:
                stream.abort()
                stream.close()
            except Exception as error:  # a vanished device may fail even to close
                logger.debug("closing the input stream failed: %s", error)

        closer = threading.Thread(target=abort_and_close, name="microphone-close", daemon=True)
        closer.start()
        closer.join(timeout=self.stall_timeout_s)
        if closer.is_alive():
            self.on_error(f"microphone '{self.device_name}' does not close (driver stuck); opening a new stream")

    def deliver_until_failure(self, resampler: soxr.ResampleStream) -> None:
        last_block_time = time.monotonic()
        while not self.stopping.is_set():
            try:
                block, capture_time = self.blocks.get(timeout=0.1)  # block: (frames, channels)
            except queue.Empty:
                if self.stream_finished.is_set():
                    self.on_error(f"microphone '{self.device_name}' stopped (unplugged or failed); reopening")
                    return
                if time.monotonic() - last_block_time > self.stall_timeout_s:
                    self.on_error(
                        f"no audio from microphone '{self.device_name}' for {self.stall_timeout_s:.1f} s "
                        "(unplugged or blocked); reopening"
                    )
                    return
                continue
            last_block_time = time.monotonic()
            mono = block.mean(axis=1, dtype=np.float32) / 32768.0  # (frames, channels) int16 -> (frames,)
            chunk = resampler.resample_chunk(mono)
            if len(chunk):
                self.on_audio(chunk, capture_time)


class WavFileSource(AudioThread):
    """Play an audio file in real time as if it came from a microphone (demos and tests).

    Each pass is followed by `tail_silence_s` of silence so that the last utterance ends; with
    loop=True the file then starts again, otherwise `finished` is set.
    """

    def __init__(
        self,
        path: str | Path,
        on_audio: AudioCallback,
        loop: bool = False,
        chunk_ms: int = 20,
        tail_silence_s: float = 1.0,
        realtime: bool = True,
    ) -> None:
        self.path = Path(path)
        super().__init__(f"wav:{self.path.name}")
        wave = load_audio_16k(self.path)  # FileNotFoundError / ValueError with the reason
        silence = np.zeros(int(tail_silence_s * SAMPLE_RATE), dtype=np.float32)
        self.wave = np.concatenate([wave, silence])  # (N,) one pass
        self.on_audio, self.loop, self.realtime = on_audio, loop, realtime
        self.chunk_samples = SAMPLE_RATE * chunk_ms // 1000
        self.finished = threading.Event()
        self.passes = 0

    @property
    def duration_s(self) -> float:
        """One pass including the tail silence."""
        return len(self.wave) / SAMPLE_RATE

    def start(self) -> None:
        self.finished.clear()
        super().start()

    def counts(self) -> dict[str, int]:
        return {"microphone_overflows": 0, "microphone_blocks_dropped": 0, "microphone_opens": 0, "audio_file_passes": self.passes}

    def run(self) -> None:
        # `finished` means the file played to its end: a stop() between two passes of a loop
        # returns at the next chunk's stop check and never reaches it.
        start = time.monotonic()
        delivered = 0  # samples since start, over all passes
        while True:
            for begin in range(0, len(self.wave), self.chunk_samples):
                chunk = self.wave[begin : begin + self.chunk_samples]
                delivered += len(chunk)
                if self.realtime:
                    # A microphone hands over a chunk once its last sample has been recorded.
                    if self.stopping.wait(max(0.0, start + delivered / SAMPLE_RATE - time.monotonic())):
                        return
                elif self.stopping.is_set():
                    return
                self.on_audio(chunk, time.time())
            self.passes += 1
            if not self.loop:
                self.finished.set()
                return
