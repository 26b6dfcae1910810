"""`make demo` end to end (the Makefile target, the node in its own process, real rclpy, espeak-ng
speech), the demo's scenes for a given TEXT, and the README's commands against the Makefile.

The demo runs on its default model, the committed models/spoken_shapes_tiny, and the box must
match the spoken target (tests/test_demo_model.py checks another unseen scene without make).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile

from csref_model.boxes import box_iou
from ros_support import REPO_ROOT, load_demo_script
from speech_support import SAMPLE_RATE, espeak_16k, speech_with_pauses

DEMO_MODEL = REPO_ROOT / "models" / "spoken_shapes_tiny"


def make_demo(*variables: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`make demo VAR=value ...` as a user types it; `-o setup`: the venv and apt packages this
    test runs in are what `setup` makes, so make is told not to redo them."""
    return subprocess.run(
        ["make", "--no-print-directory", "-o", "setup", "demo", *variables],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )


def printed_box(stdout: str) -> tuple[float, float, float, float]:
    match = re.search(r"^box +x1=(-?\d+) y1=(-?\d+) x2=(-?\d+) y2=(-?\d+) .* score (\d\.\d\d)$", stdout, re.MULTILINE)
    assert match, stdout
    return tuple(float(v) for v in match.groups()[:4])


def assert_png(path: Path, min_width: int, min_height: int) -> None:
    picture = cv2.imread(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture is not None, path
    assert picture.shape[1] >= min_width and picture.shape[0] > min_height, picture.shape


def test_make_demo_prints_the_spoken_objects_box_and_draws_it(tmp_path):
    out = tmp_path / "demo"
    run = make_demo(f"DEMO_OUT={out}")
    assert run.returncode == 0, run.stdout + run.stderr
    scene = cv2.imread(str(out / "scene.png"))
    height, width = scene.shape[:2]
    x1, y1, x2, y2 = printed_box(run.stdout)
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, (x1, y1, x2, y2, width, height)
    assert re.search(r'^said +".+" \(voice en-[^ ]+\+\w+, \d\.\d s of speech\)$', run.stdout, re.MULTILINE), run.stdout
    assert re.search(r"^latency +\d+ ms from the end of speech", run.stdout, re.MULTILINE), run.stdout
    assert f"picture  {out / 'annotated.png'}" in run.stdout
    assert_png(out / "annotated.png", width, height)

    result = json.loads((out / "result.json").read_text())
    demo = load_demo_script()
    assert result["voice"] in demo.HELDOUT_VOICES  # a voice the model did not train on
    assert result["iou"] == pytest.approx(float(box_iou(np.asarray(result["box_xyxy"]), np.asarray(result["target_xyxy"]))))
    assert result["match"] and result["iou"] > 0.5, run.stdout
    # The demo model has a mask head, so the node published the target's mask (publish_mask).
    assert re.search(r"^mask +\d+ px from /csref/target_mask$", run.stdout, re.MULTILINE), run.stdout
    x1, y1, x2, y2 = result["box_xyxy"]
    assert 0.15 * (x2 - x1) * (y2 - y1) < result["mask_pixels"] <= 1.5 * (x2 - x1) * (y2 - y1), result


def test_make_demo_on_your_own_image_and_wav(tmp_path):
    """A picture that is no Spoken Shapes scene (larger than the published size limit) and a
    recording: no ground truth, the box is printed in the original picture's pixels."""
    height, width = 1600, 2000
    picture = np.zeros((height, width, 3), np.uint8)
    picture[:] = np.linspace(40, 200, width, dtype=np.uint8)[None, :, None]
    cv2.circle(picture, (600, 900), 220, (30, 30, 220), -1)
    image_path = tmp_path / "photo.jpg"
    cv2.imwrite(str(image_path), picture)
    wave, _ = speech_with_pauses([espeak_16k("pick up the red circle")], [0.4, 1.0])
    audio_path = tmp_path / "command.wav"
    soundfile.write(audio_path, wave, SAMPLE_RATE)

    out = tmp_path / "demo"
    run = make_demo(f"CHECKPOINT={DEMO_MODEL}", f"IMAGE={image_path}", f"AUDIO={audio_path}", f"DEMO_OUT={out}")
    assert run.returncode == 0, run.stdout + run.stderr
    x1, y1, x2, y2 = printed_box(run.stdout)
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, (x1, y1, x2, y2)
    assert "(published at" in run.stdout and not re.search(r"^target ", run.stdout, re.MULTILINE)
    result = json.loads((out / "result.json").read_text())
    assert result["target_xyxy"] is None and result["match"] is None
    assert_png(out / "annotated.png", width, height)


def processes_mentioning(text: str) -> list[int]:
    """Ids of the processes whose command line contains `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue  # the process ended meanwhile
    return found


def test_demo_fails_when_no_box_comes_and_leaves_no_node_behind(tmp_path):
    """Silence is no command: no box within the timeout, exit status 1, the node is stopped."""
    cv2.imwrite(str(tmp_path / "room.png"), np.full((240, 320, 3), 90, np.uint8))
    silence = tmp_path / "silence.wav"
    soundfile.write(silence, np.zeros(2 * SAMPLE_RATE, np.float32), SAMPLE_RATE)
    run = subprocess.run(
        [sys.executable, "scripts/demo.py", "--checkpoint", str(DEMO_MODEL), "--image", str(tmp_path / "room.png"),
         "--audio", str(silence), "--out", str(tmp_path / "demo"), "--timeout", "6"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "no box on /csref/target_box within 6 s" in run.stderr
    assert processes_mentioning(str(silence)) == []  # the node had the WAV on its command line


def test_demo_refuses_bad_input_with_a_reason(tmp_path):
    run = make_demo(f"CHECKPOINT={tmp_path / 'nowhere'}", timeout=60)
    assert run.returncode != 0 and f"no model at {tmp_path / 'nowhere'}" in run.stderr
    assert "CHECKPOINT=" in run.stderr and "scripts/train_spoken_shapes.sh" in run.stderr
    run = make_demo(f"CHECKPOINT={DEMO_MODEL}", "TEXT=the red cup", f"DEMO_OUT={tmp_path / 'demo'}", timeout=60)
    assert run.returncode != 0 and "TEXT 'the red cup' is not a Spoken Shapes command. Say: " in run.stderr
    assert "bring your own picture: IMAGE=photo.jpg TEXT=..." in run.stderr
    demo = load_demo_script()
    with pytest.raises(SystemExit):
        demo.parse_args(["--audio", str(tmp_path / "x.wav")])  # a recording needs a picture


def makefile_targets() -> set[str]:
    """Targets in make's own database of the Makefile (`make -pRrq`: print, do nothing)."""
    database = subprocess.run(["make", "-pRrq", "-f", "Makefile", ":"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    targets, previous = set(), ""
    for line in database.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9_.-]*):(?!=)", line)
        if match and previous != "# Not a target:":
            targets.add(match.group(1))
        previous = line
    return targets


def test_readme_commands_are_makefile_targets():
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", readme, re.DOTALL)
    make_commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("make ")]
    named = {command.split()[1] for command in make_commands}
    assert {"test", "demo"} <= named, f"the README's commands: {make_commands}"
    targets = makefile_targets()
    assert {"test", "demo", "setup"} <= targets, targets
    assert named <= targets, f"README names make targets the Makefile lacks: {named - targets}"
