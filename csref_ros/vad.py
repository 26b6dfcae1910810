"""Speech segmentation: a stream of 16 kHz audio in, utterances out.

A frame classifier labels each 10/20/30 ms frame as speech or not; `backend` picks it:

- `silero` (default): the Silero VAD network (the ONNX model shipped in the `silero-vad` pip
  package, run on onnxruntime's CPU provider) on 512-sample (32 ms) windows; a frame gets the
  speech probability of the newest complete window and is speech when that is >=
  `silero_threshold`,
- `webrtc`: webrtcvad (GMM on band energies) at `aggressiveness` 0-3.

docs/ROS.md ("The VAD on its own") measures both; silero is the default from those numbers.
A frame counts as voiced when the classifier says so and its energy is `energy_margin_db`
above the noise floor (a low percentile of the last `noise_window_s` of frame energies): this
keeps steady noise such as fans out (webrtcvad alone takes it for speech) and background
talkers quieter than the speaker (both classifiers take babble for speech). Single frames are
noisy, so the segmenter works on windows of frames (the ring-buffer scheme of webrtcvad's
example), the same for both backends:

- speech starts when at least `start_ratio` of the frames in the last `start_window_ms` are
  voiced; the utterance begins at the first voiced frame of that window,
- speech ends when at least `end_ratio` of the frames in the last `hangover_ms` are unvoiced;
  the utterance ends after its last voiced frame, so short pauses between words never split it,
- utterances with less than `min_utterance_s` of speech are dropped (clicks, coughs), and one
  reaching `max_utterance_s` is cut there (a monologue is not buffered forever).

Each Utterance carries the speech interval (start_s, end_s, in seconds of the stream) and the
audio to recognise: from `preroll_ms` before the start (soft onsets the VAD misses) to
`postroll_ms` after the end. While the hangover is still running, `provisional()` gives the
utterance that will result if no more speech comes: the same samples, so work on it (the speech
encoder) can start before the end is certain.

CLI (the same segmenter the node uses):
    python -m csref_ros.vad FILE.wav [--backend silero|webrtc] [--aggressiveness N] [--json]
prints the speech segments [[start_s, end_s], ...] of any WAV/FLAC (any sample rate, stereo
mixed to mono).
"""

import argparse
import functools
import importlib.util
import json
import logging
import math
from collections import deque
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import webrtcvad

from csref_model.audio import SAMPLE_RATE, load_audio_16k

logger = logging.getLogger(__name__)

FRAME_MS_CHOICES = (10, 20, 30)
VAD_BACKENDS = ("silero", "webrtc")
SILERO_VAD_VERSION = "6.2.3"  # the pip package whose model file we load (setup.py pins it)
SILERO_WINDOW = 512  # samples per model call at 16 kHz (32 ms), as the model was trained
SILERO_CONTEXT = 64  # samples of the previous window the model sees in front of each window
SILERO_STATE_SHAPE = (2, 1, 128)  # recurrent state (h and c, batch 1, 128 units)
NOISE_FLOOR_PERCENTILE = 10  # pauses between words keep this low even in fluent speech


