"""python -m csref_training.corrupt on a small generated set: same files and lengths, the noise at the
asked SNR over the audible speech, babble from other voices, reruns identical, nothing overwritten."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from csref_model.audio import load_audio_16k
from csref_training.corrupt import audible_power
from csref_training.spoken_shapes.generate import SynthConfig, generate_dataset
from training_support import REPO, subprocess_env

VOICES = ("en-us+m3", "en-gb+f2", "en-029")


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corrupt") / "clean"
    generate_dataset(SynthConfig(out=root, seed=5, voices=VOICES, noise_prob=0.0), {"val": 2, "test": 6}, workers=1)
    return root


def corrupt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "csref_training.corrupt", *args], env=subprocess_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def wav_files(root: Path) -> list[Path]:
    return sorted(path.relative_to(root) for path in (root / "audios").rglob("*.wav"))


@pytest.mark.parametrize("noise", ["babble", "pink"])
def test_noise_at_the_asked_snr_and_everything_else_copied(clean_set: Path, tmp_path: Path, noise: str) -> None:
    out = tmp_path / noise
    result = corrupt("--data-root", str(clean_set), "--out", str(out), "--noise", noise, "--snr-db-range", "5,10",
                     "--seed", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert wav_files(out) == wav_files(clean_set)
    assert not out.with_name(out.name + ".partial").exists()
    assert (out / "anns/spoken_shapes.json").read_bytes() == (clean_set / "anns/spoken_shapes.json").read_bytes()
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(p.name for p in (clean_set / "images").iterdir())

    record = json.loads((out / "corruption.json").read_text())
    assert record["noise"] == noise and record["seed"] == 3
    for relative in wav_files(clean_set):
        clean, noisy = load_audio_16k(clean_set / relative), load_audio_16k(out / relative)
        assert noisy.shape == clean.shape
        snr_db = record["files"][str(relative)]["snr_db"]
        assert 5.0 <= snr_db <= 10.0
        measured = 10 * np.log10(audible_power(clean) / np.mean((noisy.astype(np.float64) - clean) ** 2))
        assert measured == pytest.approx(snr_db, abs=0.3)  # int16 rounding and rare clipping
        if noise == "babble":
            talkers = record["files"][str(relative)]["talkers"]
            assert 3 <= len(talkers) <= 6
            assert all(Path(talker).parent != relative.parent for talker in talkers)


def test_rerun_is_identical_and_never_overwrites(clean_set: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        assert corrupt("--data-root", str(clean_set), "--out", str(out), "--noise", "babble").returncode == 0
    assert all((first / p).read_bytes() == (second / p).read_bytes() for p in wav_files(clean_set))

    before = (first / "corruption.json").read_bytes()
    again = corrupt("--data-root", str(clean_set), "--out", str(first), "--noise", "pink")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert (first / "corruption.json").read_bytes() == before


def test_clear_errors(tmp_path: Path) -> None:
    missing = corrupt("--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--noise", "pink")
    assert missing.returncode == 2 and "has no audios/ folder" in missing.stderr
    reversed_range = corrupt("--data-root", str(tmp_path), "--out", str(tmp_path / "o"), "--noise", "pink",
                             "--snr-db-range", "20,5")
    assert reversed_range.returncode == 2 and "lower end above its upper end" in reversed_range.stderr
