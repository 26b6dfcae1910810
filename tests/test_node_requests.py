"""The node's audio topic, csref/ground action, csref/enable service and csref/utterance, each
with real rclpy across processes: an audio publisher (audio_common_msgs/AudioStamped of espeak-ng
speech), a camera, an action/service client and a listener, each its own process.
"""

from pathlib import Path

import pytest
import soundfile

from ros_support import HEIGHT, WIDTH, assert_box_inside_image, json_lines, start_node, start_program, stop
from speech_support import SAMPLE_RATE, espeak_16k, speech_with_pauses

CAMERA = ["--topic", "/test_camera/image", "--width", str(WIDTH), "--height", str(HEIGHT), "--rate", "10"]


@pytest.fixture(scope="module")
def command(tmp_path_factory) -> tuple[Path, float]:
    """(WAV path, end of speech in seconds): a command with silence around it."""
    wave, truth = speech_with_pauses([espeak_16k("pick up the blue square at the back")], [0.5, 1.2])
    path = tmp_path_factory.mktemp("audio") / "command.wav"
    soundfile.write(path, wave, SAMPLE_RATE)
    return path, truth[0][1]


def node_parameters(checkpoint: Path, **changes) -> dict:
    return {"model_checkpoint": checkpoint, "audio_source": "topic", "image_topic": "/test_camera/image", **changes}


def test_speech_from_an_audio_topic_is_paired_with_frames_by_its_stamps(tmp_path, ros_env, tiny_checkpoint, command):
    """44.1 kHz stereo int16 messages, stamped 1.5 s before they are sent (a late link): the
    image used is the one at the stamps' end of speech, not at the audio's arrival."""
    wav, speech_end_s = command
    offset_s = -1.5
    listener = start_program("detection_listener", ["--count", "1", "--timeout", "120", "--utterance-topic", "/csref/utterance"],
                             ros_env, tmp_path / "listener.log")
    node = start_node(node_parameters(tiny_checkpoint), ros_env, tmp_path / "node.log")
    camera = start_program("image_publisher", CAMERA, ros_env, tmp_path / "camera.log")
    audio = start_program("audio_publisher", ["--wav", str(wav), "--rate", "44100", "--channels", "2", "--format", "8",
                                              "--stamp-offset", str(offset_s)], ros_env, tmp_path / "audio.log")
    try:
        listener.wait(timeout=150)
    finally:
        for process in (audio, camera, node, listener):
            stop(process, timeout=20)
    node_log = (tmp_path / "node.log").read_text()
    detections = [line for line in json_lines(tmp_path / "listener.log") if "id" in line]
    report = json_lines(tmp_path / "listener.log")[-1]
    assert len(detections) == 1, node_log + (tmp_path / "audio.log").read_text()
    assert_box_inside_image(detections[0])
    first_stamp_s = json_lines(tmp_path / "audio.log")[0]["first_stamp_s"]
    # Frames come every 0.1 s; the VAD's end of speech is within a few frames of the true one.
    assert abs(detections[0]["stamp_s"] - (first_stamp_s + speech_end_s)) < 0.45, (detections, first_stamp_s)
    assert detections[0]["received_s"] - detections[0]["stamp_s"] > -offset_s  # old by the stamps, and paired anyway
    (utterance,) = report["utterances"]
    assert utterance["rate"] == SAMPLE_RATE and utterance["format"] == 1 and utterance["samples"] > SAMPLE_RATE
    diagnostics = report["diagnostics"]
    assert int(diagnostics["audio_messages"]) > 0 and int(diagnostics["audio_messages_rejected"]) == 0
    assert diagnostics["listening"] == "yes"


def test_ground_action_with_audio_in_the_goal_and_with_a_timeout(tmp_path, ros_env, tiny_checkpoint, command):
    """No audio on the topic: a goal that listens times out; a goal that brings its speech
    (float32 at 22.05 kHz) gets the box, with speech started/ended feedback."""
    wav, _ = command
    node = start_node(node_parameters(tiny_checkpoint), ros_env, tmp_path / "node.log")
    camera = start_program("image_publisher", CAMERA, ros_env, tmp_path / "camera.log")
    client = start_program("ground_client", ["ground:1.5", f"ground:30:{wav}"], ros_env, tmp_path / "client.log")
    try:
        client.wait(timeout=180)
    finally:
        for process in (client, camera, node):
            stop(process, timeout=20)
    steps = json_lines(tmp_path / "client.log")
    assert len(steps) == 2, (tmp_path / "client.log").read_text() + (tmp_path / "node.log").read_text()
    timed_out, grounded = steps
    assert timed_out["status"] == 3 and timed_out["detections"] == [] and 1.4 <= timed_out["waited_s"] < 5
    assert "nothing grounded within 1.5 s" in timed_out["message"]
    assert grounded["status"] == 0 and grounded["feedback"] == [0, 1] and grounded["frame_id"] == "camera", grounded
    (box,) = grounded["detections"]
    assert_box_inside_image({"center": box[:2], "size": box[2:], "score": 0.5})


def test_enable_false_mutes_listening(tmp_path, ros_env, tiny_checkpoint, command):
    """While disabled, a listening goal hears nothing (TIMEOUT) and the audio is counted as
    dropped; enabled again, the next utterance answers the goal."""
    wav, _ = command
    listener = start_program("detection_listener", ["--count", "1", "--timeout", "150"], ros_env, tmp_path / "listener.log")
    node = start_node(node_parameters(tiny_checkpoint), ros_env, tmp_path / "node.log")
    camera = start_program("image_publisher", CAMERA, ros_env, tmp_path / "camera.log")
    client = start_program("ground_client", ["enable:false", "ground:8", "enable:true", "ground:30"], ros_env, tmp_path / "client.log")
    audio = start_program("audio_publisher", ["--wav", str(wav), "--passes", "0"], ros_env, tmp_path / "audio.log")
    try:
        client.wait(timeout=180)
        listener.wait(timeout=30)
    finally:
        for process in (audio, client, camera, node, listener):
            stop(process, timeout=20)
    steps = json_lines(tmp_path / "client.log")
    assert [step["step"] for step in steps] == ["enable", "ground", "enable", "ground"], (tmp_path / "node.log").read_text()
    assert steps[0]["message"] == "muted: audio is dropped until enabled again"
    assert steps[1]["status"] == 3 and steps[1]["feedback"] == []  # nothing heard while muted
    # The WAV loops, so a next command may start before the result goes out: look for a start
    # followed by its end anywhere in the feedback.
    feedback = steps[3]["feedback"]
    assert steps[3]["status"] == 0 and [0, 1] in [feedback[i:i + 2] for i in range(len(feedback) - 1)], steps[3]
    diagnostics = json_lines(tmp_path / "listener.log")[-1]["diagnostics"]
    assert int(diagnostics["audio_chunks_muted"]) > 0 and diagnostics["listening"] == "yes"
