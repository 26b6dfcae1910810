"""The grounding node: speech from a microphone, a WAV file or a topic + camera frames -> the box meant.

    python -m csref_ros.grounding_node --ros-args -p model_checkpoint:=<checkpoint> \\
        -p audio_source:=file -p audio_file:=<wav> -p image_topic:=/camera/image_raw

A managed (lifecycle) node; with autostart (default) it configures and activates itself.
- configure: loads the model (a failure leaves the node unconfigured, the reason logged and in
  /diagnostics), creates the publishers, starts the pipeline's inference thread;
- activate: subscribes to the camera and starts audio capture (a WAV file starts playing when the
  first image arrives; audio_source=topic subscribes to audio_common_msgs/AudioStamped).

Requests: the csref/ground action (a goal with its own speech, or one that waits for the next
utterance; matched in csref_ros.ground_requests) and the std_srvs/SetBool service csref/enable
(mute: audio is dropped while disabled). Each grounded utterance goes out on csref/utterance.

This module is the rclpy glue. The work is in csref_ros.pipeline (VAD, pairing, work ahead,
the inference thread; its docstring says which thread owns what), the watchdog on image
arrival in csref_ros.image_watchdog and the status in csref_ros.diagnostics. One
SingleThreadedExecutor runs every callback (images, depth, audio messages, timers, services, goals,
which wait with `await` without holding it); each is short, the heavy work is on the pipeline's
threads. rclpy's MultiThreadedExecutor is not used: in the rclpy releases we install it re-queues
tasks that wait in its pool and spins hot (ros2/rclpy#1452, fixed by ros2/rclpy#1547), which under
a 30 Hz camera + depth + audio replay made the node drop two thirds of its messages and answer
12 s late (scripts/replay_load_test.py). Parameters are read as one snapshot (`values`), replaced
whole when a parameter changes.

Output (docs/ROS.md has the details): for every utterance grounded, vision_msgs/Detection2DArray
on csref/detections (up to top_k candidates, best first; empty when none passes score_threshold),
each Detection2D with the header of the image used, the box in its pixels, results[0] the
hypothesis with class_id "utterance/<number>" and the confidence as score, id empty; the best one
also as Detection2D on csref/target_box. With use_depth: Detection3DArray on csref/target_3d and
the best box's centre as PointStamped on csref/target_point, in the depth image's optical frame
(or target_frame through tf2). std_msgs/Bool on csref/voice_activity when the voice starts/stops.
"""

import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import rclpy
import torch
from audio_common_msgs.msg import AudioStamped
from csref_interfaces.action import Ground
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.duration import Duration
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter as RosParameter
from geometry_msgs.msg import PointStamped
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rclpy.task import Future
from rclpy.time import Time as RclpyTime
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Bool, Header, String
from std_srvs.srv import SetBool
from vision_msgs.msg import Detection2D, Detection2DArray, Detection3DArray

from csref_model import Grounder
from csref_model.audio import SAMPLE_RATE, resample
from csref_model.davenet import SpeechImageRetriever, best_view
from csref_model.im2sp import Answerer
from csref_ros.audio import AUDIO_SOURCE_COUNTERS, AudioSourceError, MicrophoneSource, WavFileSource, play_sound
from csref_ros.audio_messages import AudioMessageError, AudioStream, audio_to_mono, has_samples
from csref_ros.counters import Counters
from csref_ros.depth import DepthError, DepthImage, Intrinsics, RigidTransform
from csref_ros.diagnostics import ImageRate, grounding_status
from csref_ros.ground_requests import GoalOutcome, GroundRequests, Request
from csref_ros.image_conversion import (
    ImageConversionError,
    compressed_image_to_rgb,
    depth_image_array,
    image_to_rgb,
)
from csref_ros.image_watchdog import WATCHDOG_COUNTERS, ImageWatchdog, subscription_qos
from csref_ros.messages import (
    audio_stamped,
    debug_image,
    detection_array,
    detections_3d,
    mask_image,
    s_to_time,
    target_point,
    time_to_s,
    utterance_audio,
)
from csref_ros.parameters import PARAMETERS, PARAMETERS_BY_NAME, check_value
from csref_ros.pipeline import (
    CameraFrame,
    DepthFrame,
    Outcome,
    Pipeline,
    PipelineCallbacks,
    PipelineSettings,
    UtteranceJob,
)
from csref_ros.qos_events import SubscriptionEventCallbacks

