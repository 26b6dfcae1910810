"""The grounding node's parameters: names, defaults, descriptions, ranges, and their checks.

Parameters marked `runtime` take effect as soon as they are set; the others at the next
configure/activate. config/grounding.yaml and the parameter tables of docs/ROS.md and README.md
are generated from this table (tests/test_node_config.py fails when they differ):

    python -m csref_ros.parameters --write     # rewrite them
    python -m csref_ros.parameters --check     # exit 1 if any differs
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csref_model.runtime.contract import PRECISIONS
from csref_model.runtime.selection import BACKENDS
from csref_ros.frame_buffer import FRAME_CHOICES
from csref_ros.image_conversion import DEFAULT_MAX_PIXELS
from csref_ros.vad import FRAME_MS_CHOICES, VAD_BACKENDS, VadConfig

VAD_DEFAULTS = VadConfig()


@dataclass(frozen=True)
class Parameter:
    name: str
    default: Any
    description: str
    range: tuple[float, float, float] | None = None  # (low, high, step) for numbers; step 0 = any
    choices: tuple[Any, ...] = ()
    runtime: bool = False


PARAMETER_SECTIONS: tuple[tuple[str, tuple[Parameter, ...]], ...] = (
    ("Model", (
        Parameter("model_checkpoint", "", "Checkpoint: our directory (model.safetensors + config.yaml) or an official CSRef .pth"),
        Parameter("model_config", "", "Model config: 'base', 'tiny' or a YAML path; empty = the one stored in the checkpoint directory"),
        Parameter("backend", "torch", "Inference backend (auto = the fastest available on device)", choices=BACKENDS),
        Parameter("device", "cpu", "Device, e.g. cpu or cuda:0"),
        Parameter("precision", "fp32", "Inference precision (fp16/bf16 on CUDA only)", choices=tuple(PRECISIONS)),
        Parameter("onnx_dir", "", "Exported ONNX graphs for onnxruntime/tensorrt; empty = a per-model cache folder (exported on first use)"),
        Parameter("num_threads", 0, "CPU threads for inference; 0 = library default", range=(0, 256, 1)),
        Parameter("score_threshold", 0.0, "Publish a box only if its confidence is at least this", range=(0.0, 1.0, 0.0), runtime=True),
        Parameter("top_k", 1, "Candidates per utterance on csref/detections, best first (the head's best cells; near-duplicates left out)", range=(1, 100, 1), runtime=True),
    )),
    ("Camera", (
        Parameter("image_topic", "camera/image_raw", "sensor_msgs/Image topic (with image_transport=compressed: <topic>/compressed); relative names resolve in the node's namespace"),
        Parameter("image_transport", "raw", "raw: sensor_msgs/Image; compressed: sensor_msgs/CompressedImage (jpeg/png)", choices=("raw", "compressed")),
        Parameter("image_qos_reliability", "best_effort", "Image subscription reliability (best_effort = sensor data QoS)", choices=("best_effort", "reliable")),
        Parameter("image_qos_depth", 5, "Image subscription queue depth", range=(1, 100, 1)),
        Parameter("max_image_pixels", DEFAULT_MAX_PIXELS, "Larger images are rejected (counted in diagnostics)", range=(1, 1_000_000_000, 1), runtime=True),
        Parameter("image_timeout_s", 2.0, "If no image arrives for this long, diagnose the topic (publishers, their QoS) and warn", range=(0.1, 600.0, 0.0)),
        Parameter("image_qos_adapt", True, "When no image arrives, resubscribe with the publishers' reliability and durability"),
        Parameter("frame_history_s", 3.0, "How far back camera frames are kept for pairing with utterances", range=(0.1, 60.0, 0.0)),
        Parameter("frame_history_rate_hz", 10.0, "Frames kept per second of history (the newest frame is always kept)", range=(0.5, 240.0, 0.0)),
    )),
    ("Depth: the target in 3D", (
        Parameter("use_depth", False, "Subscribe to aligned depth + camera_info and publish csref/target_3d and csref/target_point"),
        Parameter("depth_topic", "camera/aligned_depth_to_color/image_raw", "Depth image aligned to the colour image: 16UC1 (mm) or 32FC1 (m)"),
        Parameter("depth_info_topic", "camera/aligned_depth_to_color/camera_info", "sensor_msgs/CameraInfo of the depth image (its K is used)"),
        Parameter("depth_min_m", 0.1, "Nearer depths are holes (the sensor's minimum range)", range=(0.0, 100.0, 0.0), runtime=True),
        Parameter("depth_max_m", 10.0, "Farther depths are holes", range=(0.01, 1000.0, 0.0), runtime=True),
        Parameter("depth_sync_tolerance_s", 0.05, "Largest stamp difference between the colour frame used and its depth frame", range=(0.0, 5.0, 0.0), runtime=True),
        Parameter("target_frame", "", "Publish 3D output in this tf2 frame (needs tf2_ros); empty = the depth image's optical frame"),
    )),
    ("Audio", (
        Parameter("audio_source", "microphone", "Where speech comes from (topic: audio_common_msgs/AudioStamped on audio_topic)", choices=("microphone", "file", "topic")),
        Parameter("audio_topic", "audio", "audio_common_msgs/AudioStamped topic for audio_source=topic (relative: inside the node's namespace); any rate, channels and sample format"),
        Parameter("audio_topic_depth", 100, "Queue depth of the audio subscription (sensor data QoS otherwise): messages that may wait while the node is busy", range=(1, 10_000, 1)),
        Parameter("audio_file", "", "WAV/FLAC file for audio_source=file, played in real time once images arrive"),
        Parameter("audio_loop", False, "Play audio_file again and again"),
        Parameter("audio_device", "", "Microphone: PortAudio device index or part of its name; empty = system default"),
        Parameter("audio_sample_rate", 0, "Microphone capture rate in Hz; 0 = the device default (resampled to 16 kHz)", range=(0, 384_000, 1)),
        Parameter("audio_channels", 1, "Microphone channels (averaged to mono)", range=(1, 64, 1)),
    )),
    ("Voice activity detection (python -m csref_ros.vad uses the same defaults)", (
        Parameter("vad_backend", VAD_DEFAULTS.backend, "Speech/non-speech frame classifier: the Silero VAD network on onnxruntime or webrtcvad (docs/ROS.md compares them)", choices=VAD_BACKENDS, runtime=True),
        Parameter("vad_aggressiveness", VAD_DEFAULTS.aggressiveness, "webrtc backend: webrtcvad mode 0 permissive .. 3 strict", range=(0, 3, 1), runtime=True),
        Parameter("vad_silero_threshold", VAD_DEFAULTS.silero_threshold, "silero backend: speech probability from which a frame is speech", range=(0.01, 0.99, 0.0), runtime=True),
        Parameter("vad_frame_ms", VAD_DEFAULTS.frame_ms, "VAD frame length in ms", choices=FRAME_MS_CHOICES, runtime=True),
        Parameter("vad_start_window_ms", VAD_DEFAULTS.start_window_ms, "Window in which start_ratio of frames must be voiced to start an utterance", range=(10, 5000, 1), runtime=True),
        Parameter("vad_start_ratio", VAD_DEFAULTS.start_ratio, "Voiced fraction of the start window that starts an utterance", range=(0.05, 1.0, 0.0), runtime=True),
        Parameter("vad_hangover_ms", VAD_DEFAULTS.hangover_ms, "Silence that ends an utterance (end_ratio of its frames unvoiced)", range=(10, 5000, 1), runtime=True),
        Parameter("vad_end_ratio", VAD_DEFAULTS.end_ratio, "Unvoiced fraction of the hangover window that ends an utterance", range=(0.05, 1.0, 0.0), runtime=True),
        Parameter("vad_preroll_ms", VAD_DEFAULTS.preroll_ms, "Audio kept before the detected start of speech", range=(0, 5000, 1), runtime=True),
        Parameter("vad_postroll_ms", VAD_DEFAULTS.postroll_ms, "Audio kept after the end of speech (at most vad_hangover_ms)", range=(0, 5000, 1), runtime=True),
        Parameter("vad_min_utterance_s", VAD_DEFAULTS.min_utterance_s, "Shorter speech is ignored (clicks, coughs)", range=(0.0, 10.0, 0.0), runtime=True),
        Parameter("vad_max_utterance_s", VAD_DEFAULTS.max_utterance_s, "Longer speech is cut here and grounded", range=(0.5, 120.0, 0.0), runtime=True),
        Parameter("vad_energy_margin_db", VAD_DEFAULTS.energy_margin_db, "Voiced frames must be this far above the noise floor (keeps fans and quieter background talkers out)", range=(0.0, 60.0, 0.0), runtime=True),
    )),
    ("Pairing speech with a camera frame", (
        Parameter("frame_selection", "end", "Frame paired with an utterance: at its end, at its start, or the latest", choices=FRAME_CHOICES, runtime=True),
        Parameter("max_frame_age_s", 5.0, "A frame farther than this from the chosen time is not used (the utterance waits for a new one)", range=(0.01, 60.0, 0.0), runtime=True),
        Parameter("precomputed_frame_tolerance_s", 0.3, "Use image features computed during speech if their frame is this close to the chosen one", range=(0.0, 10.0, 0.0), runtime=True),
    )),
    ("Spoken answer (Im2Sp): the robot says which object it chose", (
        Parameter("answer_directory", "", "Answer model directory (python -m csref_training.im2sp bundle): after each box, the answer as audio on csref/answer_audio and its text on csref/answer_text; empty = off"),
        Parameter("answer_play", False, "Also play each answer on the default sound output (sounddevice)", runtime=True),
    )),
    ("Best view (ResDAVEnet-VQ): which recent frame shows what was said", (
        Parameter("best_view_checkpoint", "", "Speech-image retrieval checkpoint (python -m csref_training.davenet): after each utterance, the recent frames are ranked by it and the best goes out on csref/best_view; empty = off"),
        Parameter("best_view_spacing_s", 1.0, "Frames compared: the kept frames at least this far apart, over frame_history_s", range=(0.05, 60.0, 0.0), runtime=True),
    )),
    ("Output and operation", (
        Parameter("publish_debug_image", False, "Publish the image with the box (and mask) drawn on csref/debug_image", runtime=True),
        Parameter("publish_mask", False, "With a model that has a mask head: the target's mask as mono8 (0/255) at camera resolution on csref/target_mask, with the Detection2D's header", runtime=True),
        Parameter("max_pending_utterances", 2, "Utterances waiting for inference; when full the oldest is dropped (counted)", range=(1, 64, 1)),
        Parameter("diagnostics_period_s", 1.0, "Period of /diagnostics messages", range=(0.1, 60.0, 0.0)),
        Parameter("autostart", True, "Configure and activate on start-up (otherwise wait for lifecycle transitions)"),
    )),
)
PARAMETERS = tuple(parameter for _, section in PARAMETER_SECTIONS for parameter in section)
PARAMETERS_BY_NAME = {parameter.name: parameter for parameter in PARAMETERS}


def check_value(name: str, value: Any) -> str | None:
    """Why `value` is not acceptable for parameter `name`, or None. (Ranges are also enforced by rclpy.)"""
    parameter = PARAMETERS_BY_NAME.get(name)
    if parameter is None:
        return None
    if isinstance(parameter.default, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{name} must be a number; got {value!r}"
    if parameter.choices and value not in parameter.choices:
        return f"{name} must be one of {', '.join(map(str, parameter.choices))}; got {value!r}"
    if parameter.range is not None and not parameter.range[0] <= value <= parameter.range[1]:
        return f"{name} must be in [{parameter.range[0]}, {parameter.range[1]}]; got {value!r}"
    return None


def vad_config_from(values: dict[str, Any]) -> VadConfig:
    """VadConfig from vad_* parameter values (ValueError with the reason if inconsistent)."""
    return VadConfig(**{name[len("vad_"):]: value for name, value in values.items() if name.startswith("vad_")})



REPO_ROOT = Path(__file__).resolve().parent.parent
# README.md's short table: the parameters most people set.
MOST_USED = ("model_checkpoint", "model_config", "backend", "device", "precision", "image_topic", "image_transport",
             "image_qos_reliability", "audio_source", "audio_file", "audio_device", "frame_selection", "score_threshold")
TABLE_BEGIN = "<!-- parameter table: generated by python -m csref_ros.parameters --write -->"
TABLE_END = "<!-- end of parameter table -->"


def yaml_value(value: Any) -> str:
    return json.dumps(value)  # JSON scalars are YAML: "text", true, 0.3


def render_yaml() -> str:
    """config/grounding.yaml: every parameter with its default, by section."""
    lines = [
        "# Parameters of the csref_ros grounding node, generated from csref_ros/parameters.py",
        "# (python -m csref_ros.parameters --write); descriptions and ranges there and in",
        "# `ros2 param describe`. Used by launch/grounding.launch.py; start the node by hand with:",
        "# --ros-args --params-file config/grounding.yaml",
        "/**:",
        "  ros__parameters:",
    ]
    for title, section in PARAMETER_SECTIONS:
        lines.append(f"    # {title}")
        lines += [f"    {parameter.name}: {yaml_value(parameter.default)}" for parameter in section]
    return "\n".join(lines) + "\n"


def meaning(parameter: Parameter) -> str:
    parts = [parameter.description]
    if parameter.choices:
        parts.append("one of " + ", ".join(f"`{choice}`" for choice in parameter.choices))
    if parameter.range is not None:
        parts.append(f"range [{parameter.range[0]:g}, {parameter.range[1]:g}]")
    parts.append("changeable at run time" if parameter.runtime else "applies at next configure/activate")
    return "; ".join(parts).replace("|", "\\|")


def render_table(names: tuple[str, ...]) -> str:
    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    rows += [f"| `{name}` | `{yaml_value(PARAMETERS_BY_NAME[name].default)}` | {meaning(PARAMETERS_BY_NAME[name])} |" for name in names]
    return "\n".join(rows)


def with_table(document: str, table: str, path: Path) -> str:
    """`document` with the text between the table markers replaced by `table`."""
    if document.count(TABLE_BEGIN) != 1 or document.count(TABLE_END) != 1:
        raise ValueError(f"{path} needs exactly one '{TABLE_BEGIN}' and one '{TABLE_END}' line around its parameter table")
    head, rest = document.split(TABLE_BEGIN)
    return f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{rest.split(TABLE_END)[1]}"


def generated_files(root: Path = REPO_ROOT) -> dict[Path, str]:
    """Each generated file -> the content it must have."""
    ros_doc, readme = root / "docs" / "ROS.md", root / "README.md"
    return {
        root / "config" / "grounding.yaml": render_yaml(),
        ros_doc: with_table(ros_doc.read_text(), render_table(tuple(PARAMETERS_BY_NAME)), ros_doc),
        readme: with_table(readme.read_text(), render_table(MOST_USED), readme),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m csref_ros.parameters", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite config/grounding.yaml and the docs' tables")
    action.add_argument("--check", action="store_true", help="exit 1 if any of them differs from the table")
    args = parser.parse_args()
    stale = [path for path, content in generated_files().items() if path.read_text() != content]
    if args.write:
        for path, content in generated_files().items():
            path.write_text(content)
        print("\n".join(f"rewrote {path}" for path in stale) or "all up to date")
    elif stale:
        parser.exit(1, "out of date (run python -m csref_ros.parameters --write): " + ", ".join(map(str, stale)) + "\n")


if __name__ == "__main__":
    main()
