"""The grounding node: speech from a microphone (or a WAV file) + camera frames -> the box meant.

    python -m csref_ros.grounding_node --ros-args -p model_checkpoint:=<checkpoint> \\
        -p audio_source:=file -p audio_file:=<wav> -p image_topic:=/camera/image_raw

A managed (lifecycle) node; with autostart (default) it configures and activates itself.
- configure: loads the model (a failure leaves the node unconfigured, the reason logged and in
  /diagnostics), creates the publishers;
- activate: subscribes to the camera and starts audio capture (a WAV file starts playing when the
  first image arrives).

Threads: the executor runs the image callback, timers and services; the audio source runs the
VAD on its own thread; one inference thread grounds utterances from a bounded queue and, while
someone speaks, works ahead: it encodes the newest frame, and once the voice stops, the frame of
that moment and the speech the VAD hangover will most likely confirm, so that only fusion and
head remain when it does. Callbacks never wait for inference; everything dropped is counted in
/diagnostics.

Output: vision_msgs/Detection2D on csref/target_box with the header of the image used, the box
in that image's pixels, results[0].hypothesis.score the confidence and id the utterance number.
"""

import math
import queue
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.event_handler import QoSMessageLostInfo, QoSRequestedIncompatibleQoSInfo, SubscriptionEventCallbacks
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter as RosParameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header
from vision_msgs.msg import Detection2D, ObjectHypothesisWithPose

from csref_model import Grounder, GroundingResult
from csref_ros.audio import SAMPLE_RATE, MicrophoneSource, WavFileSource, sanitize_chunk
from csref_ros.frame_buffer import FrameBuffer, StampedFrame
from csref_ros.image_conversion import ImageConversionError, compressed_image_to_rgb, fill_image, image_to_rgb
from csref_ros.parameters import PARAMETERS, PARAMETERS_BY_NAME, check_value, vad_config_from
from csref_ros.vad import SpeechSegmenter, VadConfig

NODE_NAME = "grounding_node"
# Image stamps further than this from the node's clock are not trusted for pairing with speech
# (another machine's clock, a replayed log): the arrival time is used instead.
STAMP_TRUST_S = 5.0
PRECOMPUTED_FEATURES_KEPT = 8
LATENCIES_KEPT = 1000


@dataclass
class CameraFrame:
    header: Header
    rgb: np.ndarray  # (H, W, 3) uint8 RGB, often a view of the message buffer


@dataclass
class UtteranceJob:
    key: tuple[int, float, float]  # (segmenter generation, start, end in stream seconds): the same for
    # the provisional utterance seen during the hangover and the final one
    number: int
    start_s: float  # node-clock seconds of the first voiced frame
    end_s: float  # node-clock seconds of the end of speech
    detected_s: float  # when the VAD closed the utterance (end_s + hangover)
    samples: np.ndarray = field(repr=False)  # (N,) float32 16 kHz
    cut: bool


@dataclass
class Counters:
    images: int = 0
    images_rejected: int = 0
    images_lost: int = 0  # reported lost by the middleware (message_lost events)
    image_warnings: int = 0  # no images: missing publisher, QoS mismatch (see last_problem)
    image_qos_incompatible: int = 0  # incompatible-QoS events from the middleware (also image warnings)
    utterances: int = 0
    utterances_dropped_queue_full: int = 0
    utterances_without_frame: int = 0
    utterances_below_threshold: int = 0
    detections: int = 0
    precomputed_images: int = 0
    precomputed_used: int = 0
    speech_encoded_ahead: int = 0
    speech_ahead_used: int = 0
    audio_errors: int = 0
    audio_problems: int = 0
    inference_errors: int = 0