@dataclass(frozen=True)
class VadConfig:
    backend: str = "silero"  # frame classifier, one of VAD_BACKENDS (default: docs/ROS.md's measurement)
    aggressiveness: int = 2  # webrtcvad mode 0 (permissive) .. 3 (strict)
    silero_threshold: float = 0.5  # silero: speech probability from which a frame is speech
    frame_ms: int = 30
    start_window_ms: int = 300
    start_ratio: float = 0.6
    hangover_ms: int = 500
    end_ratio: float = 0.9
    preroll_ms: int = 300
    postroll_ms: int = 200
    min_utterance_s: float = 0.3
    max_utterance_s: float = 10.0
    energy_margin_db: float = 5.0  # a voiced frame must also be this far above the noise floor
    noise_window_s: float = 5.0  # the noise floor is a low percentile of this much recent audio

    def __post_init__(self) -> None:
        problems = []
        if self.backend not in VAD_BACKENDS:
            problems.append(f"backend must be one of {', '.join(VAD_BACKENDS)}, got {self.backend!r}")
        if not 0.0 < self.silero_threshold < 1.0:
            problems.append(f"silero_threshold must be in (0, 1), got {self.silero_threshold}")
        if self.aggressiveness not in (0, 1, 2, 3):
            problems.append(f"aggressiveness must be 0, 1, 2 or 3, got {self.aggressiveness}")
        if self.frame_ms not in FRAME_MS_CHOICES:
            problems.append(f"frame_ms must be one of {FRAME_MS_CHOICES} (webrtcvad), got {self.frame_ms}")
        for name in ("start_window_ms", "hangover_ms"):
            if getattr(self, name) < self.frame_ms:
                problems.append(f"{name} must be at least one frame ({self.frame_ms} ms), got {getattr(self, name)}")
        for name in ("preroll_ms", "postroll_ms"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.postroll_ms > self.hangover_ms:
            problems.append(f"postroll_ms ({self.postroll_ms}) must not exceed hangover_ms ({self.hangover_ms})")
        for name in ("start_ratio", "end_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.min_utterance_s < 0:
            problems.append(f"min_utterance_s must be >= 0, got {self.min_utterance_s}")
        if self.max_utterance_s <= max(self.min_utterance_s, self.frame_ms / 1000):
            problems.append(
                f"max_utterance_s ({self.max_utterance_s}) must exceed min_utterance_s ({self.min_utterance_s}) and one frame"
            )
        if self.energy_margin_db < 0:
            problems.append(f"energy_margin_db must be >= 0, got {self.energy_margin_db}")
        if self.noise_window_s * 1000 < self.frame_ms:
            problems.append(f"noise_window_s must cover at least one frame, got {self.noise_window_s}")
        if problems:
            raise ValueError("invalid VAD settings: " + "; ".join(problems))

    @property
    def frame_samples(self) -> int:
        return SAMPLE_RATE * self.frame_ms // 1000

    def frames(self, milliseconds: float) -> int:
        """Whole frames covering `milliseconds` (at least one)."""
        return max(1, math.ceil(milliseconds / self.frame_ms))


@dataclass
class Utterance:
    start_s: float  # first voiced frame, seconds since the first sample fed
    end_s: float  # end of the last voiced frame
    samples: np.ndarray = field(repr=False)  # (N,) float32 in [-1, 1] at 16 kHz, with pre- and post-roll
    samples_start_s: float  # stream time of samples[0]
    cut: bool = False  # True when max_utterance_s cut the speech short

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def to_int16(chunk: np.ndarray) -> np.ndarray:
    """int16 passes through; float in [-1, 1] is scaled and clipped."""
    if chunk.dtype == np.int16:
        return chunk
    if not np.issubdtype(chunk.dtype, np.floating):
        raise TypeError(f"audio must be int16 or float in [-1, 1], got dtype {chunk.dtype}")
    if not np.all(np.isfinite(chunk)):
        raise ValueError("audio contains NaN or infinite samples; replace them (e.g. with 0) before segmenting")
    return np.clip(np.round(chunk * 32767.0), -32768, 32767).astype(np.int16)


class FrameClassifier(Protocol):
    def is_speech(self, frame: np.ndarray) -> bool:
        """frame: (frame_samples,) int16 at 16 kHz, consecutive frames of one stream."""


class WebrtcClassifier:
    def __init__(self, aggressiveness: int) -> None:
        self.vad = webrtcvad.Vad(aggressiveness)

    def is_speech(self, frame: np.ndarray) -> bool:
        return self.vad.is_speech(frame.tobytes(), SAMPLE_RATE)


def silero_model_path() -> Path:
    """The ONNX model inside the installed silero-vad package (found without importing the
    package, whose __init__ imports torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"vad backend silero needs the pip package silero-vad: pip install silero-vad=={SILERO_VAD_VERSION} onnxruntime")
    path = Path(spec.submodule_search_locations[0]) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall silero-vad=={SILERO_VAD_VERSION}")
    return path


@functools.lru_cache(maxsize=1)
def silero_session() -> Any:
    """One onnxruntime CPU session for every segmenter (a session is stateless; the recurrent
    state lives in each SileroClassifier)."""
    # onnxruntime is optional (only this backend needs it), so it is imported here.
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # one 32 ms window is ~0.1 ms of work: threads only add overhead
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the shipped graph has unused initialisers; onnxruntime warns about each
    return onnxruntime.InferenceSession(str(silero_model_path()), options, providers=["CPUExecutionProvider"])


class SileroClassifier:
    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.session = silero_session()
        self.state = np.zeros(SILERO_STATE_SHAPE, dtype=np.float32)
        self.context = np.zeros(SILERO_CONTEXT, dtype=np.float32)
        self.pending = np.zeros(0, dtype=np.float32)  # samples not yet making a whole window
        self.probability = 0.0  # of the newest complete window

    def is_speech(self, frame: np.ndarray) -> bool:
        self.pending = np.concatenate([self.pending, frame.astype(np.float32) / 32768.0])
        while len(self.pending) >= SILERO_WINDOW:
            window, self.pending = self.pending[:SILERO_WINDOW], self.pending[SILERO_WINDOW:]
            model_input = np.concatenate([self.context, window])[None, :]  # (1, SILERO_CONTEXT + SILERO_WINDOW)
            output, self.state = self.session.run(
                None, {"input": model_input, "state": self.state, "sr": np.array(SAMPLE_RATE, dtype=np.int64)}
            )  # output (1, 1), state SILERO_STATE_SHAPE
            self.probability = float(output[0, 0])
            self.context = window[-SILERO_CONTEXT:]
        return self.probability >= self.threshold


def frame_classifier(config: VadConfig) -> FrameClassifier:
    if config.backend == "silero":
        return SileroClassifier(config.silero_threshold)
    return WebrtcClassifier(config.aggressiveness)


class SpeechSegmenter:
    """Streaming VAD segmenter: feed() 16 kHz mono chunks of any size, get finished Utterances."""

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()
        self.classifier = frame_classifier(self.config)
        cfg = self.config
        self.start_window_frames = cfg.frames(cfg.start_window_ms)
        self.hangover_frames = cfg.frames(cfg.hangover_ms)
        self.preroll_frames = cfg.frames(cfg.preroll_ms) if cfg.preroll_ms > 0 else 0
        self.postroll_frames = cfg.frames(cfg.postroll_ms) if cfg.postroll_ms > 0 else 0
        self.max_frames = max(1, int(cfg.max_utterance_s * 1000 / cfg.frame_ms))
        self.pending = np.zeros(0, dtype=np.int16)  # samples not yet making a whole frame
        self.frame_index = 0  # index of the next frame
        # Recent frames (index, int16 audio, voiced) while waiting for speech: pre-roll + start window.
        self.recent: deque[tuple[int, np.ndarray, bool]] = deque(maxlen=self.preroll_frames + self.start_window_frames)
        self.in_speech = False
        self.last_frame_voiced = False
        self.speech_start_frame = 0
        self.last_voiced_frame = 0
        self.audio_start_frame = 0
        self.utterance_audio: list[np.ndarray] = []
        self.end_window: deque[bool] = deque(maxlen=self.hangover_frames)
        self.recent_energies_db: deque[float] = deque(maxlen=cfg.frames(cfg.noise_window_s * 1000))
        self.dropped_short = 0  # utterances shorter than min_utterance_s

    @property
    def stream_time_s(self) -> float:
        """Seconds of audio consumed (whole frames)."""
        return self.frame_index * self.config.frame_samples / SAMPLE_RATE

    @property
    def speech_start_s(self) -> float | None:
        """Start of the utterance in progress, None when no one is speaking."""
        return self.frame_time(self.speech_start_frame) if self.in_speech else None

    @property
    def voice_active(self) -> bool:
        """Inside an utterance and the newest frame is voiced (not in a pause or the hangover)."""
        return self.in_speech and self.last_frame_voiced

    def frame_time(self, frame_index: int) -> float:
        return frame_index * self.config.frame_samples / SAMPLE_RATE

    def feed(self, chunk: np.ndarray) -> list[Utterance]:
        """Add 16 kHz mono audio (int16, or float in [-1, 1]); return the utterances it completes."""
        audio = np.concatenate([self.pending, to_int16(np.asarray(chunk).reshape(-1))])
        frame_samples = self.config.frame_samples
        whole = len(audio) // frame_samples * frame_samples
        self.pending = audio[whole:]
        utterances = []
        for frame in audio[:whole].reshape(-1, frame_samples):
            utterance = self.process_frame(frame)
            if utterance is not None:
                utterances.append(utterance)
        return utterances

    def flush(self) -> list[Utterance]:
        """End of stream: close the utterance in progress, if any."""
        if not self.in_speech:
            return []
        utterance = self.finish(end_frame=self.last_voiced_frame + 1, cut=False)
        return [utterance] if utterance is not None else []

    def process_frame(self, frame: np.ndarray) -> Utterance | None:
        index = self.frame_index
        self.frame_index += 1
        loud_enough = self.above_noise_floor(frame)  # first: every frame must update the noise floor
        voiced = self.classifier.is_speech(frame) and loud_enough
        self.last_frame_voiced = voiced
        if not self.in_speech:
            self.recent.append((index, frame, voiced))
            window = list(self.recent)[-self.start_window_frames :]
            voiced_count = sum(is_voiced for _, _, is_voiced in window)
            if voiced_count >= self.config.start_ratio * self.start_window_frames:
                self.start_speech(window)
            return None

        self.utterance_audio.append(frame)
        self.end_window.append(voiced)
        if voiced:
            self.last_voiced_frame = index
        if index + 1 - self.speech_start_frame >= self.max_frames:
            return self.finish(end_frame=index + 1, cut=True)
        unvoiced_count = self.end_window.count(False)
        if len(self.end_window) == self.hangover_frames and unvoiced_count >= self.config.end_ratio * self.hangover_frames:
            return self.finish(end_frame=self.last_voiced_frame + 1, cut=False)
        return None

    def above_noise_floor(self, frame: np.ndarray) -> bool:
        """Energy gate: steady noise and quieter background talkers stay below it."""
        energy_db = 10.0 * math.log10(float(np.mean(np.square(frame, dtype=np.float64))) / 32768.0**2 + 1e-12)
        self.recent_energies_db.append(energy_db)
        noise_floor_db = float(np.percentile(self.recent_energies_db, NOISE_FLOOR_PERCENTILE))
        return energy_db >= noise_floor_db + self.config.energy_margin_db

    def start_speech(self, window: list[tuple[int, np.ndarray, bool]]) -> None:
        voiced_indices = [index for index, _, is_voiced in window if is_voiced]
        self.in_speech = True
        self.speech_start_frame = voiced_indices[0]
        self.last_voiced_frame = voiced_indices[-1]
        first_kept = self.speech_start_frame - self.preroll_frames
        kept = [(index, frame) for index, frame, _ in self.recent if index >= first_kept]
        self.audio_start_frame = kept[0][0]
        self.utterance_audio = [frame for _, frame in kept]
        self.end_window.clear()
        self.end_window.extend(is_voiced for index, _, is_voiced in window if index >= self.speech_start_frame)
        self.recent.clear()

    def provisional(self) -> Utterance | None:
        """The utterance `flush()` or the hangover will produce if no voiced frame follows; None
        while the voice is active, outside speech, before the post-roll is in, or if too short."""
        end_frame = self.last_voiced_frame + 1
        if not self.in_speech or self.last_frame_voiced or self.frame_index < end_frame + self.postroll_frames:
            return None
        return self.utterance(end_frame, cut=False)

    def utterance(self, end_frame: int, cut: bool) -> Utterance | None:
        """The speech from speech_start_frame to end_frame with its pre- and post-roll audio."""
        start_s, end_s = self.frame_time(self.speech_start_frame), self.frame_time(end_frame)
        if end_s - start_s < self.config.min_utterance_s:
            return None
        kept = self.utterance_audio[: end_frame + self.postroll_frames - self.audio_start_frame]
        return Utterance(
            start_s=start_s,
            end_s=end_s,
            samples=np.concatenate(kept).astype(np.float32) / 32768.0,
            samples_start_s=self.frame_time(self.audio_start_frame),
            cut=cut,
        )

    def finish(self, end_frame: int, cut: bool) -> Utterance | None:
        utterance = self.utterance(end_frame, cut)
        if utterance is None:
            self.dropped_short += 1
            logger.debug("dropped speech at %.2f s (shorter than min_utterance_s)", self.frame_time(self.speech_start_frame))
        self.in_speech = False
        self.utterance_audio = []
        self.end_window.clear()
        return utterance


def segment_wave(wave_16k: np.ndarray, config: VadConfig | None = None, chunk_s: float = 0.1) -> list[Utterance]:
    """Run the streaming segmenter over a whole waveform, fed in chunks as a microphone would."""
    segmenter = SpeechSegmenter(config)
    chunk = max(1, int(chunk_s * SAMPLE_RATE))
    utterances = []
    for begin in range(0, len(wave_16k), chunk):
        utterances += segmenter.feed(wave_16k[begin : begin + chunk])
    return utterances + segmenter.flush()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m csref_ros.vad", description="Print the speech segments of an audio file, as the grounding node finds them."
    )
    parser.add_argument("file", help="WAV/FLAC file, any sample rate, mono or stereo")
    for setting in fields(VadConfig):  # --backend, --aggressiveness, --frame-ms, ...: the node's vad_* parameters
        choices = VAD_BACKENDS if setting.name == "backend" else None
        parser.add_argument(f"--{setting.name.replace('_', '-')}", type=type(setting.default), default=setting.default, choices=choices)
    parser.add_argument("--json", action="store_true", help="print [[start_s, end_s], ...] as JSON")
    args = parser.parse_args()
    try:
        config = VadConfig(**{setting.name: getattr(args, setting.name) for setting in fields(VadConfig)})
        wave = load_audio_16k(args.file)
        segments = [[round(u.start_s, 3), round(u.end_s, 3)] for u in segment_wave(wave, config)]
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        parser.exit(2, f"error: {error}\n")
    if args.json:
        print(json.dumps(segments))
    else:
        for start_s, end_s in segments:
            print(f"{start_s:8.3f} {end_s:8.3f}  ({end_s - start_s:.2f} s)")


if __name__ == "__main__":
    main()
