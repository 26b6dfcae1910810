"""scripts/train_weak_supervision.sh end to end on tiny data, one epoch of two steps per trainer: every
stage's command line still fits its trainer and the next stage finds the files it needs."""

import json
import os
import subprocess
import sys
from pathlib import Path

from csref_training.spoken_shapes.generate import SynthConfig, generate_dataset

REPO = Path(__file__).resolve().parents[1]
VOICES = ("en-us+m3", "en-gb+f2")


def test_weak_supervision_script_runs_every_stage(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    # The script generates data only where none exists: these stand in for its 8000 + 3000 scenes.
    # Square images: an untrained detector's chosen cell may lie in the letterbox padding, and a
    # pseudo-label outside the image is dropped, which could leave SREC less than one batch.
    generate_dataset(SynthConfig(out=data / "shapes", seed=5, voices=VOICES, overspecify_prob=0.5,
                                 image_size_range=(320, 320)), {"train": 8, "val": 4, "test": 4})
    generate_dataset(SynthConfig(out=data / "detector", seed=1000, voices=VOICES), {"train": 8, "val": 4, "test": 0})
    env = {**os.environ, "PY": sys.executable, "DATA": str(data), "RUNS": str(runs), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        ["bash", "scripts/train_weak_supervision.sh", "epochs=1", "batch_size=4", "eval_batch_size=4",
         "data.num_workers=0", "multi_scale.enabled=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    for stage in ("detector256", "detector416", "detector", "csa", "refclip", "srec_pseudo", "srec_full"):
        assert (runs / stage / "best" / "model.safetensors").is_file(), stage
    refclip_test = json.loads((runs / "refclip" / "eval_test.json").read_text())
    assert 0.0 <= refclip_test["acc_50"] <= 1.0 and refclip_test["count"] == 4
    labels = json.loads((runs / "refclip" / "pseudo_labels.json").read_text())
    assert labels["train"]["entries"] == 8 and 0.0 <= labels["train"]["pseudo_label_acc_50"] <= 1.0
    pseudo = json.loads((data / "pseudo" / "anns" / "spoken_shapes.json").read_text())
    assert len(pseudo["train"]) == 8 and all(entry["pseudo"] for entry in pseudo["train"])
    for student in ("srec_pseudo", "srec_full"):
        metrics = json.loads((runs / student / "eval_test.json").read_text())
        assert 0.0 <= metrics["splits"]["test"]["acc_50"] <= 1.0, (student, metrics)
