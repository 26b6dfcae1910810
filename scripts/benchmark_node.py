"""Load benchmark of the grounding node: 1280x720 frames at 60 Hz plus continuous speech.

    .venv/bin/python scripts/benchmark_node.py --random-model tiny --minutes 5
    .venv/bin/python scripts/benchmark_node.py --checkpoint runs/demo --minutes 5

Starts the node in its own process (audio_source=file, a looped WAV of spoken commands separated
by pauses), publishes camera frames from this process, and prints: end-of-speech-to-publish
latency percentiles (from the node's /diagnostics), boxes received, utterances and frames
dropped, and the node's memory (RSS) at the start and the end. Runs on loopback only, with its own
ROS domain id and the shared-memory Fast DDS profile.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from csref_ros.loopback import loopback_environment

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    ("pick up the red cup on the left", "en-us+m3"),
    ("the small blue square", "en-gb+f2"),
    ("grab the big yellow star at the top", "en-us+f4"),
    ("where is the green triangle", "en-gb-scotland+m1"),
    ("give me the black cross in the middle", "en-029+m5"),
    ("point at the white circle on the right", "en-us-nyc+f3"),
]
SAMPLE_RATE = 16000


def speech_file(path: Path, pause_s: float) -> int:
    """WAV of the commands separated by pauses; returns the number of commands."""
    import io

    import soundfile
    import soxr

    parts = []
    for text, voice in COMMANDS:
        wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True).stdout
        wave, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
        parts += [soxr.resample(wave, rate, SAMPLE_RATE), np.zeros(int(pause_s * SAMPLE_RATE), np.float32)]
    soundfile.write(path, np.concatenate(parts), SAMPLE_RATE)
    return len(COMMANDS)


def random_checkpoint(name: str, directory: Path) -> Path:
    import torch

    from csref_model.checkpoint import save_checkpoint
    from csref_model.config import load_model_config
    from csref_model.srec import build_srec

    torch.manual_seed(0)
    config = load_model_config(name)
    return save_checkpoint(directory / f"random_{name}", build_srec(config, load_pretrained=False), config)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_until_active(node: subprocess.Popen, diagnostics: dict[str, str], log_path: Path) -> None:
    """Until the node's /diagnostics (collected into `diagnostics`) say it is active; exit if it dies or takes 5 min."""
    print(f"waiting for the node to be active (log: {log_path}) ...", flush=True)
    deadline = time.monotonic() + 300
    while diagnostics.get("state") != "active":
        if node.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the node did not become active; see {log_path}")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="checkpoint directory or .pth")
    model.add_argument("--random-model", choices=["tiny", "base"], help="randomly initialised model of this size")
    parser.add_argument("--model-config", default="", help="model config for an official .pth")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=60.0, help="camera frames per second")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--pause-s", type=float, default=1.5, help="silence between commands")
    parser.add_argument("--threads", type=int, default=0, help="node inference threads (0 = default)")
    parser.add_argument("--domain-id", type=int, default=90 + os.getpid() % 10, help="90..101 never meet the tests")
    args = parser.parse_args()

    os.environ.update(loopback_environment(args.domain_id, REPO_ROOT / "config" / "fastdds_loopback.xml"))
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from vision_msgs.msg import Detection2D

    from csref_ros.image_conversion import fill_image

    work = Path(tempfile.mkdtemp(prefix="csref_benchmark_"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(args.random_model, work)
    commands = speech_file(work / "speech.wav", args.pause_s)
    node_log = open(work / "node.log", "w")
    node_command = [
        sys.executable, "-m", "csref_ros.grounding_node", "--ros-args",
        "-p", f"model_checkpoint:={checkpoint}", "-p", f"model_config:='{args.model_config}'",
        "-p", f"backend:={args.backend}", "-p", f"num_threads:={args.threads}",
        "-p", "audio_source:=file", "-p", f"audio_file:={work / 'speech.wav'}", "-p", "audio_loop:=true",
        "-p", "image_topic:=/benchmark/image",
    ]
    node = subprocess.Popen(node_command, stdout=node_log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    rclpy.init()
    client = rclpy.create_node("benchmark_driver")
    publisher = client.create_publisher(Image, "/benchmark/image", qos_profile_sensor_data)
    frame = Image()
    rng = np.random.default_rng(0)
    fill_image(frame, rng.integers(0, 256, size=(args.height, args.width, 3), dtype=np.uint8), "rgb8")
    frame.header.frame_id = "benchmark_camera"
    boxes: list[float] = []
    diagnostics: dict[str, str] = {}
    published = [0]

    def publish_frame() -> None:
        frame.header.stamp = client.get_clock().now().to_msg()
        publisher.publish(frame)
        published[0] += 1

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if "speech grounding" in status.name:
                diagnostics.update({kv.key: kv.value for kv in status.values})

    client.create_subscription(Detection2D, "/csref/target_box", lambda msg: boxes.append(time.time()), 10)
    client.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    executor = SingleThreadedExecutor()
    executor.add_node(client)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    wait_until_active(node, diagnostics, work / "node.log")
    timer = client.create_timer(1.0 / args.rate, publish_frame)
    started = time.monotonic()
    memory = [(0.0, rss_mb(node.pid))]
    while time.monotonic() - started < args.minutes * 60:
        time.sleep(5.0)
        memory.append((time.monotonic() - started, rss_mb(node.pid)))
        print(
            f"{memory[-1][0]:6.0f} s  frames sent {published[0]}  received by node {diagnostics.get('images')}  "
            f"boxes {len(boxes)}  latency p50/p95 {diagnostics.get('latency_end_of_speech_to_publish_p50_ms')}/"
            f"{diagnostics.get('latency_end_of_speech_to_publish_p95_ms')} ms  RSS {memory[-1][1]:.0f} MB",
            flush=True,
        )
    client.destroy_timer(timer)
    time.sleep(2.0)  # last diagnostics
    node.send_signal(2)
    node.wait(timeout=30)
    executor.shutdown()
    client.destroy_node()
    rclpy.try_shutdown()

    settled = [rss for t, rss in memory if t >= 60.0] or [memory[-1][1]]
    summary = {
        "model": str(checkpoint),
        "backend": diagnostics.get("backend"),
        "seconds": round(memory[-1][0]),
        "camera": f"{args.width}x{args.height} rgb8 at {args.rate:g} Hz",
        "frames_sent": published[0],
        "frames_received_by_node": int(diagnostics.get("images", 0)),
        "frames_reported_lost": int(diagnostics.get("images_lost", 0)),
        "commands_per_pass": commands,
        "utterances": int(diagnostics.get("utterances", 0)),
        "boxes_received": len(boxes),
        "utterances_dropped_queue_full": int(diagnostics.get("utterances_dropped_queue_full", 0)),
        "utterances_without_frame": int(diagnostics.get("utterances_without_frame", 0)),
        "inference_errors": int(diagnostics.get("inference_errors", 0)),
        "latency_end_of_speech_to_publish_ms": {
            "p50": diagnostics.get("latency_end_of_speech_to_publish_p50_ms"),
            "p95": diagnostics.get("latency_end_of_speech_to_publish_p95_ms"),
        },
        "processing_after_utterance_ms": {
            "p50": diagnostics.get("processing_after_utterance_p50_ms"),
            "p95": diagnostics.get("processing_after_utterance_p95_ms"),
        },
        "precomputed_image_features_used": int(diagnostics.get("precomputed_used", 0)),
        "speech_encoded_ahead_used": int(diagnostics.get("speech_ahead_used", 0)),
        "node_rss_mb": {"start": round(memory[0][1]), "after_1_min": round(settled[0]), "end": round(memory[-1][1])},
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
