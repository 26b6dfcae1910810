"""The grounding node in its own process with real rclpy, talking to other processes on loopback.

A camera process publishes frames, the node hears a command (a WAV file played in real time, or
the ALSA fake microphone through sounddevice) and a listener process receives the Detection2D.
The model is a randomly initialised tiny CSRef: its box must lie in the image; with the trained
demo model the box must match the spoken target (tests/test_demo_model.py).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from csref_model.checkpoint import save_checkpoint
from csref_model.davenet import build_davenet, load_davenet_config
from csref_model.im2sp import (ANSWER_DECODER, ANSWER_LEXICON, ANSWER_VOCODER, EOS, Im2Sp, Im2SpConfig, UnitVocoder,
                               UnitVocoderConfig)
from ros_support import HEIGHT, WIDTH, assert_box_inside_image, json_lines, start_node, start_program, stop
from speech_support import SAMPLE_RATE, espeak_16k, speech_with_pauses



@pytest.fixture(scope="module")
def command(tmp_path_factory) -> tuple[Path, float]:
    """A spoken command with silence around it -> (WAV path, end of speech in seconds)."""
    wave, truth = speech_with_pauses([espeak_16k("pick up the red circle on the left")], [0.5, 1.0])
    path = tmp_path_factory.mktemp("audio") / "command.wav"
    soundfile.write(path, wave, SAMPLE_RATE)
    return path, truth[0][1]


def run_scenario(tmp_path, env, node_parameters, publisher_args, listener_args=(), publisher_env=None, node_env=None):
    """Listener, node and camera processes; returns (detections, diagnostics, listener report, node log)."""
    listener = start_program("detection_listener", [*listener_args], env, tmp_path / "listener.log")
    node = start_node(node_parameters, node_env or env, tmp_path / "node.log")
    camera = start_program("image_publisher", [*publisher_args], publisher_env or env, tmp_path / "camera.log")
    try:
        listener.wait(timeout=180)
    finally:
        stop(camera)
        node_code = stop(node, timeout=20)
        stop(listener)
    node_log = (tmp_path / "node.log").read_text()
    lines = json_lines(tmp_path / "listener.log")
    detections = [line for line in lines if "id" in line]
    report = lines[-1] if lines and "diagnostics" in lines[-1] else {}
    assert node_code in (0, -2), f"node exited with {node_code}:\n{node_log}"
    return detections, report.get("diagnostics", {}), report, node_log


@pytest.fixture(scope="module")
def damaged_command(tmp_path_factory, command) -> Path:
    """The command as float WAV with NaN samples and a clipped click in the leading silence."""
    wave, _ = soundfile.read(command[0], dtype="float32")
    wave[1000:1010] = np.nan
    wave[3000:3320] = np.sign(np.sin(np.arange(320) * 0.3))  # 20 ms at full scale
    path = tmp_path_factory.mktemp("audio") / "damaged_command.wav"
    soundfile.write(path, wave, SAMPLE_RATE, subtype="FLOAT")
    return path


@pytest.mark.parametrize("depth_encoding", ["16UC1", "32FC1"])
def test_depth_gives_the_target_in_3d(tmp_path, ros_env, tiny_checkpoint, command, depth_encoding):
    """Colour + aligned depth (a wall 1.2 m away, with holes) + camera_info from another process:
    the point is the box centre back-projected with K at 1.2 m, in the depth image's frame."""
    depth_m, focal, bad_depth_frames = 1.2, 500.0, 3
    detections, diagnostics, report, node_log = run_scenario(
        tmp_path,
        ros_env,
        {
            "model_checkpoint": tiny_checkpoint,
            "audio_source": "file",
            "audio_file": command[0],
            "image_topic": "/test_camera/image",
            "use_depth": True,
            "depth_topic": "/test_camera/depth",
            "depth_info_topic": "/test_camera/depth_info",
            "top_k": 3,
        },
        ["--topic", "/test_camera/image", "--width", str(WIDTH), "--height", str(HEIGHT), "--rate", "15",
         "--depth-topic", "/test_camera/depth", "--info-topic", "/test_camera/depth_info",
         "--depth-encoding", depth_encoding, "--depth-m", str(depth_m), "--bad-depth-frames", str(bad_depth_frames)],
        ["--count", "1", "--timeout", "120", "--depth"],
    )
    assert len(detections) == 1, node_log
    lines = json_lines(tmp_path / "listener.log")
    arrays = [line["array"] for line in lines if "array" in line]
    points = [line for line in lines if "point" in line]
    located = [line["target_3d"] for line in lines if "target_3d" in line]
    assert len(arrays) == len(points) == len(located) == 1, node_log
    (cx, cy), (w, h) = detections[0]["center"], detections[0]["size"]
    assert 1 <= len(arrays[0]) <= 3 and arrays[0][0] == pytest.approx([cx, cy])
    expected = [(cx - 0.5 - (WIDTH - 1) / 2) * depth_m / focal, (cy - 0.5 - (HEIGHT - 1) / 2) * depth_m / focal, depth_m]
    assert points[0]["frame_id"] == "camera_depth_optical_frame"
    np.testing.assert_allclose(points[0]["point"], expected, atol=1e-6)
    best = located[0][0]
    assert best["frame_id"] == "camera_depth_optical_frame" and best["center"] == pytest.approx(points[0]["point"])
    np.testing.assert_allclose(best["size"], [w * depth_m / focal, h * depth_m / focal, 0.0], atol=1e-5)
    assert int(diagnostics["depth_rejected"]) >= 1 and "depth encoding '8UC1' is not supported" in node_log
    assert int(diagnostics["targets_located"]) == len(located[0]) and int(diagnostics["depth_frames_missing"]) == 0
    assert int(diagnostics["inference_errors"]) == 0 and int(diagnostics["detections"]) == 1


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_spoken_command_from_wav_file_gives_a_box(tmp_path, ros_env, tiny_checkpoint, damaged_command, backend):
    wav = damaged_command
    detections, diagnostics, report, node_log = run_scenario(
        tmp_path,
        ros_env,
        {
            "model_checkpoint": tiny_checkpoint,
            "backend": backend,
            "onnx_dir": tmp_path / "onnx",
            "audio_source": "file",
            "audio_file": wav,
            "image_topic": "/test_camera/image",
            "publish_debug_image": True,
        },
        ["--topic", "/test_camera/image", "--width", str(WIDTH), "--height", str(HEIGHT), "--rate", "15", "--bad-frames", "4"],
        ["--count", "1", "--timeout", "120", "--debug-image-topic", "/csref/debug_image"],
    )
    assert len(detections) == 1, node_log
    detection = detections[0]
    # The utterance number is the hypothesis' class; id (a stable object id in vision_msgs) stays empty.
    assert detection["frame_id"] == "camera" and detection["id"] == "" and detection["utterance"] == "utterance/1"
    assert_box_inside_image(detection)
    # The header is the one of a camera frame seen while the command was spoken.
    assert 0 < detection["received_s"] - detection["stamp_s"] < 5.0
    assert report["debug_images"] == [[HEIGHT, WIDTH]]
    assert diagnostics["level"] == 0, diagnostics
    assert int(diagnostics["images_rejected"]) == 4 and int(diagnostics["detections"]) == 1
    assert int(diagnostics["inference_errors"]) == 0
    assert diagnostics["backend"] == {"torch": "TorchBackend", "onnxruntime": "OnnxRuntimeBackend"}[backend]
    assert "image encoding 'yuv422' is not supported" in node_log and "image data is truncated" in node_log
    assert "image is empty (0x0 pixels)" in node_log
    assert "NaN/infinite audio samples replaced by 0" in node_log and "audio clipped" in node_log
    assert int(diagnostics["audio_problems"]) >= 2


