"""The grounding pipeline without ROS: audio chunks and camera frames in, boxes out.

    pipeline = Pipeline(settings, callbacks)
    pipeline.start(grounder)                          # the inference thread
    pipeline.activate(frame_history_s=3.0, frame_history_rate_hz=10.0, use_depth=False)
    pipeline.add_frame(stamp_s, CameraFrame(rgb, header))   # camera thread
    pipeline.add_depth(stamp_s, DepthFrame(depth_image, header))   # depth thread, with use_depth
    pipeline.on_audio(chunk, end_time_s)              # audio thread (or on_stamped_audio)
    # -> callbacks.publish(Outcome(job, frame, detections, depth)) on the inference thread, for
    #    every utterance grounded: up to top_k detections, none when nothing passed score_threshold
    #    (callbacks.unanswered(job, "no_frame", why) when there was no frame to ground it on)
    # -> callbacks.voice_activity(active) on the audio thread when the VAD's voice state changes,
    #    callbacks.speech_event(started, time_s) when an utterance starts or closes
    pipeline.enqueue(pipeline.given_utterance(samples, end_s))   # speech from elsewhere
    pipeline.set_listening(False)                     # mute: audio dropped until True
    pipeline.deactivate(); pipeline.stop()

The VAD cuts the audio into utterances; each is paired with a camera frame and grounded on
the inference thread, which, while someone speaks, works ahead: it encodes the newest frame,
and once the voice stops, the frame of that moment and the speech the VAD hangover will most
likely confirm, so that only fusion and head remain when it does.

Threads and the data each owns:
- audio thread (`on_audio`/`on_stamped_audio`): the VAD segmenter and the stream bookkeeping,
  under `audio_lock` because activate/deactivate/set_listening/given_utterance (other threads)
  replace or number them. It hands finished utterances
  to the inference thread through the `jobs` queue and publishes what the inference thread
  needs for working ahead as one immutable `SpeechState` (a single reference swap; readers
  take it once per step).
- inference thread (`run`): the work done ahead, `precomputed` image features and
  `speech_ahead` speech features. No other thread touches them: activate() asks for them to
  be dropped through the `reset_requested` event, honoured before the next step.
- camera thread (`add_frame`): frames go into the FrameBuffer, which has its own lock; so do
  depth frames (`add_depth`, a second FrameBuffer), matched to the colour frame used by stamp
  (`depth_sync_tolerance_s`) when the utterance is delivered.
- `settings` is an immutable snapshot; `update_settings` swaps the reference and each step
  reads it once. `active` is a flag with one writer (the caller's thread).
- `counters` (a Counters) and the latencies (under `latency_lock`) are written by the audio
  and inference threads and read by whoever reports them.
"""

import math
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from csref_model import Grounder, GroundingResult
from csref_model.audio import SAMPLE_RATE
from csref_ros.audio import sanitize_chunk
from csref_ros.counters import Counters
from csref_ros.depth import DepthImage, DepthLimits, Target3D, locate_box
from csref_ros.frame_buffer import FrameBuffer, StampedFrame
from csref_ros.parameters import vad_config_from
from csref_ros.vad import SpeechSegmenter, Utterance, VadConfig

PRECOMPUTED_FEATURES_KEPT = 8
LATENCIES_KEPT = 1000
PIPELINE_COUNTERS = (
    "utterances",  # closed by the VAD
    "utterances_dropped_short",  # speech shorter than vad_min_utterance_s
    "utterances_dropped_queue_full",  # inference was behind; the oldest waiting one was dropped
    "utterances_without_frame",  # no camera frame within max_frame_age_s
    "utterances_below_threshold",  # best box scored below score_threshold (an empty array is published)
    "detections",  # utterances published with a box (the target; up to top_k candidates each)
    "depth_frames_missing",  # use_depth: no depth frame within depth_sync_tolerance_s of the colour frame
    "targets_without_depth",  # use_depth: a box with too few valid depth pixels (holes, out of range)
    "targets_located",  # use_depth: boxes given a 3D position
    "precomputed_images",  # frames encoded ahead, during speech
    "precomputed_used",  # utterances grounded on a frame encoded ahead
    "speech_encoded_ahead",  # provisional utterances encoded during the hangover
    "speech_ahead_used",  # utterances whose speech had been encoded ahead
    "audio_problems",  # chunks with NaN/infinite or clipped samples
    "audio_chunks_muted",  # audio dropped while listening was disabled (csref/enable)
    "inference_errors",  # exceptions on the inference thread (the thread carries on)
)
Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in the frame's pixels


