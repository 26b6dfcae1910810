"""scripts/cross_engine_matrix.py on tiny generated test sets with two tiny trained runs: the matrix
has a row per run and a column per test set, and each cell is what `evaluate` reports."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from csref_training import evaluate
from csref_training.spoken_shapes.generate import SynthConfig, generate_dataset
from training_support import REPO, run_module, subprocess_env, write_config

SCRIPT = REPO / "scripts" / "cross_engine_matrix.py"


@pytest.fixture(scope="module")
def matrix_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict[str, Path]]:
    """Two runs of 2 steps (one augmented) on one voice set; two test sets with other voices."""
    base = tmp_path_factory.mktemp("matrix")
    train_root, clean_root, noisy_root = base / "train", base / "clean", base / "noisy"
    generate_dataset(SynthConfig(out=train_root, seed=1, voices=("en-us+m3",)), {"train": 8, "val": 2})
    generate_dataset(SynthConfig(out=clean_root, seed=2, voices=("en-gb+f2",), noise_prob=0.0), {"test": 5})
    generate_dataset(SynthConfig(out=noisy_root, seed=3, voices=("en-029",), noise_prob=1.0,
                                 snr_db_range=(5.0, 10.0)), {"test": 3})
    runs = {}
    for label, overrides in (("en-us", ()), ("en-us, augmented", ("augment.enabled=true",))):
        output_dir = base / f"run{len(runs)}"
        config = write_config(base / f"run{len(runs)}.yaml", train_root, output_dir, max_steps=2)
        run_module("csref_training.srec", config, *overrides)
        runs[label] = output_dir / "last"
    return runs, {"en-gb clean": clean_root, "en-029 5-10 dB": noisy_root}


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=subprocess_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_matrix_rows_are_runs_columns_are_test_sets(matrix_inputs, tmp_path: Path) -> None:
    runs, tests = matrix_inputs
    args = [f"--run={label}={path}" for label, path in runs.items()]
    args += [f"--test={label}={path}" for label, path in tests.items()]
    result = run_script(*args, "--json", str(tmp_path / "m.json"), "--markdown", str(tmp_path / "m.md"))
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "m.md").read_text()
    assert table in result.stdout
    lines = table.splitlines()
    assert lines[0] == "| training \\ test | en-gb clean | en-029 5-10 dB |"
    assert lines[1] == "| --- | --- | --- |"
    assert [line.split(" | ")[0] for line in lines[2:4]] == ["| en-us", "| en-us, augmented"]
    assert "samples per test set: en-gb clean: 5, en-029 5-10 dB: 3." in table

    cells = json.loads((tmp_path / "m.json").read_text())["cells"]
    assert [(c["run"], c["test"]) for c in cells] == [(r, t) for r in runs for t in tests]
    for row, run in enumerate(runs):
        shown = re.findall(r"\d\.\d{3}", lines[2 + row])
        for column, test in enumerate(tests):
            # The same numbers as evaluate's own command line on that pair.
            direct = evaluate.main(["--checkpoint", str(runs[run]), "--data-root", str(tests[test]),
                                    "--dataset", "spoken_shapes", "--splits", "test", "--num-workers", "0",
                                    "--device", "cpu"])["splits"]["test"]
            cell = next(c for c in cells if c["run"] == run and c["test"] == test)
            assert cell["acc_50"] == direct["acc_50"] and cell["mean_iou"] == pytest.approx(direct["mean_iou"])
            assert shown[column] == f"{direct['acc_50']:.3f}"


def test_labels_need_a_path_and_must_be_distinct(tmp_path: Path) -> None:
    result = run_script("--run", "runs/x", "--test", f"a={tmp_path}")
    assert result.returncode == 2 and "expected LABEL=PATH" in result.stderr
    result = run_script("--run", f"a={tmp_path}", "--test", f"t={tmp_path}", "--test", f"t={tmp_path}")
    assert result.returncode == 2 and "--test labels must be distinct" in result.stderr