def test_best_view_ranks_the_kept_frames_after_each_utterance(tmp_path, ros_env, tiny_checkpoint, command):
    """best_view_checkpoint: a (random) ResDAVEnet-VQ ranks the kept frames; the best goes out as JSON."""
    davenet_config = load_davenet_config("davenet_tiny")
    torch.manual_seed(0)
    retrieval = save_checkpoint(tmp_path / "davenet", build_davenet(davenet_config), davenet_config)
    wav, _ = command
    detections, _, _, node_log = run_scenario(
        tmp_path,
        ros_env,
        {
            "model_checkpoint": tiny_checkpoint,
            "audio_source": "file",
            "audio_file": wav,
            "image_topic": "/test_camera/image",
            "best_view_checkpoint": retrieval,
            "best_view_spacing_s": 0.5,
        },
        ["--topic", "/test_camera/image", "--width", str(WIDTH), "--height", str(HEIGHT), "--rate", "10"],
        ["--count", "1", "--timeout", "120", "--string-topic", "/csref/best_view"],
    )
    assert len(detections) == 1, node_log
    views = [json.loads(line["string"]) for line in json_lines(tmp_path / "listener.log") if "string" in line]
    assert len(views) == 1, node_log
    view = views[0]
    assert view["utterance"] == 1 and view["topic"] == "/test_camera/image" and view["frame_id"] == "camera"
    stamps = [entry["stamp"] for entry in view["ranking"]]
    assert len(stamps) >= 2 and view["stamp"] == stamps[0] and view["margin"] >= 0.0
    assert all(abs(a - b) >= 0.5 - 1e-6 for a, b in zip(sorted(stamps), sorted(stamps)[1:]))  # spaced as asked
    scores = [entry["score"] for entry in view["ranking"]]
    assert scores == sorted(scores, reverse=True) and view["score"] == scores[0]


