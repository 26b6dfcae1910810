"""The node's outgoing messages, built from the pipeline's plain results (no node, no publishing).

Conventions (docs/ROS.md): a Detection2D's header is the image's; its `id` stays empty, because
vision_msgs means a stable object id there, and the utterance goes into the hypothesis' class_id
as "utterance/<number>" with the confidence as its score. 3D output is in the frame of the
`header` given, each point moved by `transform` (identity for the depth image's optical frame).
"""

import math

import numpy as np
from audio_common_msgs.msg import AudioStamped
from builtin_interfaces.msg import Time
from geometry_msgs.msg import PointStamped
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from vision_msgs.msg import Detection2D, Detection2DArray, Detection3D, Detection3DArray, ObjectHypothesisWithPose

from csref_model.audio import SAMPLE_RATE
from csref_model.visualize import DrawnBox, draw_boxes
from csref_ros.audio_messages import FLOAT32_FORMAT
from csref_ros.depth import RigidTransform
from csref_ros.image_conversion import fill_image, mask_to_mono8
from csref_ros.pipeline import CameraFrame, Detection, UtteranceJob


def time_to_s(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def s_to_time(seconds: float) -> Time:
    whole = math.floor(seconds)
    # The fraction on its own: seconds * 1e9 would lose the nanoseconds of a present-day stamp.
    carry, nanosec = divmod(round((seconds - whole) * 1e9), 1_000_000_000)
    return Time(sec=whole + carry, nanosec=nanosec)


def detection_2d(header: Header, detection: Detection, utterance_number: int) -> Detection2D:
    x1, y1, x2, y2 = detection.box
    message = Detection2D(header=header)
    message.bbox.center.position.x = (x1 + x2) / 2
    message.bbox.center.position.y = (y1 + y2) / 2
    message.bbox.size_x = x2 - x1
    message.bbox.size_y = y2 - y1
    hypothesis = ObjectHypothesisWithPose()
    hypothesis.hypothesis.class_id = f"utterance/{utterance_number}"
    hypothesis.hypothesis.score = detection.score
    message.results.append(hypothesis)
    return message


def detection_array(header: Header, detections: tuple[Detection, ...], utterance_number: int) -> Detection2DArray:
    """Best first; empty when the utterance was heard but nothing passed score_threshold."""
    return Detection2DArray(header=header, detections=[detection_2d(header, d, utterance_number) for d in detections])


def detections_3d(header: Header, detections: tuple[Detection, ...], located_2d: list[Detection2D],
                  transform: RigidTransform) -> Detection3DArray:
    """The detections that have a 3D target, with the hypotheses of their 2D messages."""
    array = Detection3DArray(header=header)
    for detection, message_2d in zip(detections, located_2d):
        if detection.target is None:
            continue
        located = Detection3D(header=header)
        center = located.bbox.center
        center.position.x, center.position.y, center.position.z = transform.apply(detection.target.point)
        # The box's axes are the optical frame's (x right, y down, z forward), expressed in the output frame.
        center.orientation.x, center.orientation.y, center.orientation.z, center.orientation.w = transform.rotation_xyzw
        located.bbox.size.x, located.bbox.size.y, located.bbox.size.z = detection.target.size
        result = ObjectHypothesisWithPose(hypothesis=message_2d.results[0].hypothesis)
        result.pose.pose = center
        located.results.append(result)
        array.detections.append(located)
    return array


def target_point(header: Header, point: tuple[float, float, float], transform: RigidTransform) -> PointStamped:
    message = PointStamped(header=header)
    message.point.x, message.point.y, message.point.z = transform.apply(point)
    return message


def audio_stamped(header: Header, samples: np.ndarray, sample_rate: int) -> AudioStamped:
    """(N,) mono samples in [-1, 1) as float32 audio_common_msgs/AudioStamped, one chunk."""
    message = AudioStamped(header=header)
    message.audio.audio_data.float32_data = samples.astype(np.float32, copy=False)
    message.audio.info.format, message.audio.info.channels = FLOAT32_FORMAT, 1
    message.audio.info.rate, message.audio.info.chunk = int(sample_rate), int(samples.size)
    return message


def utterance_audio(job: UtteranceJob) -> AudioStamped:
    """The grounded segment, 16 kHz, stamped with its first voiced frame."""
    return audio_stamped(Header(stamp=s_to_time(job.start_s)), job.samples, SAMPLE_RATE)


def mask_image(header: Header, mask: np.ndarray, width: int, height: int) -> Image:
    """The target's mask as mono8, 255 on the target, at the camera's resolution. vision_msgs has
    no mask type; the Detection2D's header lets message_filters' ExactTime pair the two."""
    message = Image(header=header)
    fill_image(message, mask_to_mono8(mask, width, height), "mono8")
    return message


def debug_image(frame: CameraFrame, detections: tuple[Detection, ...], utterance_number: int,
                mask: np.ndarray | None = None) -> Image:
    """The frame with the target's mask (when given) and the boxes drawn, the best one labelled
    with the utterance number."""
    labels = [f"#{utterance_number} {d.score:.2f}" if rank == 0 else f"{d.score:.2f}" for rank, d in enumerate(detections)]
    boxes = [DrawnBox(d.box, label=label) for d, label in zip(detections, labels)]
    picture = draw_boxes(frame.rgb, boxes, mask=mask)  # (H, W, 3)
    message = Image(header=frame.header)
    fill_image(message, picture, "rgb8")
    return message
