"""Small models, configs and subprocess runs for the training tests."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from csref_model.detector import DetectorConfig
from csref_model.typed_yaml import set_dotted

REPO = Path(__file__).resolve().parent.parent
# Small enough for a few seconds per run on 2 CPU cores; same code paths as the tiny model.
TEST_MODEL = {
    "image_size": 64,
    "speech_encoder": {
        "architecture": {
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "conv_dim": [16, 16, 16, 16, 16, 16, 16], "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 2, "layerdrop": 0.0,
        },
    },
    "visual_backbone": {"depth_multiple": 0.33, "width_multiple": 0.125},
    "fusion": {"hidden_size": 32},
    "head": {"hidden_size": 16},
}


def write_config(path: Path, data_root: Path, output_dir: Path, **overrides) -> Path:
    """A training config of the tiny test model on `data_root`, with dotted `overrides`, written to `path`."""
    config = {
        "model": "tiny",
        "model_overrides": TEST_MODEL,
        "output_dir": str(output_dir),
        "seed": 7,
        "epochs": 2,
        "batch_size": 4,
        "eval_batch_size": 4,
        "log_every": 1,
        "optim": {"lr": 1.0e-3, "warmup_epochs": 0.5, "min_lr": 1.0e-4},
        "ema": {"enabled": True, "alpha": 0.99},
        "multi_scale": {"enabled": True, "sizes": [64, 96]},
        "data": {"format": "refcoco", "dataset": "spoken_shapes", "root": str(data_root), "num_workers": 0},
    }
    for key, value in overrides.items():
        set_dotted(config, key, value)
    path.write_text(yaml.safe_dump(config))
    return path


def subprocess_env() -> dict[str, str]:
    # One thread per process: identical arithmetic in every run (exact resumption check).
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def run_module(module: str, config: Path, *overrides: str, timeout: int = 300,
               check: bool = True) -> subprocess.CompletedProcess:
    """Runs `python -m module --config config ...`; with `check`, it must exit 0."""
    result = subprocess.run([sys.executable, "-m", module, "--config", str(config), *overrides],
                            env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def tiny_detector_config() -> DetectorConfig:
    """A detector small enough for CPU tests at 128 px."""
    config = DetectorConfig(image_size=128, neck_channels=16)
    config.visual_backbone.depth_multiple, config.visual_backbone.width_multiple = 0.33, 0.125
    config.head.hidden_size = 16
    return config
