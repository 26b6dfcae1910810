"""The node's outgoing messages, built from plain pipeline results."""

import math

import numpy as np
from std_msgs.msg import Header

from csref_model.audio import SAMPLE_RATE
from csref_ros.audio_messages import audio_to_mono
from csref_ros.depth import RigidTransform, Target3D
from csref_ros.image_conversion import image_to_rgb
from csref_ros.messages import (
    audio_stamped,
    debug_image,
    detection_array,
    detections_3d,
    s_to_time,
    target_point,
    time_to_s,
    utterance_audio,
)
from csref_ros.pipeline import CameraFrame, Detection, UtteranceJob

HEADER = Header(stamp=s_to_time(1_700_000_000.25), frame_id="camera_color_optical_frame")
TARGET = Target3D(point=(0.1, -0.2, 1.5), size=(0.05, 0.06, 0.02), valid_pixels=40)
DETECTIONS = (Detection((10.0, 20.0, 50.0, 80.0), 0.9, TARGET), Detection((100.0, 5.0, 120.0, 25.0), 0.4, None))
# 90 degrees about z, then 1 m along x: (x, y, z) -> (1 - y, x, z)
TURN = RigidTransform((1.0, 0.0, 0.0), (0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5)))


def test_stamps_round_trip():
    stamp = s_to_time(1_700_000_123.375)
    assert (stamp.sec, stamp.nanosec) == (1_700_000_123, 375_000_000)
    assert time_to_s(stamp) == 1_700_000_123.375
    carried = s_to_time(41.9999999999)  # rounds up to the next whole second, not to nanosec 1e9
    assert (carried.sec, carried.nanosec) == (42, 0)


def test_detection_array_keeps_order_and_puts_the_utterance_in_the_hypothesis():
    array = detection_array(HEADER, DETECTIONS, utterance_number=7)
    assert array.header.frame_id == HEADER.frame_id and len(array.detections) == 2
    first = array.detections[0]
    assert (first.bbox.center.position.x, first.bbox.center.position.y, first.bbox.size_x, first.bbox.size_y) == (30, 50, 40, 60)
    assert first.id == "" and first.header.stamp == HEADER.stamp
    assert [d.results[0].hypothesis.class_id for d in array.detections] == ["utterance/7"] * 2
    assert [round(d.results[0].hypothesis.score, 3) for d in array.detections] == [0.9, 0.4]
    assert detection_array(HEADER, (), 8).detections == []


def test_3d_output_skips_boxes_without_depth_and_moves_points_to_the_output_frame():
    located_2d = detection_array(HEADER, DETECTIONS, 3).detections
    array = detections_3d(HEADER, DETECTIONS, located_2d, TURN)
    assert len(array.detections) == 1
    box = array.detections[0].bbox
    np.testing.assert_allclose([box.center.position.x, box.center.position.y, box.center.position.z], [1.2, 0.1, 1.5])
    assert (box.size.x, box.size.y, box.size.z) == TARGET.size
    assert array.detections[0].results[0].hypothesis.class_id == "utterance/3"
    point = target_point(HEADER, TARGET.point, TURN)
    np.testing.assert_allclose([point.point.x, point.point.y, point.point.z], [1.2, 0.1, 1.5])


def test_utterance_audio_reads_back_as_the_same_samples():
    samples = np.sin(np.linspace(0, 200, SAMPLE_RATE // 2)).astype(np.float32) * 0.5
    job = UtteranceJob(key=(0, 0.0, 0.5), number=1, start_s=12.5, end_s=13.0, detected_s=13.3, samples=samples, cut=False)
    message = utterance_audio(job)
    assert abs(time_to_s(message.header.stamp) - 12.5) < 1e-9
    read, rate = audio_to_mono(message.audio)
    assert rate == SAMPLE_RATE
    np.testing.assert_array_equal(read, samples)


def test_debug_image_draws_on_a_copy_with_the_frame_header():
    rgb = np.zeros((90, 140, 3), np.uint8)
    message = debug_image(CameraFrame(rgb, HEADER), DETECTIONS, 5)
    drawn = image_to_rgb(message)
    assert drawn.shape == rgb.shape and message.header.frame_id == HEADER.frame_id
    assert drawn[20:80, 10:50].any() and not rgb.any()


def test_an_answer_waveform_goes_out_with_the_detection_header_at_its_own_rate():
    samples = np.linspace(-0.5, 0.5, 2205, dtype=np.float64)  # not float32, not 16 kHz
    message = audio_stamped(HEADER, samples, 22050)
    assert message.header.stamp == HEADER.stamp and message.header.frame_id == HEADER.frame_id
    read, rate = audio_to_mono(message.audio)
    assert rate == 22050 and message.audio.info.chunk == 2205
    np.testing.assert_allclose(read, samples, atol=1e-7)
