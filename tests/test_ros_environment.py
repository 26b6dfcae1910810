"""ROS 2 from registry wheels: our generated vision_msgs and the loopback Fast DDS profile."""

import json
import math
from pathlib import Path

import vision_msgs
from rclpy.serialization import deserialize_message, serialize_message
from vision_msgs.msg import Detection2D, ObjectHypothesisWithPose

from ros_support import ros_env, start_program, stop  # noqa: F401  (ros_env is a fixture)

# RIHS01 type hashes of the public vision_msgs 4.1.1 build (rosidl-generated *__description.c of
# a colcon build of ros-perception/vision_msgs 4.1.1). Equal hashes = same fields, same wire format.
PUBLIC_TYPE_HASHES = {
    "Detection2D": "0d12b69df5c593b3455b7346fac8205437a7d4bcb09b9e0e0b2dde787ded38ea",
    "Detection2DArray": "214274120007f4a683866481336b70310268cfa107aebe9d594a6acf75bda968",
    "BoundingBox2D": "008eacbb0cf8f26e83795547bed013eec3675485ef386ec056d80eaaf1c1ce2f",
    "ObjectHypothesis": "51da43cec11c01957a64d1e05a24acd18aae7745ec30b74348ad5f6d634f7f90",
    "ObjectHypothesisWithPose": "41c12344c0396c48b81df12467c192d99b2a0eb1463c5c37194e4223251c80bc",
    "Point2D": "eab0e83f44ab4de92ceaf76dd7d0e7638f2bdd1d16ffbe16c7a136c48e407247",
    "Pose2D": "b0b5d1d7b4c20dd4fcde3ed1d4b289a919290572007d67a97043814db25d3648",
}


def test_vision_msgs_type_hashes_match_public_package():
    # <prefix>/lib/pythonX.Y/site-packages/vision_msgs -> <prefix>/share/vision_msgs/msg (venv or /opt/ros)
    share = Path(vision_msgs.__file__).resolve().parents[4] / "share" / "vision_msgs" / "msg"
    for name, public_hash in PUBLIC_TYPE_HASHES.items():
        description = json.loads((share / f"{name}.json").read_text())
        hashes = {entry["type_name"]: entry["hash_string"] for entry in description["type_hashes"]}
        assert hashes[f"vision_msgs/msg/{name}"] == f"RIHS01_{public_hash}", name


def test_detection2d_serialization_round_trip():
    detection = Detection2D(id="7")
    detection.header.frame_id = "camera"
    detection.header.stamp.sec, detection.header.stamp.nanosec = 12, 345
    detection.bbox.center.position.x, detection.bbox.center.position.y = 320.5, 200.25
    detection.bbox.size_x, detection.bbox.size_y = 64.0, 48.0
    hypothesis = ObjectHypothesisWithPose()
    hypothesis.hypothesis.score = 0.875
    detection.results.append(hypothesis)

    decoded = deserialize_message(serialize_message(detection), Detection2D)
    assert decoded == detection
    assert math.isclose(decoded.results[0].hypothesis.score, 0.875)


def test_large_best_effort_images_cross_process(ros_env, tmp_path):
    """1280x720 rgb8 best-effort frames at 20 Hz between processes arrive with our profile."""
    frames = 60
    counter = start_program(
        "image_counter", ["--topic", "/env_test/image", "--expect", str(frames), "--timeout", "40"], ros_env, tmp_path / "counter.log"
    )
    publisher = start_program(
        "image_publisher",
        ["--topic", "/env_test/image", "--width", "1280", "--height", "720", "--rate", "20", "--count", str(frames)],
        ros_env,
        tmp_path / "publisher.log",
    )
    try:
        counter.wait(60)
        publisher.wait(30)
    finally:
        stop(counter)
        stop(publisher)
    counter_log = (tmp_path / "counter.log").read_text()
    summary = json.loads(counter_log.strip().splitlines()[-1])
    assert summary["received"] >= frames - 3, counter_log + (tmp_path / "publisher.log").read_text()
    assert summary["shapes"] == [[720, 1280, 3]]
