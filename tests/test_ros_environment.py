"""ROS 2 from registry wheels: our generated vision_msgs and audio_common_msgs, and the loopback Fast DDS profile."""

import json
import math
from pathlib import Path

import audio_common_msgs
import vision_msgs
from rclpy.serialization import deserialize_message, serialize_message
from vision_msgs.msg import Detection2D, ObjectHypothesisWithPose

from ros_support import start_program, stop

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


# RIHS01 type hashes of mgonzs13/audio_common 4.0.10's messages (`rosidl hash` over its .msg files).
AUDIO_COMMON_TYPE_HASHES = {
    "AudioStamped": "f6ad36427cfe3e7132f91509dca5a3be31b9b681f182db6e606e95e781b21611",
    "Audio": "56bb1432a8bc1cf3579fa7dcfa6107180f29e799b30e51a880e5591ccc789de2",
    "AudioData": "28873bc02f2963cbc2e6e7dbadd149384f99daddba98ddc2a7cd2550a0b9b5c3",
    "AudioInfo": "2418e6f9b3639c2844652701c489705b045d5b970c0674573a0f668d6af3b58b",
}


def assert_type_hashes(package, public_hashes: dict[str, str]) -> None:
    # <prefix>/lib/pythonX.Y/site-packages/<package> -> <prefix>/share/<package>/msg (venv or /opt/ros)
    name = package.__name__
    share = Path(package.__file__).resolve().parents[4] / "share" / name / "msg"
    for type_name, public_hash in public_hashes.items():
        description = json.loads((share / f"{type_name}.json").read_text())
        hashes = {entry["type_name"]: entry["hash_string"] for entry in description["type_hashes"]}
        assert hashes[f"{name}/msg/{type_name}"] == f"RIHS01_{public_hash}", type_name


def test_vision_msgs_type_hashes_match_public_package():
    assert_type_hashes(vision_msgs, PUBLIC_TYPE_HASHES)


def test_audio_common_msgs_type_hashes_match_whisper_ros_convention():
    assert_type_hashes(audio_common_msgs, AUDIO_COMMON_TYPE_HASHES)


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
