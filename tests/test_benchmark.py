"""Benchmark CLI: table and JSON schema (tiny config, few iterations)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from csref_model.cli.benchmark import METRICS

REPO = Path(__file__).resolve().parent.parent


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "csref_model", "benchmark", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=420)


def check_timing(timing: dict) -> None:
    assert set(timing) == {"median", "p95", "min"}
    assert 0 < timing["min"] <= timing["median"] <= timing["p95"]


def test_benchmark_json_schema_and_table(tmp_path):
    out = tmp_path / "bench.json"
    completed = run_benchmark("--config", "tiny", "--device", "cpu", "--backend", "auto", "--threads", "1",
                              "--iterations", "3", "--warmup", "1", "--onnx-dir", str(tmp_path / "onnx"),
                              "--json", str(out))
    assert completed.returncode == 0, completed.stderr
    result = json.loads(out.read_text())
    assert result["schema_version"] == 1 and result["config"] == "tiny" and result["device"] == "cpu"
    assert result["backend_requested"] == "auto" and result["backend"] == "onnxruntime"
    assert result["threads"] == 1 and result["iterations"] == 3 and result["warmup"] == 1
    assert result["frame_size"] == [416, 416] and result["end_to_end_audio_seconds"] == 3.0
    assert set(result["metrics"]) == set(METRICS)
    for timing in result["metrics"].values():
        check_timing(timing)
    check_timing(result["reference_eager"]["end_to_end_ms"])
    assert result["reference_eager"]["speedup_end_to_end"] > 0
    assert result["memory"]["peak_rss_mb"] > 0
    assert result["environment"]["torch"] and result["environment"]["onnxruntime"]
    for metric in ("end_to_end_ms", "end_of_speech_ms", "speech_3s_ms", "reference_eager.end_to_end_ms"):
        assert metric in completed.stdout
    assert "threads=1" in completed.stdout


def test_benchmark_user_errors():
    completed = run_benchmark("--config", "tiny", "--iterations", "0")
    assert completed.returncode == 2 and "--iterations must be >= 1" in completed.stderr
    completed = run_benchmark("--config", "tiny", "--backend", "tensorrt", "--iterations", "1")
    assert completed.returncode == 2 and "needs a CUDA device" in completed.stderr