NODE_NAME = "grounding_node"
# Image stamps further than this from the node's clock are not trusted for pairing with speech
# (another machine's clock, a replayed log): the arrival time is used instead.
STAMP_TRUST_S = 5.0
GOAL_CHECK_PERIOD_S = 0.1  # how often goal timeouts and cancel requests are looked at
GOAL_STATUS = {"ok": Ground.Result.OK, "no_match": Ground.Result.NO_MATCH, "no_frame": Ground.Result.NO_FRAME,
               "timeout": Ground.Result.TIMEOUT}
NODE_COUNTERS = (
    "images",  # camera messages received while active
    "images_rejected",  # not convertible to RGB (encoding, size, truncated data)
    *WATCHDOG_COUNTERS,
    "audio_errors",  # the microphone missing, stalled or vanished (reopened)
    "depth_images",  # use_depth: depth messages received while active
    "depth_rejected",  # use_depth: not usable (encoding, size, camera_info that does not fit)
    "depth_without_camera_info",  # use_depth: depth images dropped because no camera_info had arrived
    "transform_failures",  # target_frame: no transform to it at the stamp (3D output skipped)
    "answers",  # answer_directory: spoken answers published on csref/answer_audio
    "answers_failed",  # answer_directory: the answer model said nothing for a box (logged)
)
# How long the inference thread waits for a tf2 transform before counting a failure.
TRANSFORM_TIMEOUT_S = 0.1


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


