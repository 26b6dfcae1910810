"""Running real ROS 2 processes from tests: a private domain id (the `ros_env` fixture of
conftest.py), loopback only, our DDS profile."""

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = Path(__file__).resolve().parent / "programs"
FASTDDS_PROFILE = REPO_ROOT / "config" / "fastdds_loopback.xml"
# Domain ids up to 101 keep Fast DDS ports below the ephemeral range; 90..101 are left to
# scripts (scripts/benchmark_node.py) so that they never meet a test.
DOMAIN_IDS = range(1, 90)
# The frames the test camera programs publish.
WIDTH, HEIGHT = 640, 480


def start_program(name: str, args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start tests/programs/<name>.py with its output in log_path."""
    log = open(log_path, "w")
    return subprocess.Popen(
        [sys.executable, str(PROGRAMS / f"{name}.py"), *args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
    )


def stop(process: subprocess.Popen, timeout: float = 10.0) -> int:
    """Ask a ROS process to stop (SIGINT, like Ctrl-C), kill it if it does not."""
    if process.poll() is None:
        process.send_signal(2)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def ros_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def start_node(parameters: dict, env: dict[str, str], log_path: Path, name: str = "grounding_node") -> subprocess.Popen:
    """`python -m csref_ros.grounding_node --ros-args -p k:=v ...`, exactly as a user starts it."""
    command = [sys.executable, "-m", "csref_ros.grounding_node", "--ros-args", "-r", f"__node:={name}"]
    for key, value in parameters.items():
        command += ["-p", f"{key}:={ros_value(value)}"]
    log = open(log_path, "w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)


def json_lines(log_path: Path) -> list[dict]:
    """The JSON objects a test program printed, one per line (other lines skipped)."""
    objects = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            objects.append(json.loads(line))
    return objects


@functools.cache
def load_demo_script():
    """scripts/demo.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("csref_demo_script", REPO_ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def assert_box_inside_image(detection: dict, width: int = WIDTH, height: int = HEIGHT) -> None:
    """A Detection2D (as a test program printed it) lies in the image and has a score in [0, 1]."""
    (cx, cy), (w, h) = detection["center"], detection["size"]
    assert 0 <= cx - w / 2 - 1e-3 and cx + w / 2 <= width + 1e-3, detection
    assert 0 <= cy - h / 2 - 1e-3 and cy + h / 2 <= height + 1e-3, detection
    assert 0.0 <= detection["score"] <= 1.0