def random_answer_directory(path: Path) -> Path:
    """An answer directory (decoder/, vocoder/, lexicon.json) of random weights whose decoder never says
    EOS (its tied embedding row is zero, the unit rows large), so it always speaks max_tokens - 1 units."""
    torch.manual_seed(0)
    decoder_config = Im2SpConfig(image_size=128, num_units=32, hidden_size=32, num_layers=1, num_heads=2, ffn_size=64,
                                 max_tokens=24)
    decoder = Im2Sp(decoder_config)
    with torch.no_grad():
        decoder.token_embedding.weight.mul_(50.0)[EOS] = 0.0
    save_checkpoint(path / ANSWER_DECODER, decoder, decoder_config)
    vocoder_config = UnitVocoderConfig(num_units=32, hidden_size=16)
    save_checkpoint(path / ANSWER_VOCODER, UnitVocoder(vocoder_config), vocoder_config)
    (path / ANSWER_LEXICON).write_text(json.dumps({"the red circle": [3, 1, 4], "the big blue square": [5, 9, 2, 6]}))
    return path


def test_spoken_answer_follows_each_box(tmp_path, ros_env, tiny_checkpoint, command):
    """answer_directory: after the box, the answer's audio on csref/answer_audio and its text (a lexicon
    expression) on csref/answer_text."""
    wav, _ = command
    detections, diagnostics, report, node_log = run_scenario(
        tmp_path,
        ros_env,
        {
            "model_checkpoint": tiny_checkpoint,
            "audio_source": "file",
            "audio_file": wav,
            "image_topic": "/test_camera/image",
            "answer_directory": random_answer_directory(tmp_path / "answer"),
        },
        ["--topic", "/test_camera/image", "--width", str(WIDTH), "--height", str(HEIGHT), "--rate", "10"],
        ["--count", "1", "--timeout", "120", "--string-topic", "/csref/answer_text",
         "--utterance-topic", "/csref/answer_audio"],
    )
    assert len(detections) == 1, node_log
    texts = [line["string"] for line in json_lines(tmp_path / "listener.log") if "string" in line]
    assert texts and set(texts) <= {"the red circle", "the big blue square"}, node_log
    answers = report["utterances"]
    # 23 units, each at least one 40 ms unit frame (4 mel frames of 10 ms): at least 0.92 s at 16 kHz.
    assert answers and answers[0]["rate"] == SAMPLE_RATE and answers[0]["samples"] >= 0.92 * SAMPLE_RATE - 160
    assert answers[0]["stamp_s"] == pytest.approx(detections[0]["stamp_s"])  # the Detection2D's header
    assert int(diagnostics["answers"]) >= 1 and int(diagnostics["answers_failed"]) == 0, node_log