def descriptor_for(name: str) -> ParameterDescriptor:
    spec = PARAMETERS_BY_NAME[name]
    description = spec.description
    if spec.choices:
        description += f" (one of: {', '.join(map(str, spec.choices))})"
    if not spec.runtime:
        description += " [applies at the next configure/activate]"
    descriptor = ParameterDescriptor(name=name, description=description)
    if spec.range is not None:
        low, high, step = spec.range
        if isinstance(spec.default, int) and not isinstance(spec.default, bool):
            descriptor.integer_range = [IntegerRange(from_value=int(low), to_value=int(high), step=int(step))]
        else:
            descriptor.floating_point_range = [FloatingPointRange(from_value=float(low), to_value=float(high), step=float(step))]
    if isinstance(spec.default, float):
        descriptor.dynamic_typing = True  # accept -p max_frame_age_s:=5 (an integer) too; checked in check_value
    return descriptor


def qos_text(qos: QoSProfile) -> str:
    reliability = "reliable" if qos.reliability == ReliabilityPolicy.RELIABLE else "best_effort"
    durability = "transient_local" if qos.durability == DurabilityPolicy.TRANSIENT_LOCAL else "volatile"
    return f"reliability={reliability}, durability={durability}"


def time_to_s(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def percentile_ms(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1000:.0f}" if values else "n/a"


class GroundingNode(LifecycleNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.counters = Counters()
        self.problems_logged: set[str] = set()
        self.last_problem = ""
        self.configure_error = ""
        self.add_on_set_parameters_callback(self.on_parameters)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, descriptor_for(spec.name))

        self.grounder: Grounder | None = None
        self.model_description = ""
        self.active = False
        self.detection_publisher = None
        self.debug_image_publisher = None
        self.image_subscription = None
        self.image_watchdog = None
        self.image_qos = QoSProfile(depth=5)
        self.last_image_time = time.monotonic()
        self.image_group = MutuallyExclusiveCallbackGroup()
        self.frames = FrameBuffer(capacity=2)
        self.audio_source: MicrophoneSource | WavFileSource | None = None
        self.audio_lock = threading.Lock()
        self.segmenter: SpeechSegmenter | None = None
        self.pending_vad_config: VadConfig | None = None
        self.fed_samples = 0
        self.segmenter_generation = 0
        self.voice_active = False  # someone is speaking now
        self.in_utterance = False  # speaking, or in a pause / the hangover after speech
        self.voice_stopped_s = 0.0  # node-clock end of the last voiced frame
        self.provisional_job: UtteranceJob | None = None  # what the hangover will produce
        self.speech_ahead: OrderedDict[tuple[int, float, float], Any] = OrderedDict()
        self.utterance_count = 0
        self.jobs: queue.Queue[UtteranceJob] = queue.Queue()
        self.worker: threading.Thread | None = None
        self.worker_stop = threading.Event()
        self.precomputed: OrderedDict[float, tuple[StampedFrame, Any]] = OrderedDict()
        self.latencies_s: deque[float] = deque(maxlen=LATENCIES_KEPT)  # end of speech -> publish
        self.processing_s: deque[float] = deque(maxlen=LATENCIES_KEPT)  # utterance closed -> publish
        self.images_at_last_diagnostics = 0
        self.last_diagnostics_time = time.monotonic()
        self.stats_lock = threading.Lock()

        self.diagnostics_publisher = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.diagnostics_timer = self.create_timer(self.param("diagnostics_period_s"), self.publish_diagnostics)

    # ------------------------------------------------------------------------------------
    # Parameters

    def param(self, name: str) -> Any:
        value = self.get_parameter(name).value
        return float(value) if isinstance(PARAMETERS_BY_NAME[name].default, float) else value

    def current_vad_config(self) -> VadConfig:
        return vad_config_from({spec.name: self.param(spec.name) for spec in PARAMETERS if spec.name.startswith("vad_")})

    def on_parameters(self, parameters: list[RosParameter]) -> SetParametersResult:
        for parameter in parameters:
            reason = check_value(parameter.name, parameter.value)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
        changed_vad = {p.name: p.value for p in parameters if p.name.startswith("vad_")}
        if changed_vad:
            values = {
                spec.name: (self.param(spec.name) if self.has_parameter(spec.name) else spec.default)
                for spec in PARAMETERS
                if spec.name.startswith("vad_")
            }
            try:
                vad_config = vad_config_from({**values, **changed_vad})
            except ValueError as error:
                return SetParametersResult(successful=False, reason=str(error))
            self.pending_vad_config = vad_config  # swapped in by the audio thread between utterances
        for parameter in parameters:
            spec = PARAMETERS_BY_NAME.get(parameter.name)
            if spec is not None and not spec.runtime and self.has_parameter(parameter.name):
                self.get_logger().info(f"{parameter.name} changed; it applies at the next configure/activate")
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------------------------
    # Lifecycle

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.grounder = self.load_grounder()
            if self.param("audio_source") == "file":
                # Fail now (not at activation) if the demo file is missing or unreadable.
                self.audio_source = WavFileSource(self.param("audio_file"), self.on_audio, loop=self.param("audio_loop"))
        except Exception as error:  # any failure to load must leave the node unconfigured, with the reason
            self.configure_error = f"not configured: {error}"
            self.grounder = None
            self.audio_source = None
            self.get_logger().error(self.configure_error)
            return TransitionCallbackReturn.FAILURE
        self.configure_error = ""
        self.detection_publisher = self.create_publisher(Detection2D, "csref/target_box", 10)
        self.debug_image_publisher = self.create_publisher(Image, "csref/debug_image", 2)
        self.worker_stop.clear()
        self.worker = threading.Thread(target=self.inference_loop, name="inference", daemon=True)
        self.worker.start()
        self.get_logger().info(f"configured: {self.model_description}")
        return TransitionCallbackReturn.SUCCESS

    def load_grounder(self) -> Grounder:
        checkpoint = self.param("model_checkpoint")
        if not checkpoint:
            raise ValueError("model_checkpoint is empty; set it to a checkpoint directory or official .pth file")
        if not Path(checkpoint).exists():
            raise FileNotFoundError(f"model_checkpoint {checkpoint} does not exist")
        threads = self.param("num_threads") or None
        if threads:
            torch.set_num_threads(threads)
        started = time.monotonic()
        grounder = Grounder.from_checkpoint(
            checkpoint,
            config=self.param("model_config") or None,
            device=self.param("device"),
            backend=self.param("backend"),
            precision=self.param("precision"),
            onnx_dir=self.param("onnx_dir") or None,
            threads=threads,
        )
        # Warm-up: the first call of a model is several times slower than the next ones.
        warmup_audio = np.random.default_rng(0).uniform(-0.3, 0.3, SAMPLE_RATE // 2).astype(np.float32)
        grounder.ground(np.full((64, 64, 3), 127, dtype=np.uint8), warmup_audio)
        self.model_description = (
            f"{checkpoint} (backend {type(grounder.backend).__name__}, device {self.param('device')}, "
            f"image size {grounder.config.image_size}, loaded in {time.monotonic() - started:.1f} s)"
        )
        return grounder

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        history_s, rate_hz = self.param("frame_history_s"), self.param("frame_history_rate_hz")
        self.frames = FrameBuffer(capacity=max(2, math.ceil(history_s * rate_hz) + 1), min_interval_s=1.0 / rate_hz)
        self.precomputed.clear()
        with self.audio_lock:
            self.segmenter = SpeechSegmenter(self.current_vad_config())
            self.segmenter_generation += 1
            self.pending_vad_config = None
            self.fed_samples = 0
            self.voice_active = self.in_utterance = False
            self.provisional_job = None
        self.subscribe_images()
        self.active = True
        if self.param("audio_source") == "microphone":
            self.audio_source = MicrophoneSource(
                self.on_audio,
                self.on_audio_error,
                device=self.microphone_device(),
                sample_rate=self.param("audio_sample_rate"),
                channels=self.param("audio_channels"),
            )
            self.audio_source.start()
        elif self.audio_source is None:  # reactivated after a deactivate: replay the file
            self.audio_source = WavFileSource(self.param("audio_file"), self.on_audio, loop=self.param("audio_loop"))
        self.get_logger().info(
            f"active: images from {self.image_topic()} ({self.param('image_transport')}), "
            f"speech from {self.param('audio_source')}"
        )
        return super().on_activate(state)

    def microphone_device(self) -> int | str | None:
        device = self.param("audio_device")
        return int(device) if device.isdigit() else (device or None)

    def image_topic(self) -> str:
        topic = self.param("image_topic")
        return f"{topic}/compressed" if self.param("image_transport") == "compressed" else topic

    def subscribe_images(self) -> None:
        reliability = self.param("image_qos_reliability")
        self.image_qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=self.param("image_qos_depth"),
            reliability=ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort" else ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.VOLATILE,
        )
        self.create_image_subscription()
        self.last_image_time = time.monotonic()
        self.image_watchdog = self.create_timer(self.param("image_timeout_s"), self.check_images_arrive)

    def create_image_subscription(self) -> None:
        if self.image_subscription is not None:
            self.destroy_subscription(self.image_subscription)
        message_type = CompressedImage if self.param("image_transport") == "compressed" else Image
        self.image_subscription = self.create_subscription(
            message_type,
            self.image_topic(),
            self.on_image,
            self.image_qos,
            callback_group=self.image_group,
            event_callbacks=SubscriptionEventCallbacks(
                incompatible_qos=self.on_incompatible_qos, message_lost=self.on_message_lost
            ),
        )

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_capture()
        return super().on_deactivate(state)

    def stop_capture(self) -> None:
        self.active = False
        if self.audio_source is not None:
            self.audio_source.stop()
            self.audio_source = None
        if self.image_watchdog is not None:
            self.destroy_timer(self.image_watchdog)
            self.image_watchdog = None
        if self.image_subscription is not None:
            self.destroy_subscription(self.image_subscription)
            self.image_subscription = None
        self.frames.clear()
        with self.audio_lock:
            self.segmenter = None
            self.voice_active = self.in_utterance = False
            self.provisional_job = None
        while not self.jobs.empty():
            self.jobs.get_nowait()

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release_model()
        return TransitionCallbackReturn.SUCCESS

    def release_model(self) -> None:
        self.worker_stop.set()
        if self.worker is not None:
            self.worker.join(timeout=30.0)
            self.worker = None
        for publisher in (self.detection_publisher, self.debug_image_publisher):
            if publisher is not None:
                self.destroy_publisher(publisher)
        self.detection_publisher = self.debug_image_publisher = None
        self.grounder = None
        self.audio_source = None

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.close()
        return TransitionCallbackReturn.SUCCESS

    def close(self) -> None:
        """Stop capture and inference (any state)."""
        self.stop_capture()
        self.release_model()

    # ------------------------------------------------------------------------------------
    # Camera

    def on_image(self, msg: Image | CompressedImage) -> None:
        if not self.active:
            return
        received_s = self.now_s()
        self.last_image_time = time.monotonic()
        with self.stats_lock:
            self.counters.images += 1
        try:
            if isinstance(msg, CompressedImage):
                rgb = compressed_image_to_rgb(msg, self.param("max_image_pixels"))
            else:
                rgb = image_to_rgb(msg, self.param("max_image_pixels"))
        except ImageConversionError as error:
            with self.stats_lock:
                self.counters.images_rejected += 1
            self.report_problem(f"image rejected on {self.image_topic()}: {error}")
            return
        stamp_s = time_to_s(msg.header.stamp)
        if abs(received_s - stamp_s) > STAMP_TRUST_S:
            self.report_problem(
                f"image stamps are {received_s - stamp_s:.1f} s off this node's clock (stamp {stamp_s:.3f}); "
                "pairing speech with frames by arrival time instead",
                kind="image stamps off",
            )
            stamp_s = received_s
        self.frames.add(stamp_s, CameraFrame(msg.header, rgb))
        source = self.audio_source
        if isinstance(source, WavFileSource) and source.thread is None:
            self.get_logger().info(f"images arriving: playing {source.path} ({source.duration_s:.1f} s per pass)")
            source.start()

    def check_images_arrive(self) -> None:
        """Every image_timeout_s: if images stopped (or never came), find out why and say so.

        QoS is the usual reason: a reliable subscription gets nothing from a best-effort camera,
        and large images sent best-effort over UDP (a reliable publisher talking to our
        best-effort subscription, without the shared-memory profile) are lost in fragments.
        With image_qos_adapt the subscription is remade with the publishers' QoS.
        """
        timeout_s = self.param("image_timeout_s")
        if not self.active or time.monotonic() - self.last_image_time < timeout_s:
            return
        topic = self.image_topic()
        publishers = self.get_publishers_info_by_topic(topic)
        with self.stats_lock:
            self.counters.image_warnings += 1
        if not publishers:
            image_topics = [name for name, types in self.get_topic_names_and_types() if any("Image" in t for t in types)]
            self.report_problem(
                f"no image on {topic} for {timeout_s} s: nobody publishes it "
                f"(image topics now: {', '.join(image_topics) or 'none'}); set image_topic or remap"
            )
            return
        described = "; ".join(
            f"{info.node_namespace.rstrip('/')}/{info.node_name}: {qos_text(info.qos_profile)}" for info in publishers
        )
        matching = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=self.image_qos.depth,
            reliability=ReliabilityPolicy.RELIABLE
            if all(info.qos_profile.reliability == ReliabilityPolicy.RELIABLE for info in publishers)
            else ReliabilityPolicy.BEST_EFFORT,
            durability=DurabilityPolicy.TRANSIENT_LOCAL
            if all(info.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for info in publishers)
            else DurabilityPolicy.VOLATILE,
        )
        if self.param("image_qos_adapt") and qos_text(matching) != qos_text(self.image_qos):
            self.report_problem(
                f"no image on {topic} for {timeout_s} s with subscription QoS {qos_text(self.image_qos)}; "
                f"publishers: {described}. Resubscribing with {qos_text(matching)} (image_qos_adapt)"
            )
            self.image_qos = matching
            self.create_image_subscription()
            self.last_image_time = time.monotonic()
            return
        if self.image_qos.reliability == ReliabilityPolicy.RELIABLE and matching.reliability != ReliabilityPolicy.RELIABLE:
            advice = "QoS MISMATCH: a reliable subscription receives nothing from best-effort publishers; " \
                "set image_qos_reliability:=best_effort or image_qos_adapt:=true"
        else:
            advice = "if the images are large and sent best-effort, start the camera with FASTDDS_DEFAULT_PROFILES_FILE=" \
                "config/fastdds_loopback.xml (shared memory): fragmented best-effort UDP loses them"
        self.report_problem(
            f"no image on {topic} for {timeout_s} s although {len(publishers)} publisher(s) exist; "
            f"subscription QoS {qos_text(self.image_qos)}; publishers: {described}. {advice}"
        )

    def on_incompatible_qos(self, info: QoSRequestedIncompatibleQoSInfo) -> None:
        with self.stats_lock:
            self.counters.image_warnings += 1
            self.counters.image_qos_incompatible += 1
        self.report_problem(
            f"a publisher on {self.image_topic()} has QoS incompatible with this node's subscription "
            f"(policy {info.last_policy_kind.name.removeprefix('RMW_QOS_POLICY_')}); adjust image_qos_reliability (now {self.param('image_qos_reliability')})"
        )

    def on_message_lost(self, info: QoSMessageLostInfo) -> None:
        with self.stats_lock:
            self.counters.images_lost += info.total_count_change

    # ------------------------------------------------------------------------------------
    # Audio (runs on the audio source's thread)

    def on_audio(self, chunk: np.ndarray, end_time_s: float) -> None:
        # The chunk ended end_time_s (wall clock); express it on the node's clock.
        chunk_end_s = self.now_s() - max(0.0, time.time() - end_time_s)
        chunk, problems = sanitize_chunk(chunk)
        for problem in problems:
            with self.stats_lock:
                self.counters.audio_problems += 1
            self.report_problem(problem, kind=problem.split(":")[0])
        with self.audio_lock:
            if self.segmenter is None:
                return
            segmenter = self.segmenter
            if self.pending_vad_config is not None and not segmenter.in_speech:
                segmenter = self.segmenter = SpeechSegmenter(self.pending_vad_config)
                self.segmenter_generation += 1
                self.pending_vad_config = None
                self.fed_samples = 0
            utterances = segmenter.feed(chunk)
            self.fed_samples += len(chunk)
            stream_end_s = self.fed_samples / SAMPLE_RATE
            self.voice_active, self.in_utterance = segmenter.voice_active, segmenter.in_speech
            provisional = segmenter.provisional()
            if segmenter.in_speech:
                voice_stopped = segmenter.frame_time(segmenter.last_voiced_frame + 1)
                self.voice_stopped_s = chunk_end_s - (stream_end_s - voice_stopped)
        to_node_clock = chunk_end_s - stream_end_s  # node-clock time of stream time 0
        self.provisional_job = None if provisional is None else self.job_for(provisional, to_node_clock, chunk_end_s, 0)
        for utterance in utterances:
            self.utterance_count += 1
            self.enqueue(self.job_for(utterance, to_node_clock, chunk_end_s, self.utterance_count))

    def job_for(self, utterance, to_node_clock: float, detected_s: float, number: int) -> UtteranceJob:
        return UtteranceJob(
            key=(self.segmenter_generation, utterance.start_s, utterance.end_s),
            number=number,
            start_s=to_node_clock + utterance.start_s,
            end_s=to_node_clock + utterance.end_s,
            detected_s=detected_s,
            samples=utterance.samples,
            cut=utterance.cut,
        )

    def enqueue(self, job: UtteranceJob) -> None:
        with self.stats_lock:
            self.counters.utterances += 1
            while self.jobs.qsize() >= self.param("max_pending_utterances"):
                try:
                    dropped = self.jobs.get_nowait()
                except queue.Empty:
                    break
                self.counters.utterances_dropped_queue_full += 1
                self.report_problem(
                    f"inference is behind: dropped utterance {dropped.number} (the newest is kept)", kind="queue full"
                )
            self.jobs.put(job)
        self.get_logger().info(
            f"utterance {job.number}: {job.end_s - job.start_s:.2f} s of speech{' (cut at vad_max_utterance_s)' if job.cut else ''}"
        )

    def on_audio_error(self, reason: str) -> None:
        with self.stats_lock:
            self.counters.audio_errors += 1
        self.report_problem(reason)

    # ------------------------------------------------------------------------------------
    # Inference (its own thread)

    def inference_loop(self) -> None:
        while not self.worker_stop.is_set():
            try:
                job = self.jobs.get(timeout=0.02)
            except queue.Empty:
                if self.active:
                    self.run_safely(self.work_ahead)
                continue
            self.run_safely(self.ground_utterance, job)

    def work_ahead(self) -> None:
        """While someone speaks, encode the newest frame; when the voice stops, encode the frame
        of that moment and then the speech the hangover will most likely confirm."""
        if self.voice_active:
            self.precompute_newest_frame()
        elif self.in_utterance:
            if not any(stamp_s >= self.voice_stopped_s for stamp_s in self.precomputed):
                self.precompute_newest_frame()
            job = self.provisional_job
            if job is not None and job.key not in self.speech_ahead and self.grounder is not None:
                self.speech_ahead[job.key] = self.grounder.encode_speech(job.samples, SAMPLE_RATE)
                while len(self.speech_ahead) > PRECOMPUTED_FEATURES_KEPT:
                    self.speech_ahead.popitem(last=False)
                with self.stats_lock:
                    self.counters.speech_encoded_ahead += 1

    def run_safely(self, function, *args) -> None:
        try:
            function(*args)
        except Exception as error:  # inference must survive any single bad input
            with self.stats_lock:
                self.counters.inference_errors += 1
            self.report_problem(f"inference failed: {type(error).__name__}: {error}")

    def precompute_newest_frame(self) -> None:
        newest = self.frames.latest()
        grounder = self.grounder
        if newest is None or grounder is None or newest.stamp_s in self.precomputed:
            return
        self.precomputed[newest.stamp_s] = (newest, grounder.encode_image(newest.frame.rgb))
        while len(self.precomputed) > PRECOMPUTED_FEATURES_KEPT:
            self.precomputed.popitem(last=False)
        with self.stats_lock:
            self.counters.precomputed_images += 1

    def frame_for(self, job: UtteranceJob) -> StampedFrame | None:
        mode, max_age_s = self.param("frame_selection"), self.param("max_frame_age_s")
        now_s = self.now_s()
        frame = self.frames.pick(mode, job.start_s, job.end_s, now_s, max_age_s)
        if frame is not None:
            return frame
        # No frame yet (speech ended before the camera's first frame): wait for the next one.
        target_s = {"end": job.end_s, "start": job.start_s}.get(mode, now_s)
        return self.frames.wait_for_frame_after(target_s, max_age_s, timeout_s=max(0.0, target_s + max_age_s - now_s))

    def ground_utterance(self, job: UtteranceJob) -> None:
        grounder = self.grounder
        if grounder is None:
            return
        frame = self.frame_for(job)
        if frame is None:
            with self.stats_lock:
                self.counters.utterances_without_frame += 1
            self.report_problem(
                f"utterance {job.number} dropped: no camera frame within max_frame_age_s="
                f"{self.param('max_frame_age_s')} s of its {self.param('frame_selection')}",
                kind="no frame",
            )
            return
        tolerance_s = self.param("precomputed_frame_tolerance_s")
        ready = [entry for stamp_s, entry in self.precomputed.items() if abs(stamp_s - frame.stamp_s) <= tolerance_s]
        if ready:
            frame, image_features = min(ready, key=lambda entry: abs(entry[0].stamp_s - frame.stamp_s))
            with self.stats_lock:
                self.counters.precomputed_used += 1
        else:
            image_features = grounder.encode_image(frame.frame.rgb)
        speech_features = self.speech_ahead.pop(job.key, None)
        if speech_features is None:
            speech_features = grounder.encode_speech(job.samples, SAMPLE_RATE)
        else:
            with self.stats_lock:
                self.counters.speech_ahead_used += 1
        result = grounder.ground_features(image_features, speech_features)
        self.publish_result(job, frame.frame, result)

    def publish_result(self, job: UtteranceJob, frame: CameraFrame, result: GroundingResult) -> None:
        if not self.active:
            return  # deactivated while this utterance was being grounded
        if result.score < self.param("score_threshold"):
            with self.stats_lock:
                self.counters.utterances_below_threshold += 1
            self.get_logger().info(
                f"utterance {job.number}: best box scores {result.score:.2f} < score_threshold "
                f"{self.param('score_threshold')}; nothing published"
            )
            return
        height, width = frame.rgb.shape[:2]
        x1, y1, x2, y2 = np.clip(result.box_xyxy, 0, [width, height, width, height]).astype(float)
        detection = Detection2D(header=frame.header, id=str(job.number))
        detection.bbox.center.position.x = (x1 + x2) / 2
        detection.bbox.center.position.y = (y1 + y2) / 2
        detection.bbox.size_x = x2 - x1
        detection.bbox.size_y = y2 - y1
        hypothesis = ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = "target"
        hypothesis.hypothesis.score = float(result.score)
        detection.results.append(hypothesis)
        publisher = self.detection_publisher
        if publisher is None:
            return
        publisher.publish(detection)
        now_s = self.now_s()
        with self.stats_lock:
            self.counters.detections += 1
            self.latencies_s.append(now_s - job.end_s)
            self.processing_s.append(now_s - job.detected_s)
        self.get_logger().info(
            f"utterance {job.number}: box x1={x1:.0f} y1={y1:.0f} x2={x2:.0f} y2={y2:.0f} score {result.score:.2f}, "
            f"published {now_s - job.end_s:.2f} s after the end of speech"
        )
        if self.param("publish_debug_image") and self.debug_image_publisher is not None:
            self.debug_image_publisher.publish(self.debug_image(frame, (x1, y1, x2, y2), result.score, job.number))

    @staticmethod
    def debug_image(frame: CameraFrame, box: tuple[float, float, float, float], score: float, number: int) -> Image:
        canvas = np.array(frame.rgb, dtype=np.uint8, copy=True, order="C")  # (H, W, 3)
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), 2)
        cv2.putText(canvas, f"#{number} {score:.2f}", (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 0), 1)
        msg = Image(header=frame.header)
        fill_image(msg, canvas, "rgb8")
        return msg

    # ------------------------------------------------------------------------------------
    # Diagnostics

    def report_problem(self, message: str, kind: str | None = None) -> None:
        """Log a problem once per kind (default: per message; repeats at debug level); it shows
        in /diagnostics as the last problem."""
        self.last_problem = message
        kind = kind or message
        if kind in self.problems_logged:
            self.get_logger().debug(message)
            return
        self.problems_logged.add(kind)
        self.get_logger().warning(message)

    def now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def publish_diagnostics(self) -> None:
        now = time.monotonic()
        with self.stats_lock:
            counters = Counters(**vars(self.counters))
            latencies, processing = list(self.latencies_s), list(self.processing_s)
        image_rate = (counters.images - self.images_at_last_diagnostics) / max(1e-3, now - self.last_diagnostics_time)
        self.images_at_last_diagnostics, self.last_diagnostics_time = counters.images, now

        if self.configure_error:
            level, message = DiagnosticStatus.ERROR, self.configure_error
        elif self.grounder is None:
            level, message = DiagnosticStatus.WARN, "unconfigured: waiting for the configure transition"
        elif not self.active:
            level, message = DiagnosticStatus.OK, "configured, inactive"
        elif image_rate == 0:
            level, message = DiagnosticStatus.WARN, f"active, no images on {self.image_topic()}"
        else:
            level, message = DiagnosticStatus.OK, f"active, {counters.detections} boxes published"
        values = {
            "state": "active" if self.active else ("configured" if self.grounder is not None else "unconfigured"),
            "model": self.model_description,
            "backend": type(self.grounder.backend).__name__ if self.grounder is not None else self.param("backend"),
            "image_topic": self.image_topic(),
            "image_rate_hz": f"{image_rate:.1f}",
            "audio_source": self.param("audio_source"),
            "speaking": str(self.voice_active),
            "latency_end_of_speech_to_publish_p50_ms": percentile_ms(latencies, 50),
            "latency_end_of_speech_to_publish_p95_ms": percentile_ms(latencies, 95),
            "processing_after_utterance_p50_ms": percentile_ms(processing, 50),
            "processing_after_utterance_p95_ms": percentile_ms(processing, 95),
            **{name: str(value) for name, value in vars(counters).items()},
            "last_problem": self.last_problem,
        }
        status = DiagnosticStatus(
            level=level,
            name=f"{self.get_name()}: speech grounding",
            message=message,
            hardware_id="csref_ros",
            values=[KeyValue(key=key, value=value) for key, value in values.items()],
        )
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.diagnostics_publisher.publish(array)


def main(args: list[str] | None = None) -> None:
    rclpy.init(args=args)
    try:
        node = GroundingNode()
    except (InvalidParameterValueException, InvalidParameterTypeException) as error:
        print(f"grounding_node: bad parameter: {error}", file=sys.stderr)
        rclpy.try_shutdown()
        sys.exit(2)
    executor = MultiThreadedExecutor(num_threads=3)
    executor.add_node(node)
    if node.param("autostart") and node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
        node.trigger_activate()
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.close()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