@dataclass(frozen=True)
class PipelineSettings:
    """The run-time settings, one immutable snapshot (see csref_ros.parameters for each)."""

    frame_selection: str
    max_frame_age_s: float
    precomputed_frame_tolerance_s: float
    score_threshold: float
    top_k: int
    max_pending_utterances: int
    depth_limits: DepthLimits
    depth_sync_tolerance_s: float
    vad: VadConfig

    @classmethod
    def from_parameters(cls, values: Mapping[str, Any]) -> "PipelineSettings":
        """From the node's parameter values (ValueError if the vad_* ones are inconsistent)."""
        return cls(
            frame_selection=values["frame_selection"],
            max_frame_age_s=float(values["max_frame_age_s"]),
            precomputed_frame_tolerance_s=float(values["precomputed_frame_tolerance_s"]),
            score_threshold=float(values["score_threshold"]),
            top_k=values["top_k"],
            max_pending_utterances=values["max_pending_utterances"],
            depth_limits=depth_limits_from(values),
            depth_sync_tolerance_s=float(values["depth_sync_tolerance_s"]),
            vad=vad_config_from(values),
        )


def depth_limits_from(values: Mapping[str, Any]) -> DepthLimits:
    if values["depth_min_m"] >= values["depth_max_m"]:
        raise ValueError(f"depth_min_m ({values['depth_min_m']}) must be below depth_max_m ({values['depth_max_m']})")
    return DepthLimits(min_m=float(values["depth_min_m"]), max_m=float(values["depth_max_m"]))


@dataclass(frozen=True)
class CameraFrame:
    rgb: np.ndarray  # (H, W, 3) uint8 RGB, often a view of the message buffer
    header: Any  # opaque here: what the caller publishes the result with (the image's std_msgs/Header)


@dataclass(frozen=True)
class DepthFrame:
    image: DepthImage  # aligned to the colour frames, with its camera_info's intrinsics
    header: Any  # opaque here: the depth image's std_msgs/Header (its frame_id is the optical frame)


@dataclass(frozen=True)
class Detection:
    box: Box
    score: float
    target: Target3D | None  # with use_depth: where the box is, in the depth frame's optical frame


@dataclass(frozen=True)
class UtteranceJob:
    key: tuple[int, float, float]  # (segmenter generation, start, end in stream seconds): the same for
    # the provisional utterance seen during the hangover and the final one
    number: int
    start_s: float  # clock seconds of the first voiced frame
    end_s: float  # clock seconds of the end of speech
    detected_s: float  # when the VAD closed the utterance (end_s + hangover)
    samples: np.ndarray = field(repr=False)  # (N,) float32 16 kHz
    cut: bool


@dataclass(frozen=True)
class SpeechState:
    """What the audio thread last saw, for the inference thread's work ahead."""

    voice_active: bool = False  # someone is speaking now
    in_utterance: bool = False  # speaking, or in a pause / the hangover after speech
    voice_stopped_s: float = 0.0  # clock time of the end of the last voiced frame
    provisional_job: UtteranceJob | None = None  # what the hangover will produce if nobody speaks on


