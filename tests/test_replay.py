"""scripts/replay_load_test.py, briefly: camera, depth, camera_info and audio topics replayed from
files at real rate into the node in its own process; every spoken command must be accounted for."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_short_replay_answers_every_command_with_a_box_and_its_point(tmp_path, ros_env):
    summary_path = tmp_path / "summary.json"
    completed = subprocess.run(
        [sys.executable, "scripts/replay_load_test.py", "--recording", str(tmp_path / "recording"), "--scenes", "6",
         "--minutes", "0.4", "--json", str(summary_path), "--domain-id", ros_env["ROS_DOMAIN_ID"]],
        cwd=REPO, env=ros_env, capture_output=True, text=True, timeout=420,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    commands = summary["commands"]
    assert commands["spoken"] >= 4 and commands["lost"] == 0, summary
    assert commands["answered"] >= commands["spoken"] - 1, summary  # one may be in flight at the stop
    assert summary["node_counters"]["audio_messages_rejected"] == 0 and summary["node_counters"]["images_lost"] == 0
    assert summary["points_for_correct_boxes"] >= 1, summary
    # The depth of a correct box's centre is the slab's, so the point is the analytic one up to the box's error.
    assert summary["point_error_mm"]["max"] < 30.0, summary
    timeline = json.loads((tmp_path / "recording" / "timeline.json").read_text())
    assert len(timeline["scenes"]) == 6 and (tmp_path / "recording" / "audio.wav").is_file()
