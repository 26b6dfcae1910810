"""The committed demo model in the node: an unseen Spoken Shapes scene and command, a held-out
voice, and the box published on csref/target_box must be the spoken target (IoU > 0.5)."""

from pathlib import Path

import numpy as np
import pytest

from csref_model.boxes import box_iou
from csref_training.spoken_shapes.generate import SynthConfig, generate_sample
from csref_training.spoken_shapes.speech import HELDOUT_VOICES
from ros_support import REPO_ROOT, json_lines, start_node, start_program, stop

DEMO_MODEL = REPO_ROOT / "models" / "spoken_shapes_tiny"
# Seeds of the generator never used for training or evaluation data.
UNSEEN_SEED = 20261122


@pytest.fixture
def unseen_sample(tmp_path) -> tuple[Path, Path, tuple[float, ...], str]:
    """(image file, WAV file, target box x1 y1 x2 y2, spoken text) of a freshly generated sample."""
    config = SynthConfig(out=tmp_path / "scene", seed=UNSEEN_SEED, voices=HELDOUT_VOICES, noise_prob=0.0)
    (config.out / "images").mkdir(parents=True)
    (entry,) = generate_sample(config, "test", 0, iid=1)
    ref = entry["refs"][0]
    x, y, w, h = entry["bbox"]
    wav = config.out / "audios" / config.dataset_name / ref["speaker"] / f"{ref['sent_id']}.wav"
    return config.out / "images" / f"{entry['iid']:012d}.jpg", wav, (x, y, x + w, y + h), ref["sent"]


def test_demo_model_finds_the_spoken_target(tmp_path, ros_env, unseen_sample):
    image, wav, target, text = unseen_sample
    listener = start_program("detection_listener", ["--count", "1", "--timeout", "120"], ros_env, tmp_path / "listener.log")
    node = start_node(
        {"model_checkpoint": DEMO_MODEL, "audio_source": "file", "audio_file": wav, "image_topic": "/demo/image"},
        ros_env,
        tmp_path / "node.log",
    )
    camera = start_program("image_publisher", ["--topic", "/demo/image", "--scene", str(image), "--rate", "10"], ros_env, tmp_path / "camera.log")
    try:
        listener.wait(timeout=180)
    finally:
        stop(camera)
        stop(node)
        stop(listener)
    detections = [line for line in json_lines(tmp_path / "listener.log") if "id" in line]
    assert len(detections) == 1, (tmp_path / "node.log").read_text()
    (cx, cy), (w, h) = detections[0]["center"], detections[0]["size"]
    box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    assert box_iou(np.asarray(box), np.asarray(target)) > 0.5, f"'{text}': box {box}, target {target}"
