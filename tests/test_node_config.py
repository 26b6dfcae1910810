"""The node's parameter table, config/grounding.yaml and the launch file agree with each other."""

import ast
import re
from pathlib import Path

import yaml

from csref_ros.parameters import PARAMETERS, PARAMETERS_BY_NAME, check_value

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_grounding_yaml_holds_every_parameter_with_its_default():
    content = yaml.safe_load((REPO_ROOT / "config" / "grounding.yaml").read_text())
    values = content["/**"]["ros__parameters"]
    assert list(values) == [spec.name for spec in PARAMETERS]
    for spec in PARAMETERS:
        assert values[spec.name] == spec.default and type(values[spec.name]) is type(spec.default), spec.name


def test_every_parameter_is_described_and_its_default_is_valid():
    for spec in PARAMETERS:
        assert len(spec.description) > 15, spec.name
        assert check_value(spec.name, spec.default) is None, spec.name


def test_checks_give_reasons():
    assert check_value("vad_frame_ms", 25) == "vad_frame_ms must be one of 10, 20, 30; got 25"
    assert check_value("max_frame_age_s", 100.0) == "max_frame_age_s must be in [0.01, 60.0]; got 100.0"
    assert check_value("max_frame_age_s", "soon") == "max_frame_age_s must be a number; got 'soon'"
    assert check_value("max_frame_age_s", 5) is None  # an integer is fine for a float parameter


def test_launch_file_matches_the_node_and_the_package():
    source = (REPO_ROOT / "launch" / "grounding.launch.py").read_text()
    tree = ast.parse(source)
    imported = {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"launch", "launch_ros"}
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    arguments = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and node.targets[0].id == "PARAMETER_ARGUMENTS"
    )
    assert {"image_topic", "model_checkpoint", "backend"} <= set(arguments) <= set(PARAMETERS_BY_NAME)
    assert 'DeclareLaunchArgument("namespace"' in source and '"params_file"' in source
    assert 'executable="grounding_node"' in source

    setup = (REPO_ROOT / "setup.py").read_text()
    assert re.search(r'"grounding_node = csref_ros\.grounding_node:main"', setup)
    assert 'glob("launch/*.launch.py")' in setup and 'glob("config/*.yaml")' in setup
    package = (REPO_ROOT / "package.xml").read_text()
    for dependency in ("rclpy", "launch_ros", "vision_msgs", "sensor_msgs", "diagnostic_msgs", "lifecycle_msgs"):
        assert f"<exec_depend>{dependency}</exec_depend>" in package


def test_ros_doc_lists_every_parameter():
    doc = (REPO_ROOT / "docs" / "ROS.md").read_text()
    missing = [spec.name for spec in PARAMETERS if f"`{spec.name}`" not in doc]
    assert missing == [], f"docs/ROS.md does not describe {missing}"


def documented_defaults(path: Path) -> dict[str, object]:
    """Parameter name -> default from the Markdown table rows "| `a`, `b` | `x`, `y` | ..." of a
    document; rows whose second cell does not give one backticked value per name are skipped."""
    defaults = {}
    for line in path.read_text().splitlines():
        cells = line.split("|")
        if len(cells) < 4 or not cells[1].strip().startswith("`"):
            continue
        names = re.findall(r"`([a-z_0-9]+)`", cells[1])
        values = re.findall(r"`([^`]*)`", cells[2])
        if names and len(names) == len(values) and all(name in PARAMETERS_BY_NAME for name in names):
            defaults.update({name: yaml.safe_load(value) for name, value in zip(names, values)})
    return defaults


def test_documented_defaults_match_the_parameter_table():
    ros_doc = documented_defaults(REPO_ROOT / "docs" / "ROS.md")
    assert set(ros_doc) == set(PARAMETERS_BY_NAME), "docs/ROS.md's table must list every parameter"
    readme = documented_defaults(REPO_ROOT / "README.md")
    assert len(readme) >= 10, "README.md's parameter table was not found"
    for source, defaults in (("docs/ROS.md", ros_doc), ("README.md", readme)):
        wrong = {name: value for name, value in defaults.items()
                 if value != PARAMETERS_BY_NAME[name].default}
        assert wrong == {}, f"{source} gives defaults that csref_ros/parameters.py does not: {wrong}"