def test_microphone_through_alsa_gives_a_box(tmp_path, ros_env, tiny_checkpoint, command):
    wav, _ = command
    wave, sample_rate = soundfile.read(wav, dtype="int16")
    raw = tmp_path / "mic.raw"
    raw.write_bytes(np.concatenate([np.zeros(sample_rate, np.int16), wave]).astype("<i2").tobytes())
    config = tmp_path / "asound.conf"
    config.write_text(
        'pcm.!default { type asym; playback.pcm "null"; capture.pcm { type file; slave.pcm "null"; '
        f'file "/dev/null"; infile "{raw}"; format "raw" }} }}\n'
    )
    node_env = dict(ros_env, ALSA_CONFIG_PATH=f"/usr/share/alsa/alsa.conf:{config}")
    detections, diagnostics, _, node_log = run_scenario(
        tmp_path,
        ros_env,
        {
            "model_checkpoint": tiny_checkpoint,
            "audio_source": "microphone",
            "audio_sample_rate": sample_rate,
            "image_topic": "/test_camera/image",
            # The fake microphone delivers the whole recording at once, maybe before the camera's
            # first frame: the utterance must wait for it.
            "max_frame_age_s": 30.0,
        },
        ["--topic", "/test_camera/image", "--width", str(WIDTH), "--height", str(HEIGHT), "--rate", "10"],
        ["--count", "1", "--timeout", "120"],
        node_env=node_env,
    )
    assert len(detections) == 1, node_log
    assert_box_inside_image(detections[0])
    assert int(diagnostics["audio_errors"]) == 0, diagnostics


def test_qos_adapts_to_a_reliable_latched_camera_without_our_dds_profile(tmp_path, ros_env, tiny_checkpoint, command):
    """One frame, published once, reliable + transient_local, default Fast DDS transports."""
    wav, _ = command
    camera_env = {key: value for key, value in ros_env.items() if key != "FASTDDS_DEFAULT_PROFILES_FILE"}
    detections, _, _, node_log = run_scenario(
        tmp_path,
        ros_env,
        {
            "model_checkpoint": tiny_checkpoint,
            "audio_source": "file",
            "audio_file": wav,
            "image_topic": "/latched/image",
            "image_timeout_s": 1.0,
            # The one frame is stamped when the camera starts, before the node has loaded its
            # model: by the end of the utterance it may be older than the default 5 s.
            "max_frame_age_s": 60.0,
        },
        ["--topic", "/latched/image", "--count", "1", "--reliability", "reliable", "--durability", "transient_local",
         "--depth", "1", "--wait-subscribers", "0", "--linger", "120"],
        ["--count", "1", "--timeout", "120"],
        publisher_env=camera_env,
    )
    assert "Resubscribing with reliability=reliable, durability=transient_local (image_qos_adapt)" in node_log
    assert len(detections) == 1, node_log
    assert_box_inside_image(detections[0])


def test_reliable_subscription_to_best_effort_camera_is_explained(tmp_path, ros_env, tiny_checkpoint):
    # The middleware's incompatible-QoS event and the node's own check (which names the publisher)
    # arrive in either order: wait for both.
    listener_args = ["--count", "1", "--timeout", "90", "--until-at-least", "image_qos_incompatible=1",
                     "--until-at-least", "image_warnings=2"]
    _, diagnostics, _, node_log = run_scenario(
        tmp_path,
        ros_env,
        {
            "model_checkpoint": tiny_checkpoint,
            "audio_source": "microphone",
            "audio_device": "no such microphone",
            "image_topic": "/best_effort/image",
            "image_qos_reliability": "reliable",
            "image_qos_adapt": False,
            "image_timeout_s": 1.0,
        },
        ["--topic", "/best_effort/image", "--reliability", "best_effort", "--rate", "5", "--wait-subscribers", "0"],
        listener_args,
    )
    assert "has QoS incompatible with this node's subscription (policy RELIABILITY" in node_log
    assert "reliability=best_effort, durability=volatile" in node_log  # the publisher, named in the diagnosis
    assert "no microphone 'no such microphone'" in node_log
    assert int(diagnostics["audio_errors"]) >= 1 and diagnostics["state"] == "active"
    assert int(diagnostics["images"]) == 0