class GroundingNode(LifecycleNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.counters = Counters(NODE_COUNTERS)
        self.problems_logged: set[str] = set()
        self.last_problem = ""
        self.configure_error = ""
        self.values: Mapping[str, Any] = MappingProxyType({spec.name: spec.default for spec in PARAMETERS})
        self.requests = GroundRequests()
        callbacks = PipelineCallbacks(
            publish=self.publish_result, unanswered=self.on_unanswered, speech_event=self.requests.speech_event,
            voice_activity=self.publish_voice_activity, report_problem=self.report_problem,
            log=self.get_logger().info, now_s=self.now_s,
        )
        self.pipeline = Pipeline(PipelineSettings.from_parameters(self.values), callbacks)
        self.add_on_set_parameters_callback(self.on_parameters)
        for spec in PARAMETERS:  # each declaration passes through on_parameters, command-line values too
            self.declare_parameter(spec.name, spec.default, descriptor_for(spec.name))

        self.grounder: Grounder | None = None
        self.model_description = ""
        self.detection_publisher = None
        self.detections_publisher = None
        self.debug_image_publisher = None
        self.mask_publisher = None
        self.answerer: Answerer | None = None  # with answer_directory
        self.retriever: SpeechImageRetriever | None = None  # with best_view_checkpoint
        # Answers and best views are made here, off the inference thread, after the box is out.
        self.after_worker: ThreadPoolExecutor | None = None
        self.best_view_publisher = None
        self.answer_audio_publisher = None
        self.answer_text_publisher = None
        self.utterance_publisher = None
        self.voice_activity_publisher = None
        self.image_subscription = None
        # use_depth (3D target)
        self.target_3d_publisher = None
        self.target_point_publisher = None
        self.depth_subscription = None
        self.camera_info_subscription = None
        self.intrinsics: Intrinsics | None = None  # from the latest camera_info
        self.tf_buffer = None  # tf2_ros.Buffer when target_frame is set
        self.tf_listener = None
        self.tf_error: type[Exception] = Exception  # tf2_ros.TransformException once imported
        self.audio_subscription = None
        self.audio_stream = AudioStream()
        self.ground_server = ActionServer(
            self, Ground, "csref/ground", execute_callback=self.execute_ground, goal_callback=self.accept_goal,
            cancel_callback=lambda goal_handle: CancelResponse.ACCEPT,
        )
        self.goal_timer = self.create_timer(GOAL_CHECK_PERIOD_S, lambda: self.requests.expire(self.now_s()))
        self.enable_service = self.create_service(SetBool, "csref/enable", self.on_enable)
        self.watchdog: ImageWatchdog | None = None
        self.audio_source: MicrophoneSource | WavFileSource | None = None
        self.image_rate = ImageRate()
        self.diagnostics_publisher = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.diagnostics_timer = self.create_timer(self.values["diagnostics_period_s"], self.publish_diagnostics)

    def on_parameters(self, parameters: list[RosParameter]) -> SetParametersResult:
        for parameter in parameters:
            reason = check_value(parameter.name, parameter.value)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
        changed = {
            p.name: float(p.value) if isinstance(PARAMETERS_BY_NAME[p.name].default, float) else p.value
            for p in parameters
            if p.name in PARAMETERS_BY_NAME
        }
        values = {**self.values, **changed}
        try:
            settings = PipelineSettings.from_parameters(values)
        except ValueError as error:
            return SetParametersResult(successful=False, reason=str(error))
        for name in changed:
            if not PARAMETERS_BY_NAME[name].runtime and self.has_parameter(name):
                self.get_logger().info(f"{name} changed; it applies at the next configure/activate")
        self.values = MappingProxyType(values)
        self.pipeline.update_settings(settings)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------------------------
    # Lifecycle

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        values = self.values
        try:
            self.grounder = self.load_grounder(values)
            if values["audio_source"] == "file":
                # Fail now (not at activation) if the demo file is missing or unreadable.
                self.audio_source = self.wav_file_source(values)
            if values["target_frame"]:
                self.start_tf(values["target_frame"])
            if values["answer_directory"]:
                self.answerer = Answerer.from_directory(values["answer_directory"])
            if values["best_view_checkpoint"]:
                self.retriever = SpeechImageRetriever.from_checkpoint(values["best_view_checkpoint"])
        except Exception as error:  # any failure to load must leave the node unconfigured, with the reason
            self.configure_error = f"not configured: {error}"
            self.grounder = None
            self.audio_source = None
            self.answerer = self.retriever = None
            self.get_logger().error(self.configure_error)
            return TransitionCallbackReturn.FAILURE
        self.configure_error = ""
        self.detection_publisher = self.create_publisher(Detection2D, "csref/target_box", 10)
        self.detections_publisher = self.create_publisher(Detection2DArray, "csref/detections", 10)
        self.debug_image_publisher = self.create_publisher(Image, "csref/debug_image", 2)
        self.mask_publisher = self.create_publisher(Image, "csref/target_mask", 10)
        self.utterance_publisher = self.create_publisher(AudioStamped, "csref/utterance", 10)
        self.voice_activity_publisher = self.create_publisher(Bool, "csref/voice_activity", 10)
        if self.answerer is not None:
            self.answer_audio_publisher = self.create_publisher(AudioStamped, "csref/answer_audio", 10)
            self.answer_text_publisher = self.create_publisher(String, "csref/answer_text", 10)
        if self.retriever is not None:
            self.best_view_publisher = self.create_publisher(String, "csref/best_view", 10)
        if self.answerer is not None or self.retriever is not None:
            self.after_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="after_box")
        if values["use_depth"]:
            self.target_3d_publisher = self.create_publisher(Detection3DArray, "csref/target_3d", 10)
            self.target_point_publisher = self.create_publisher(PointStamped, "csref/target_point", 10)
        if values["publish_mask"] and not self.grounder.has_mask:
            self.report_problem("publish_mask is set but this model has no mask head: nothing will be published on "
                                "csref/target_mask (train one: docs/TRAINING.md, Segment-Select-Correct)")
        self.pipeline.start(self.grounder)
        self.get_logger().info(f"configured: {self.model_description}")
        return TransitionCallbackReturn.SUCCESS

    def load_grounder(self, values: Mapping[str, Any]) -> Grounder:
        checkpoint = values["model_checkpoint"]
        if not checkpoint:
            raise ValueError("model_checkpoint is empty; set it to a checkpoint directory or official .pth file")
        if not Path(checkpoint).exists():
            raise FileNotFoundError(f"model_checkpoint {checkpoint} does not exist")
        threads = values["num_threads"] or None
        if threads:
            torch.set_num_threads(threads)
        started = time.monotonic()
        grounder = Grounder.from_checkpoint(
            checkpoint,
            config=values["model_config"] or None,
            device=values["device"],
            backend=values["backend"],
            precision=values["precision"],
            onnx_dir=values["onnx_dir"] or None,
            threads=threads,
        )
        # Warm-up: the first call of a model is several times slower than the next ones.
        warmup_audio = np.random.default_rng(0).uniform(-0.3, 0.3, SAMPLE_RATE // 2).astype(np.float32)
        grounder.ground(np.full((64, 64, 3), 127, dtype=np.uint8), warmup_audio)
        self.model_description = (
            f"{checkpoint} (backend {type(grounder.backend).__name__}, device {values['device']}, "
            f"image size {grounder.config.image_size}, loaded in {time.monotonic() - started:.1f} s)"
        )
        return grounder

    def start_tf(self, target_frame: str) -> None:
        try:
            import tf2_ros  # optional: only target_frame needs it, and the registries' ROS wheels lack it
        except ImportError as error:
            raise ValueError(
                f"target_frame '{target_frame}' needs tf2_ros, which is not importable here ({error}): install it "
                "(with a ROS 2 installation: apt install ros-$ROS_DISTRO-tf2-ros, then source it) or leave "
                "target_frame empty to get 3D output in the depth image's optical frame"
            ) from error
        self.tf_error = tf2_ros.TransformException
        self.tf_buffer = tf2_ros.Buffer(node=self)
        self.tf_listener = tf2_ros.TransformListener(self.tf_buffer, self)

    def wav_file_source(self, values: Mapping[str, Any]) -> WavFileSource:
        try:
            return WavFileSource(values["audio_file"], self.pipeline.on_audio, loop=values["audio_loop"])
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"audio_file: {error}") from error

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        values = self.values
        self.pipeline.activate(values["frame_history_s"], values["frame_history_rate_hz"], use_depth=values["use_depth"])
        qos = subscription_qos(values["image_qos_reliability"], values["image_qos_depth"])
        self.watchdog = ImageWatchdog(
            self, self.image_topic(), qos, values["image_timeout_s"], values["image_qos_adapt"],
            self.counters, self.report_problem, self.subscribe_images,
        )
        self.subscribe_images(qos)
        if values["use_depth"]:
            self.depth_subscription = self.create_subscription(
                Image, values["depth_topic"], self.on_depth, qos
            )
            self.camera_info_subscription = self.create_subscription(
                CameraInfo, values["depth_info_topic"], self.on_camera_info, qos
            )
        if values["audio_source"] == "microphone":
            device = values["audio_device"]
            self.audio_source = MicrophoneSource(
                self.pipeline.on_audio,
                self.on_audio_error,
                device=int(device) if device.isdigit() else (device or None),
                sample_rate=values["audio_sample_rate"],
                channels=values["audio_channels"],
            )
            self.audio_source.start()
        elif values["audio_source"] == "topic":
            qos = QoSProfile(depth=values["audio_topic_depth"], reliability=qos_profile_sensor_data.reliability,
                             durability=qos_profile_sensor_data.durability)
            self.audio_subscription = self.create_subscription(
                AudioStamped, values["audio_topic"], self.on_audio_message, qos
            )
        elif self.audio_source is None:  # reactivated after a deactivate: replay the file
            self.audio_source = self.wav_file_source(values)
        speech_from = self.audio_subscription.topic_name if self.audio_subscription is not None else values["audio_source"]
        self.get_logger().info(f"active: images from {self.image_topic()} ({values['image_transport']}), speech from {speech_from}")
        return super().on_activate(state)

    def image_topic(self) -> str:
        topic = self.values["image_topic"]
        return f"{topic}/compressed" if self.values["image_transport"] == "compressed" else topic

    def subscribe_images(self, qos: QoSProfile) -> None:
        if self.image_subscription is not None:
            self.destroy_subscription(self.image_subscription)
        self.image_subscription = self.create_subscription(
            CompressedImage if self.values["image_transport"] == "compressed" else Image,
            self.image_topic(),
            self.on_image,
            qos,
            event_callbacks=SubscriptionEventCallbacks(
                incompatible_qos=self.watchdog.on_incompatible_qos, message_lost=self.watchdog.on_message_lost
            ),
        )

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.stop_capture()
        return super().on_deactivate(state)

    def stop_capture(self) -> None:
        self.pipeline.deactivate()
        self.requests.close_all(GoalOutcome("stopped", "the node stopped listening (deactivated)"))
        if self.audio_subscription is not None:
            self.destroy_subscription(self.audio_subscription)
            self.audio_subscription = None
        if self.audio_source is not None:
            self.audio_source.stop()
            self.audio_source = None
        if self.watchdog is not None:
            self.watchdog.destroy()
            self.watchdog = None
        for subscription in (self.image_subscription, self.depth_subscription, self.camera_info_subscription):
            if subscription is not None:
                self.destroy_subscription(subscription)
        self.image_subscription = self.depth_subscription = self.camera_info_subscription = None

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release_model()
        return TransitionCallbackReturn.SUCCESS

    def release_model(self) -> None:
        self.pipeline.stop()
        if self.after_worker is not None:
            self.after_worker.shutdown(wait=True, cancel_futures=True)  # before its publishers go
            self.after_worker = None
        publishers = (
            self.detection_publisher, self.detections_publisher, self.debug_image_publisher, self.mask_publisher,
            self.utterance_publisher, self.voice_activity_publisher, self.target_3d_publisher, self.target_point_publisher,
            self.answer_audio_publisher, self.answer_text_publisher, self.best_view_publisher,
        )
        for publisher in publishers:
            if publisher is not None:
                self.destroy_publisher(publisher)
        self.detection_publisher = self.detections_publisher = self.debug_image_publisher = self.mask_publisher = None
        self.utterance_publisher = self.voice_activity_publisher = None
        self.target_3d_publisher = self.target_point_publisher = None
        self.answer_audio_publisher = self.answer_text_publisher = self.best_view_publisher = None
        self.answerer = self.retriever = None
        self.tf_buffer = self.tf_listener = None
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
    # Inputs and outputs

    def on_image(self, msg: Image | CompressedImage) -> None:
        if not self.pipeline.active:
            return
        self.watchdog.image_arrived()  # set while active: activation and callbacks share the executor thread
        self.counters.add("images")
        max_pixels = self.values["max_image_pixels"]
        try:
            rgb = compressed_image_to_rgb(msg, max_pixels) if isinstance(msg, CompressedImage) else image_to_rgb(msg, max_pixels)
        except ImageConversionError as error:
            self.counters.add("images_rejected")
            self.report_problem(f"image rejected on {self.image_topic()}: {error}")
            return
        self.pipeline.add_frame(self.trusted_stamp(time_to_s(msg.header.stamp), "image"), CameraFrame(rgb, msg.header))
        source = self.audio_source
        if isinstance(source, WavFileSource) and source.thread is None:
            self.get_logger().info(f"images arriving: playing {source.path} ({source.duration_s:.1f} s per pass)")
            source.start()

    def on_audio_message(self, msg: AudioStamped) -> None:
        if not self.pipeline.active:
            return
        try:
            chunk = self.audio_stream.receive(msg.audio, time_to_s(msg.header.stamp))
        except AudioMessageError as error:
            self.report_problem(f"audio rejected on {self.audio_subscription.topic_name}: {error}", "audio rejected")
            return
        if chunk is not None:
            self.pipeline.on_stamped_audio(chunk.samples, self.trusted_stamp(chunk.end_stamp_s, "audio"))

    def trusted_stamp(self, stamp_s: float, what: str) -> float:
        """stamp_s, or now when it is too far from this node's clock to pair by (reported)."""
        now_s = self.now_s()
        if abs(now_s - stamp_s) <= STAMP_TRUST_S:
            return stamp_s
        self.report_problem(
            f"{what} stamps are {now_s - stamp_s:.1f} s off this node's clock (stamp {stamp_s:.3f}); "
            "pairing speech with frames by arrival time instead",
            kind=f"{what} stamps off",
        )
        return now_s

    def on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        self.pipeline.set_listening(request.data)
        response.success = True
        response.message = "listening" if request.data else "muted: audio is dropped until enabled again"
        self.get_logger().info(f"csref/enable: {response.message}")
        return response

    def accept_goal(self, goal: Ground.Goal) -> GoalResponse:
        reason = "the node is not active" if not self.pipeline.active else None
        if reason is None and has_samples(goal.audio.audio):
            try:
                audio_to_mono(goal.audio.audio)
            except AudioMessageError as error:
                reason = f"its audio cannot be read: {error}"
        if reason is not None:
            self.report_problem(f"csref/ground goal rejected: {reason}")
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    async def execute_ground(self, goal_handle: ServerGoalHandle) -> Ground.Result:
        """Waits (without holding a thread) until the pipeline, a timeout or a cancel resolves the goal."""
        goal = goal_handle.request
        answered: Future = Future(executor=self.executor)
        timeout_s = Duration.from_msg(goal.timeout).nanoseconds * 1e-9
        now_s = self.now_s()

        def feedback(started: bool, time_s: float) -> None:
            event = Ground.Feedback.SPEECH_STARTED if started else Ground.Feedback.SPEECH_ENDED
            goal_handle.publish_feedback(Ground.Feedback(event=event, stamp=s_to_time(time_s)))

        job = None
        if has_samples(goal.audio.audio):
            samples, rate = audio_to_mono(goal.audio.audio)  # readable: checked in accept_goal
            samples = resample(samples, rate)
            end_s = self.trusted_stamp(time_to_s(goal.audio.header.stamp) + len(samples) / SAMPLE_RATE, "goal audio")
            job = self.pipeline.given_utterance(samples, end_s)
        request = Request(
            accepted_s=now_s, deadline_s=now_s + timeout_s if timeout_s > 0 else None,
            job_number=None if job is None else job.number, on_done=answered.set_result, on_feedback=feedback,
            cancel_requested=lambda: goal_handle.is_cancel_requested,
        )
        self.requests.open(request)
        if job is not None:
            feedback(True, job.start_s)
            feedback(False, job.end_s)
            self.pipeline.enqueue(job)
        outcome: GoalOutcome = await answered
        if outcome.status == "canceled":
            goal_handle.canceled()
        elif outcome.status == "stopped":
            goal_handle.abort()
        else:
            goal_handle.succeed()
        result = Ground.Result(status=GOAL_STATUS.get(outcome.status, Ground.Result.TIMEOUT), message=outcome.message)
        result.detections = Detection2DArray(detections=list(outcome.detections))
        result.detections.header = outcome.header if outcome.header is not None else result.detections.header
        return result

    def on_unanswered(self, job: UtteranceJob, status: str, why: str) -> None:
        """The pipeline's callback for an utterance it could not ground (no frame; inference thread)."""
        self.requests.finish(job, GoalOutcome(status, why, job))

    # ------------------------------------------------------------------------------------
    # Depth (use_depth): the 3D target

    def on_camera_info(self, msg: CameraInfo) -> None:
        try:
            self.intrinsics = Intrinsics.from_camera_info_k(msg.k, msg.width, msg.height)
        except DepthError as error:
            self.report_problem(f"camera_info on {self.values['depth_info_topic']} rejected: {error}")

    def on_depth(self, msg: Image) -> None:
        if not self.pipeline.active:
            return
        self.counters.add("depth_images")
        intrinsics = self.intrinsics
        if intrinsics is None:
            self.counters.add("depth_without_camera_info")
            self.report_problem(
                f"depth image dropped: no camera_info yet on {self.values['depth_info_topic']} (set depth_info_topic)",
                kind="no camera_info",
            )
            return
        try:
            depth = DepthImage(depth_image_array(msg, self.values["max_image_pixels"]), msg.encoding, intrinsics)
        except (ImageConversionError, DepthError) as error:
            self.counters.add("depth_rejected")
            self.report_problem(f"depth image rejected on {self.values['depth_topic']}: {error}")
            return
        self.pipeline.add_depth(self.trusted_stamp(time_to_s(msg.header.stamp), "depth"), DepthFrame(depth, msg.header))

    def publish_3d(self, outcome: Outcome, located_2d: list[Detection2D]) -> None:
        """Detection3DArray of the located boxes and the best one's point (inference thread)."""
        header, transform = self.output_frame(outcome.depth.header)
        if header is None:
            return
        self.target_3d_publisher.publish(detections_3d(header, outcome.detections, located_2d, transform))
        best = outcome.detections[0].target
        if best is not None:
            self.target_point_publisher.publish(target_point(header, best.point, transform))

    def output_frame(self, depth_header) -> tuple[Any, RigidTransform | None]:
        """(header, transform) for 3D output: the depth image's optical frame, or target_frame
        through tf2; (None, None) when the transform is missing (logged and counted)."""
        target_frame = self.values["target_frame"]
        if not target_frame or self.tf_buffer is None:
            return depth_header, RigidTransform((0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0))
        try:
            stamped = self.tf_buffer.lookup_transform(
                target_frame, depth_header.frame_id, RclpyTime.from_msg(depth_header.stamp),
                timeout=Duration(seconds=TRANSFORM_TIMEOUT_S),
            )
        except self.tf_error as error:
            self.counters.add("transform_failures")
            self.report_problem(
                f"no transform from {depth_header.frame_id} to target_frame {target_frame} at the depth stamp: {error}; "
                "3D output skipped (is the robot's tf tree published?)",
                kind="transform missing",
            )
            return None, None
        translation, rotation = stamped.transform.translation, stamped.transform.rotation
        header = Header(stamp=depth_header.stamp, frame_id=target_frame)
        return header, RigidTransform((translation.x, translation.y, translation.z), (rotation.x, rotation.y, rotation.z, rotation.w))

    # ------------------------------------------------------------------------------------

    def on_audio_error(self, reason: str) -> None:
        self.counters.add("audio_errors")
        self.report_problem(reason)

    def publish_result(self, outcome: Outcome) -> None:
        """The pipeline's publish callback (inference thread): every utterance grounded."""
        publisher = self.detections_publisher
        if publisher is None:
            return
        frame, number = outcome.frame, outcome.job.number
        array = detection_array(frame.header, outcome.detections, number)
        publisher.publish(array)  # empty: heard, nothing passed score_threshold
        if outcome.detections:
            self.detection_publisher.publish(array.detections[0])
        if outcome.depth is not None and outcome.detections and self.target_3d_publisher is not None:
            self.publish_3d(outcome, array.detections)
        if self.utterance_publisher is not None:
            self.utterance_publisher.publish(utterance_audio(outcome.job))
        if outcome.detections:
            status, message = "ok", f"utterance {number}: score {outcome.detections[0].score:.2f}"
        else:
            status, message = "no_match", f"utterance {number}: no box passed score_threshold"
        self.requests.finish(outcome.job, GoalOutcome(status, message, outcome.job, tuple(array.detections), frame.header))
        if outcome.detections and self.answerer is not None:
            self.after_worker.submit(self.speak_answer, frame, outcome.detections[0].box, number)
        if self.retriever is not None:
            self.after_worker.submit(self.publish_best_view, outcome.job)
        if outcome.mask is not None and self.values["publish_mask"] and self.mask_publisher is not None:
            height, width = frame.rgb.shape[:2]
            self.mask_publisher.publish(mask_image(frame.header, outcome.mask, width, height))
        if outcome.detections and self.values["publish_debug_image"] and self.debug_image_publisher is not None:
            self.debug_image_publisher.publish(debug_image(frame, outcome.detections, number, outcome.mask))

    def speak_answer(self, frame: CameraFrame, box: tuple[float, float, float, float], number: int) -> None:
        """Answer worker: what the robot understood, as speech on csref/answer_audio (the frame's
        header, as the Detection2D's) and as text on csref/answer_text."""
        try:
            answer = self.answerer.answer(frame.rgb, box)
        except (RuntimeError, ValueError) as error:
            self.counters.add("answers_failed")
            self.report_problem(f"utterance {number}: no spoken answer: {error}", kind="answer failed")
            return
        self.answer_audio_publisher.publish(audio_stamped(frame.header, answer.waveform, answer.sample_rate))
        self.answer_text_publisher.publish(String(data=answer.text))
        self.counters.add("answers")
        self.get_logger().info(f"utterance {number}: answered \"{answer.text}\" ({answer.waveform.size / answer.sample_rate:.1f} s)")
        if self.values["answer_play"]:
            self.play(answer.waveform, answer.sample_rate)

    def publish_best_view(self, job: UtteranceJob) -> None:
        """After-box worker: which kept frame (best_view_spacing_s apart) matches the utterance
        best, as JSON on csref/best_view: its stamp and frame_id, score, lead over the runner-up
        (null with one frame: nothing to compare) and the whole ranking."""
        frames = self.pipeline.frames.spread(self.values["best_view_spacing_s"])
        if not frames:
            return
        views = [(str(index), stamped.frame.rgb) for index, stamped in enumerate(frames)]
        chosen = best_view(self.retriever, job.samples, SAMPLE_RATE, views)
        best = frames[chosen.index]
        self.best_view_publisher.publish(String(data=json.dumps({
            "utterance": job.number, "topic": self.image_topic(), "stamp": best.stamp_s,
            "frame_id": best.frame.header.frame_id, "score": chosen.score,
            "margin": chosen.margin if math.isfinite(chosen.margin) else None,
            "ranking": [{"stamp": frames[int(label)].stamp_s, "score": score} for label, score in chosen.ranking],
        })))

    def play(self, waveform: np.ndarray, sample_rate: int) -> None:
        try:
            play_sound(waveform, sample_rate)
        except AudioSourceError as error:
            self.report_problem(f"answer_play: {error}", kind="answer play")

    def publish_voice_activity(self, active: bool) -> None:
        """The pipeline's voice_activity callback (audio thread)."""
        publisher = self.voice_activity_publisher
        if publisher is not None:
            publisher.publish(Bool(data=active))

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
        node_counts = self.counters.snapshot()
        source = self.audio_source
        source_counts = source.counts() if source is not None else dict.fromkeys(AUDIO_SOURCE_COUNTERS, 0)
        latencies_s, processing_s = self.pipeline.latencies()
        status = grounding_status(
            self.get_name(),
            self.configure_error,
            configured=self.grounder is not None,
            active=self.pipeline.active,
            image_rate_hz=self.image_rate.update(node_counts["images"]),
            counts={**node_counts, **self.pipeline.counters.snapshot(), **source_counts, **self.audio_stream.counters.snapshot()},
            latencies_s=latencies_s,
            processing_s=processing_s,
            values={
                "model": self.model_description,
                "backend": type(self.grounder.backend).__name__ if self.grounder is not None else self.values["backend"],
                "image_topic": self.image_topic(),
                "audio_source": self.values["audio_source"],
                "listening": "yes" if self.pipeline.listening else "no: muted by csref/enable, audio is dropped",
                "ground_goals_waiting": str(self.requests.waiting()),
                "speaking": str(self.pipeline.speech.voice_active),
            },
            last_problem=self.last_problem,
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
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    if node.values["autostart"] and node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
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
