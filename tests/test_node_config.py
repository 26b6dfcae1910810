"""The node's parameter table, config/grounding.yaml, the docs' tables, the launch file and the diagnostics agree."""

import ast
import re
from pathlib import Path

import pytest
import yaml

from csref_ros.audio import AUDIO_SOURCE_COUNTERS
from csref_ros.audio_messages import AUDIO_TOPIC_COUNTERS
from csref_ros.diagnostics import grounding_status
from csref_ros.grounding_node import NODE_COUNTERS
from csref_ros.parameters import PARAMETERS, PARAMETERS_BY_NAME, TABLE_BEGIN, check_value, generated_files
from csref_ros.pipeline import PIPELINE_COUNTERS

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


def test_yaml_and_parameter_tables_are_generated_from_the_table():
    stale = [str(path) for path, content in generated_files().items() if path.read_text() != content]
    assert stale == [], f"run python -m csref_ros.parameters --write: {stale} differ from csref_ros/parameters.py"


def test_a_table_that_disagrees_is_found(tmp_path):
    for name in ("config", "docs"):
        (tmp_path / name).mkdir()
    for relative in ("docs/ROS.md", "README.md"):
        (tmp_path / relative).write_text((REPO_ROOT / relative).read_text())
    generated = generated_files(tmp_path)
    ros_doc = tmp_path / "docs" / "ROS.md"
    edited = ros_doc.read_text().replace("| `score_threshold` | `0.0` |", "| `score_threshold` | `0.5` |")
    assert edited != ros_doc.read_text()
    assert generated[ros_doc] != edited  # the generator restores the table's default
    ros_doc.write_text(TABLE_BEGIN + "\n| a table without its end marker |\n")
    with pytest.raises(ValueError, match="needs exactly one"):
        generated_files(tmp_path)


def test_every_counter_is_reported_and_documented():
    counters = [*NODE_COUNTERS, *PIPELINE_COUNTERS, *AUDIO_SOURCE_COUNTERS, *AUDIO_TOPIC_COUNTERS]
    assert len(set(counters)) == len(counters)
    status = grounding_status("grounding_node", "", True, True, 1.0, dict.fromkeys(counters, 7), [0.5], [0.1],
                              {"image_topic": "/camera"}, "")
    reported = {value.key: value.value for value in status.values}
    assert all(reported[name] == "7" for name in counters)
    doc = (REPO_ROOT / "docs" / "ROS.md").read_text()
    assert [name for name in counters if f"`{name}`" not in doc] == []