@pytest.mark.parametrize("checkpoint_problem", ["missing", "corrupt"])
def test_checkpoint_that_fails_to_load_leaves_node_unconfigured(tmp_path, ros_env, checkpoint_problem):
    checkpoint = tmp_path / "checkpoint"
    if checkpoint_problem == "corrupt":
        checkpoint.mkdir()
        (checkpoint / "config.yaml").write_text("image_size: 256\n")
        (checkpoint / "model.safetensors").write_bytes(b"this is not a safetensors file")
    listener_args = ["--count", "1", "--timeout", "60", "--until", "state=unconfigured"]
    listener = start_program("detection_listener", listener_args, ros_env, tmp_path / "listener.log")
    node = start_node({"model_checkpoint": checkpoint, "audio_source": "microphone"}, ros_env, tmp_path / "node.log")
    try:
        listener.wait(timeout=60)
        assert node.poll() is None, "the node must keep running"
    finally:
        stop(node)
        stop(listener)
    diagnostics = json_lines(tmp_path / "listener.log")[-1]["diagnostics"]
    assert diagnostics["level"] == 2 and diagnostics["state"] == "unconfigured"
    assert diagnostics["message"].startswith("not configured:")
    if checkpoint_problem == "missing":
        assert f"model_checkpoint {checkpoint} does not exist" in diagnostics["message"]


def test_parameters_are_validated_and_lifecycle_is_driven_from_outside(tmp_path, ros_env, tiny_checkpoint):
    node = start_node({"autostart": False}, ros_env, tmp_path / "node.log")

    def ros_call(*args: str) -> list[dict]:
        log = tmp_path / "call.log"
        call = start_program("ros_call", ["/grounding_node", *args], ros_env, log)
        assert call.wait(timeout=120) == 0, log.read_text()
        return json_lines(log)

    try:
        results = ros_call(
            "set",
            "score_threshold=1.5",
            "vad_frame_ms=25",
            "frame_selection=middle",
            "vad_min_utterance_s=9.0",
            "vad_max_utterance_s=5.0",
            "score_threshold=0.25",
            f"model_checkpoint={tiny_checkpoint}",
        )
        outcome = {(r["name"], r["successful"]) for r in results}
        assert ("score_threshold", False) in outcome and ("score_threshold", True) in outcome
        reasons = " | ".join(r["reason"] for r in results)
        assert "vad_frame_ms must be one of 10, 20, 30; got 25" in reasons
        assert "frame_selection must be one of end, start, latest; got 'middle'" in reasons
        assert "max_utterance_s (5.0) must exceed min_utterance_s (9.0)" in reasons
        assert [r["successful"] for r in results if r["name"].startswith("vad_")] == [False, True, False]

        transitions = ros_call("lifecycle", "configure", "activate", "deactivate", "cleanup")
        assert [(t["transition"], t["success"], t["state"]) for t in transitions] == [
            ("configure", True, "inactive"),
            ("activate", True, "active"),
            ("deactivate", True, "inactive"),
            ("cleanup", True, "unconfigured"),
        ]
    finally:
        stop(node)


def test_bad_parameter_on_the_command_line_is_a_clear_error(tmp_path, ros_env):
    node = start_node({"vad_aggressiveness": 7}, ros_env, tmp_path / "node.log")
    assert node.wait(timeout=60) == 2
    assert "bad parameter" in (tmp_path / "node.log").read_text()