@dataclass(frozen=True)
class Outcome:
    """What an utterance grounded to: sent whether or not a box passed score_threshold, so that
    "heard, no match" (no detections) is distinct from silence (nothing sent)."""

    job: UtteranceJob
    frame: CameraFrame
    detections: tuple[Detection, ...]  # best first, at most top_k, each scoring >= score_threshold
    depth: DepthFrame | None  # the depth frame matched to `frame` (use_depth, and a box to locate)
    # (H, W) bool, the best detection's pixels in `frame`, when the model has a mask head
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class PipelineCallbacks:
    publish: Callable[[Outcome], None]  # inference thread: the result of an utterance to send
    unanswered: Callable[[UtteranceJob, str, str], None]  # inference thread: (job, "no_frame", why)
    voice_activity: Callable[[bool], None]  # audio thread: the VAD's voice state changed
    speech_event: Callable[[bool, float], None]  # audio thread: (True: speech started / False: the
    # utterance closed, clock time of that start / end of speech)
    report_problem: Callable[[str, str | None], None]  # any thread: (message, kind that groups repeats)
    log: Callable[[str], None]  # any thread: progress worth an info line
    now_s: Callable[[], float]  # the clock frames are stamped on


class Pipeline:
    def __init__(self, settings: PipelineSettings, callbacks: PipelineCallbacks) -> None:
        self.settings = settings
        self.callbacks = callbacks
        self.counters = Counters(PIPELINE_COUNTERS)
        self.latency_lock = threading.Lock()
        self.latencies_s: deque[float] = deque(maxlen=LATENCIES_KEPT)  # end of speech -> publish
        self.processing_s: deque[float] = deque(maxlen=LATENCIES_KEPT)  # utterance closed -> publish
        self.active = False
        self.listening = True  # one writer (set_listening); the audio thread drops audio while False
        self.frames = FrameBuffer(capacity=2)
        self.depth_frames: FrameBuffer | None = None  # with use_depth
        self.jobs: queue.Queue[UtteranceJob] = queue.Queue()
        self.speech = SpeechState()
        # Audio thread (replaced by activate/deactivate under audio_lock).
        self.audio_lock = threading.Lock()
        self.segmenter: SpeechSegmenter | None = None
        self.segmenter_generation = 0
        self.fed_samples = 0
        self.utterance_count = 0
        # Inference thread.
        self.grounder: Grounder | None = None
        self.worker: threading.Thread | None = None
        self.stop_requested = threading.Event()
        self.reset_requested = threading.Event()
        self.precomputed: OrderedDict[float, tuple[StampedFrame, Any]] = OrderedDict()
        self.speech_ahead: OrderedDict[tuple[int, float, float], Any] = OrderedDict()

    # ------------------------------------------------------------------------------------
    # Control (the caller's thread)

    def start(self, grounder: Grounder) -> None:
        """Start the inference thread with a loaded model."""
        self.grounder = grounder
        self.stop_requested.clear()
        self.worker = threading.Thread(target=self.run, name="inference", daemon=True)
        self.worker.start()

    def stop(self) -> None:
        """Stop the inference thread (after the utterance in progress) and let go of the model."""
        self.stop_requested.set()
        if self.worker is not None:
            self.worker.join(timeout=30.0)
            self.worker = None
        self.grounder = None

    def activate(self, frame_history_s: float, frame_history_rate_hz: float, use_depth: bool = False) -> None:
        """Start listening and pairing: a fresh frame history (and depth history), VAD and work ahead."""
        capacity = max(2, math.ceil(frame_history_s * frame_history_rate_hz) + 1)
        self.frames = FrameBuffer(capacity=capacity, min_interval_s=1.0 / frame_history_rate_hz)
        self.depth_frames = FrameBuffer(capacity=capacity, min_interval_s=1.0 / frame_history_rate_hz) if use_depth else None
        self.reset_requested.set()
        with self.audio_lock:
            self.segmenter = SpeechSegmenter(self.settings.vad)
            self.segmenter_generation += 1
            self.fed_samples = 0
            self.speech = SpeechState()
        self.active = True

    def deactivate(self) -> None:
        """Stop listening; utterances waiting for inference are dropped, results no longer published."""
        self.active = False
        self.frames.clear()
        if self.depth_frames is not None:
            self.depth_frames.clear()
        with self.audio_lock:
            self.segmenter = None
            self.speech = SpeechState()
        while not self.jobs.empty():
            self.jobs.get_nowait()

    def set_listening(self, listening: bool) -> None:
        """Drop audio while False (counted); the VAD starts afresh when listening resumes, so
        speech cut by muting is never grounded."""
        with self.audio_lock:
            if listening and not self.listening and self.segmenter is not None:
                self.segmenter = SpeechSegmenter(self.settings.vad)
                self.segmenter_generation += 1
                self.fed_samples = 0
                self.speech = SpeechState()
            self.listening = listening

    def given_utterance(self, samples: np.ndarray, end_s: float) -> UtteranceJob:
        """A job for speech that did not come through the VAD (float32 (N,) 16 kHz, its end at
        clock time end_s), numbered in the same sequence; pass it to enqueue()."""
        with self.audio_lock:
            self.utterance_count += 1
            number = self.utterance_count
        start_s = end_s - len(samples) / SAMPLE_RATE
        return UtteranceJob(key=(-number, start_s, end_s), number=number, start_s=start_s, end_s=end_s,
                            detected_s=self.callbacks.now_s(), samples=samples, cut=False)

    def update_settings(self, settings: PipelineSettings) -> None:
        """Swap the settings; a new VAD configuration takes over between utterances."""
        self.settings = settings

    def latencies(self) -> tuple[list[float], list[float]]:
        """(end of speech -> publish, utterance closed -> publish), in seconds, the recent ones."""
        with self.latency_lock:
            return list(self.latencies_s), list(self.processing_s)

    # ------------------------------------------------------------------------------------
    # Camera thread

    def add_frame(self, stamp_s: float, frame: CameraFrame) -> None:
        self.frames.add(stamp_s, frame)

    def add_depth(self, stamp_s: float, depth: DepthFrame) -> None:
        """A depth frame (ignored unless activated with use_depth); stamps on the colour frames' clock."""
        depth_frames = self.depth_frames
        if depth_frames is not None:
            depth_frames.add(stamp_s, depth)

    # ------------------------------------------------------------------------------------
    # Audio thread

    def on_audio(self, chunk: np.ndarray, end_time_s: float) -> None:
        """A chunk of float32 16 kHz mono audio whose last sample was recorded at end_time_s
        (wall clock, time.time())."""
        self.on_stamped_audio(chunk, self.callbacks.now_s() - max(0.0, time.time() - end_time_s))

    def on_stamped_audio(self, chunk: np.ndarray, chunk_end_s: float) -> None:
        """A chunk of float32 16 kHz mono audio that ended at chunk_end_s on the frames' clock
        (e.g. from the header stamps of audio messages)."""
        if not self.listening:
            self.counters.add("audio_chunks_muted")
            return
        chunk, problems = sanitize_chunk(chunk)
        for problem in problems:
            self.counters.add("audio_problems")
            self.callbacks.report_problem(problem, problem.split(":")[0])
        with self.audio_lock:
            if self.segmenter is None:
                return
            vad = self.settings.vad
            if vad != self.segmenter.config and not self.segmenter.in_speech:
                self.segmenter = SpeechSegmenter(vad)
                self.segmenter_generation += 1
                self.fed_samples = 0
            segmenter = self.segmenter
            dropped_before = segmenter.dropped_short
            utterances = segmenter.feed(chunk)
            self.counters.add("utterances_dropped_short", segmenter.dropped_short - dropped_before)
            self.fed_samples += len(chunk)
            to_clock = chunk_end_s - self.fed_samples / SAMPLE_RATE  # clock time of stream time 0
            provisional = segmenter.provisional()
            was_in_utterance = self.speech.in_utterance
            voice_was_active = self.speech.voice_active
            voice_stopped_s = self.speech.voice_stopped_s
            if segmenter.in_speech:
                voice_stopped_s = to_clock + segmenter.frame_time(segmenter.last_voiced_frame + 1)
            self.speech = SpeechState(
                voice_active=segmenter.voice_active,
                in_utterance=segmenter.in_speech,
                voice_stopped_s=voice_stopped_s,
                provisional_job=None if provisional is None else self.job_for(provisional, to_clock, chunk_end_s, 0),
            )
            jobs = []
            for utterance in utterances:
                self.utterance_count += 1
                jobs.append(self.job_for(utterance, to_clock, chunk_end_s, self.utterance_count))
            speech_start_s = segmenter.speech_start_s
            started_s = None if speech_start_s is None or (was_in_utterance and not jobs) else to_clock + speech_start_s
            voice_changed = self.speech.voice_active != voice_was_active
        if voice_changed:
            self.callbacks.voice_activity(self.speech.voice_active)
        for job in jobs:
            self.callbacks.speech_event(False, job.end_s)
            self.enqueue(job)
        if started_s is not None:
            self.callbacks.speech_event(True, started_s)

    def job_for(self, utterance: Utterance, to_clock: float, detected_s: float, number: int) -> UtteranceJob:
        return UtteranceJob(
            key=(self.segmenter_generation, utterance.start_s, utterance.end_s),
            number=number,
            start_s=to_clock + utterance.start_s,
            end_s=to_clock + utterance.end_s,
            detected_s=detected_s,
            samples=utterance.samples,
            cut=utterance.cut,
        )

    def enqueue(self, job: UtteranceJob) -> None:
        self.counters.add("utterances")
        while self.jobs.qsize() >= self.settings.max_pending_utterances:
            try:
                dropped = self.jobs.get_nowait()
            except queue.Empty:
                break
            self.counters.add("utterances_dropped_queue_full")
            self.callbacks.report_problem(
                f"inference is behind: dropped utterance {dropped.number} (the newest is kept)", "queue full"
            )
        self.jobs.put(job)
        self.callbacks.log(
            f"utterance {job.number}: {job.end_s - job.start_s:.2f} s of speech{' (cut at vad_max_utterance_s)' if job.cut else ''}"
        )

    # ------------------------------------------------------------------------------------
    # Inference thread

    def run(self) -> None:
        while not self.stop_requested.is_set():
            if self.reset_requested.is_set():
                self.reset_requested.clear()
                self.precomputed.clear()
                self.speech_ahead.clear()
            try:
                job = self.jobs.get(timeout=0.02)
            except queue.Empty:
                if self.active:
                    self.run_safely(self.work_ahead)
                continue
            self.run_safely(self.ground_utterance, job)

    def run_safely(self, function: Callable[..., None], *args: Any) -> None:
        try:
            function(*args)
        except Exception as error:  # inference must survive any single bad input
            self.counters.add("inference_errors")
            self.callbacks.report_problem(f"inference failed: {type(error).__name__}: {error}", None)

    def work_ahead(self) -> None:
        """While someone speaks, encode the newest frame; when the voice stops, encode the frame
        of that moment and then the speech the hangover will most likely confirm."""
        speech = self.speech
        if speech.voice_active:
            self.precompute_newest_frame()
        elif speech.in_utterance:
            if not any(stamp_s >= speech.voice_stopped_s for stamp_s in self.precomputed):
                self.precompute_newest_frame()
            job = speech.provisional_job
            if job is not None and job.key not in self.speech_ahead:
                self.speech_ahead[job.key] = self.grounder.encode_speech(job.samples, SAMPLE_RATE)
                while len(self.speech_ahead) > PRECOMPUTED_FEATURES_KEPT:
                    self.speech_ahead.popitem(last=False)
                self.counters.add("speech_encoded_ahead")

    def precompute_newest_frame(self) -> None:
        newest = self.frames.latest()
        if newest is None or newest.stamp_s in self.precomputed:
            return
        self.precomputed[newest.stamp_s] = (newest, self.grounder.encode_image(newest.frame.rgb))
        while len(self.precomputed) > PRECOMPUTED_FEATURES_KEPT:
            self.precomputed.popitem(last=False)
        self.counters.add("precomputed_images")

    def frame_for(self, job: UtteranceJob, settings: PipelineSettings) -> StampedFrame | None:
        mode, max_age_s = settings.frame_selection, settings.max_frame_age_s
        now_s = self.callbacks.now_s()
        frame = self.frames.pick(mode, job.start_s, job.end_s, now_s, max_age_s)
        if frame is not None:
            return frame
        # No frame yet (speech ended before the camera's first frame): wait for the next one.
        target_s = {"end": job.end_s, "start": job.start_s}.get(mode, now_s)
        return self.frames.wait_for_frame_after(target_s, max_age_s, timeout_s=max(0.0, target_s + max_age_s - now_s))

    def ground_utterance(self, job: UtteranceJob) -> None:
        settings = self.settings
        frame = self.frame_for(job, settings)
        if frame is None:
            self.counters.add("utterances_without_frame")
            why = (f"utterance {job.number} dropped: no camera frame within max_frame_age_s="
                   f"{settings.max_frame_age_s} s of its {settings.frame_selection}")
            self.callbacks.report_problem(why, "no frame")
            self.callbacks.unanswered(job, "no_frame", why)
            return
        tolerance_s = settings.precomputed_frame_tolerance_s
        ready = [entry for stamp_s, entry in self.precomputed.items() if abs(stamp_s - frame.stamp_s) <= tolerance_s]
        if ready:
            frame, image_features = min(ready, key=lambda entry: abs(entry[0].stamp_s - frame.stamp_s))
            self.counters.add("precomputed_used")
        else:
            image_features = self.grounder.encode_image(frame.frame.rgb)
        speech_features = self.speech_ahead.pop(job.key, None)
        if speech_features is None:
            speech_features = self.grounder.encode_speech(job.samples, SAMPLE_RATE)
        else:
            self.counters.add("speech_ahead_used")
        result = self.grounder.ground_features(image_features, speech_features, top_k=settings.top_k)
        self.deliver(job, frame, result, settings)

    def deliver(self, job: UtteranceJob, stamped: StampedFrame, result: GroundingResult, settings: PipelineSettings) -> None:
        if not self.active:
            return  # deactivated while this utterance was being grounded
        frame = stamped.frame
        height, width = frame.rgb.shape[:2]
        passing = [row for row in result.candidates if row[4] >= settings.score_threshold]  # (5,) each, best first
        depth = self.depth_for(job, stamped.stamp_s, settings) if passing and self.depth_frames is not None else None
        mask = result.mask if passing else None  # the best cell's, so it goes with detections[0]
        detections = []
        for rank, row in enumerate(passing):
            x1, y1, x2, y2 = (float(v) for v in np.clip(row[:4], 0, [width, height, width, height]))
            target = None
            if depth is not None:
                box = (x1, y1, x2, y2)
                target = None
                if rank == 0 and mask is not None:
                    target = locate_box(depth.image, box, (width, height), settings.depth_limits, mask=mask)
                if target is None:  # no mask, or too few valid depths under it: the box's central part
                    target = locate_box(depth.image, box, (width, height), settings.depth_limits)
                self.counters.add("targets_located" if target is not None else "targets_without_depth")
            detections.append(Detection((x1, y1, x2, y2), float(row[4]), target))
        self.callbacks.publish(Outcome(job, frame, tuple(detections), depth, mask))
        if not detections:
            self.counters.add("utterances_below_threshold")
            self.callbacks.log(
                f"utterance {job.number}: best box scores {result.score:.2f} < score_threshold "
                f"{settings.score_threshold}; no detection published"
            )
            return
        x1, y1, x2, y2 = detections[0].box
        now_s = self.callbacks.now_s()
        self.counters.add("detections")
        with self.latency_lock:
            self.latencies_s.append(now_s - job.end_s)
            self.processing_s.append(now_s - job.detected_s)
        self.callbacks.log(
            f"utterance {job.number}: box x1={x1:.0f} y1={y1:.0f} x2={x2:.0f} y2={y2:.0f} score {result.score:.2f}, "
            f"published {now_s - job.end_s:.2f} s after the end of speech"
        )

    def depth_for(self, job: UtteranceJob, stamp_s: float, settings: PipelineSettings) -> DepthFrame | None:
        """The depth frame stamped nearest the colour frame used, if within depth_sync_tolerance_s."""
        stamped = self.depth_frames.nearest(stamp_s, settings.depth_sync_tolerance_s)
        if stamped is None:
            self.counters.add("depth_frames_missing")
            self.callbacks.report_problem(
                f"utterance {job.number}: no depth frame within depth_sync_tolerance_s={settings.depth_sync_tolerance_s} s "
                "of its colour frame; published without 3D (is the aligned depth topic publishing?)",
                "no depth frame",
            )
            return None
        return stamped.frame
