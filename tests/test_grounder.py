"""Grounder and CLI: the parity oracle through an official-format file, split usage, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import librosa
import numpy as np
import pytest
import soundfile
import torch

from csref_model import Grounder
from csref_model.checkpoint import save_checkpoint
from csref_model.config import load_model_config
from csref_model.preprocessing import letterbox, prepare_waveform, speech_batch
from csref_model.srec import build_srec
from csref_model.visualize import MASK_OPACITY, PREDICTION_COLOUR, DrawnBox, draw_boxes
from oracle_weights import deltas, srec_entries

REPO = Path(__file__).resolve().parent.parent
POS_CONV = "speech_encoder.model.encoder.pos_conv_embed.conv."


# ----------------------------------------------------------------------------------------
# The oracle through an official checkpoint file (how the issue is verified)


def write_official_checkpoint(path: Path, state_dict: dict) -> Path:
    torch.save({"epoch": 39, "state_dict": state_dict, "optimizer": {"state": {}, "param_groups": []},
                "scheduler": {"last_epoch": 1000}, "lr": 1e-6}, path)
    return path


@pytest.mark.parametrize("names", ["parametrized", "legacy_weight_norm"])
def test_oracle_through_official_checkpoint(tmp_path, srec_oracle_weights, names):
    oracle, state_dict = srec_oracle_weights
    state_dict = dict(state_dict)
    if names == "legacy_weight_norm":
        state_dict[POS_CONV + "weight_g"] = state_dict.pop(POS_CONV + "parametrizations.weight.original0")
        state_dict[POS_CONV + "weight_v"] = state_dict.pop(POS_CONV + "parametrizations.weight.original1")
    path = write_official_checkpoint(tmp_path / "csref_refcoco_speech.pth", state_dict)
    grounder = Grounder.from_checkpoint(path, config="base")
    path.unlink()
    assert not grounder.model.training
    x, tolerances = oracle["inputs"], oracle["tolerances"]
    with torch.no_grad():
        boxes = grounder.model(x["image"], x["input_values"], x["attention_mask"])
    reference = oracle["outputs"]["boxes"]
    assert (boxes[:, :4] - reference[:, :4]).abs().max() <= tolerances["boxes_xyxy_px"]
    assert (boxes[:, 4] - reference[:, 4]).abs().max() <= tolerances["boxes_score"]
    if names == "parametrized":
        for entry, delta, tolerance in deltas(srec_entries(grounder.model, oracle), oracle):
            assert delta <= tolerance, f"{entry}: max|delta| {delta:.3g} > tolerance {tolerance:.3g}"
        # Our speech preprocessing of the raw waveforms gives the same boxes.
        input_values, attention_mask = speech_batch([x["waveform0"].numpy(), x["waveform1"].numpy()])
        with torch.no_grad():
            boxes = grounder.model(x["image"], input_values, attention_mask)
        assert (boxes[:, :4] - reference[:, :4]).abs().max() <= tolerances["boxes_xyxy_px"]
        assert (boxes[:, 4] - reference[:, 4]).abs().max() <= tolerances["boxes_score"]


# ----------------------------------------------------------------------------------------
# Tiny model with random weights


@pytest.fixture(scope="module")
def tiny_config():
    return load_model_config("tiny")


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return build_srec(tiny_config, load_pretrained=False).eval()


@pytest.fixture(scope="module")
def grounder(tiny_model, tiny_config):
    return Grounder.from_model(tiny_model, tiny_config)


def speech_like(seconds: float, sample_rate: int, seed: int = 0) -> np.ndarray:
    """Harmonics with a syllable-rate envelope and a little noise, surrounded by silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 120 + 30 * rng.random()
    voiced = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 8))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 4 * t)) * 0.2
    wave = voiced * envelope + 0.005 * rng.standard_normal(t.shape)
    silence = np.zeros(int(0.2 * sample_rate))
    return np.concatenate([silence, wave, silence]).astype(np.float32)


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((h, w, 3), 200, dtype=np.uint8)
    for _ in range(4):
        x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        cv2.rectangle(image, (x, y), (x + 30, y + 25), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    return image


def test_ground_result_is_back_projected_model_output(grounder, tiny_model, tiny_config):
    image, audio = scene(300, 500), speech_like(1.5, 16000)
    result = grounder.ground(image, audio, 16000)
    assert result.box_xyxy.dtype == np.float32 and result.box_xyxy.shape == (4,)
    assert 0.0 < result.score < 1.0 and result.image_size == (500, 300)
    # The same computation spelled out: letterbox, preprocessing, model, reference back-projection.
    tensor, geometry = letterbox(image, tiny_config.image_size)
    input_values, attention_mask = speech_batch([prepare_waveform(audio, 16000)])
    with torch.no_grad():
        x1, y1, x2, y2, score = tiny_model(tensor[None], input_values, attention_mask)[0].tolist()
    s = geometry.nw / 500  # = nh / 300 up to truncation
    assert geometry.dy > 0 and abs(s - geometry.nh / 300) < 0.01
    expected = [(x1 - geometry.dx) / geometry.nw * 500, (y1 - geometry.dy) / geometry.nh * 300]
    expected += [expected[0] + (x2 - x1) / geometry.nw * 500, expected[1] + (y2 - y1) / geometry.nh * 300]
    np.testing.assert_allclose(result.box_xyxy, expected, rtol=1e-6, atol=1e-4)
    assert result.score == pytest.approx(score, abs=1e-7)
    assert json.loads(json.dumps(result.to_dict()))["image_size"] == [500, 300]


def test_split_usage_is_bit_identical_to_ground(grounder):
    image = scene(240, 320, seed=1)
    utterances = [speech_like(1.0, 16000, seed=2), speech_like(2.3, 16000, seed=3)]
    image_features = grounder.encode_image(image)
    for audio in utterances:
        one_shot = grounder.ground(image, audio)
        split = grounder.ground_features(image_features, grounder.encode_speech(audio))
        assert np.array_equal(one_shot.box_xyxy, split.box_xyxy)
        assert one_shot.score == split.score and one_shot.image_size == split.image_size


def test_other_sample_rates_are_resampled(grounder):
    image = scene(256, 256, seed=4)
    audio_22k = speech_like(1.2, 22050, seed=5)
    resampled = librosa.resample(audio_22k, orig_sr=22050, target_sr=16000)
    at_22k = grounder.ground(image, audio_22k, sample_rate=22050)
    at_16k = grounder.ground(image, resampled, sample_rate=16000)
    assert np.array_equal(at_22k.box_xyxy, at_16k.box_xyxy) and at_22k.score == at_16k.score


def test_ground_batch_matches_single_calls(grounder):
    images = [scene(240, 320, seed=6), scene(480, 360, seed=7), scene(256, 256, seed=8)]
    audios = [speech_like(1.0, 16000, seed=9), speech_like(2.5, 16000, seed=10), speech_like(0.7, 16000, seed=11)]
    batch = grounder.ground_batch(images, audios)
    assert len(batch) == 3
    for result, image, audio in zip(batch, images, audios):
        single = grounder.ground(image, audio)
        np.testing.assert_allclose(result.box_xyxy, single.box_xyxy, rtol=0, atol=1e-3)
        assert result.score == pytest.approx(single.score, abs=1e-5)
        assert result.image_size == single.image_size
    assert grounder.ground_batch([], []) == []
    with pytest.raises(ValueError, match="as many images as utterances"):
        grounder.ground_batch(images, audios[:2])


@pytest.mark.parametrize(
    "image, audio, message",
    [
        (np.zeros((64, 64, 3), np.float32), None, "dtype uint8"),
        (np.zeros((64, 64), np.uint8), None, "greyscale"),
        (np.zeros((64, 64, 4), np.uint8), None, "RGBA"),
        (None, np.zeros(16000, np.float32), "all zeros"),
        (None, np.zeros(0, np.float32), "empty"),
        (None, np.full(16000, np.nan, np.float32), "NaN/inf"),
        (None, np.stack([np.ones(16000, np.float32)] * 2, axis=1), "mono 1-D"),
        (None, np.sin(np.arange(300, dtype=np.float32)), "at least 400 samples"),
    ],
)
def test_bad_input_is_refused(grounder, image, audio, message):
    image = scene(64, 64) if image is None else image
    audio = speech_like(1.0, 16000) if audio is None else audio
    with pytest.raises(ValueError, match=message):
        grounder.ground(image, audio)
    with pytest.raises(ValueError, match=message):
        grounder.ground_batch([image], [audio])


def test_from_checkpoint_our_directory_and_errors(tmp_path, tiny_model, tiny_config, grounder):
    directory = save_checkpoint(tmp_path / "tiny", tiny_model, tiny_config)
    loaded = Grounder.from_checkpoint(directory)
    assert loaded.config == tiny_config
    image, audio = scene(200, 300, seed=12), speech_like(1.0, 16000, seed=13)
    expected = grounder.ground(image, audio)
    result = loaded.ground(image, audio)
    assert np.array_equal(result.box_xyxy, expected.box_xyxy) and result.score == expected.score
    torch.save({"state_dict": tiny_model.state_dict()}, tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="stores no model config: pass config='base'"):
        Grounder.from_checkpoint(tmp_path / "tiny.pth")
    assert Grounder.from_checkpoint(tmp_path / "tiny.pth", config="tiny").config == tiny_config
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        Grounder.from_checkpoint(tmp_path / "nope.pth", config="tiny")
    with pytest.raises(ValueError, match="shape mismatches"):
        Grounder.from_checkpoint(tmp_path / "tiny.pth", config="base")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text((REPO / "config" / "models" / "tiny.yaml").read_text().replace("garan_heads:", "garan_head:"))
    with pytest.raises(ValueError, match=r"bad.yaml: unknown key 'garan_head' in section 'fusion'"):
        Grounder.from_checkpoint(tmp_path / "tiny.pth", config=bad_yaml)


# ----------------------------------------------------------------------------------------
# CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "csref_model", "ground", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_json_and_visualisation(tmp_path, tiny_model, tiny_config, grounder):
    directory = save_checkpoint(tmp_path / "tiny", tiny_model, tiny_config)
    image_rgb = scene(240, 320, seed=14)
    assert cv2.imwrite(str(tmp_path / "scene.png"), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    audio = speech_like(1.5, 22050, seed=15)
    soundfile.write(tmp_path / "utterance.wav", audio, 22050, subtype="PCM_16")
    completed = run_cli("--checkpoint", str(directory), "--image", str(tmp_path / "scene.png"),
                        "--audio", str(tmp_path / "utterance.wav"), "--json", "--save-vis", str(tmp_path / "vis.png"),
                        "--top-k", "3")
    assert completed.returncode == 0, completed.stderr
    output = json.loads(completed.stdout)
    assert set(output) == {"box_xyxy", "score", "image_size", "candidates"} and output["image_size"] == [320, 240]
    assert 1 <= len(output["candidates"]) <= 3 and output["candidates"][0]["box_xyxy"] == output["box_xyxy"]
    scores = [candidate["score"] for candidate in output["candidates"]]
    assert scores == sorted(scores, reverse=True)
    pcm, sample_rate = soundfile.read(tmp_path / "utterance.wav", dtype="float32")
    expected = grounder.ground(image_rgb, pcm, sample_rate)
    np.testing.assert_allclose(output["box_xyxy"], expected.box_xyxy, rtol=0, atol=1e-3)
    assert output["score"] == pytest.approx(expected.score, abs=1e-5)
    vis = cv2.imread(str(tmp_path / "vis.png"))
    assert vis.shape == (240, 320, 3)
    assert np.all(vis[..., ::-1] == PREDICTION_COLOUR, axis=2).sum() >= 20  # the box is drawn (BGR file)


def test_main_lists_the_commands_and_refuses_an_unknown_one():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    listed = subprocess.run([sys.executable, "-m", "csref_model", "--help"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and all(command in listed.stdout for command in ("ground", "export", "benchmark"))
    unknown = subprocess.run([sys.executable, "-m", "csref_model", "grund"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert unknown.returncode == 2 and "unknown command 'grund'" in unknown.stderr and unknown.stdout == ""


def test_cli_user_errors_exit_2_without_traceback(tmp_path, tiny_model, tiny_config):
    directory = save_checkpoint(tmp_path / "tiny", tiny_model, tiny_config)
    assert cv2.imwrite(str(tmp_path / "scene.png"), scene(64, 64))
    soundfile.write(tmp_path / "silence.wav", np.zeros(16000, np.float32), 16000)
    cases = [
        (["--checkpoint", str(directory), "--image", str(tmp_path / "missing.png"), "--audio",
          str(tmp_path / "silence.wav")], "image not found"),
        (["--checkpoint", str(directory), "--image", str(tmp_path / "scene.png"), "--audio",
          str(tmp_path / "silence.wav")], "all zeros"),
    ]
    for args, message in cases:
        completed = run_cli(*args, "--json")
        assert completed.returncode == 2, completed.stderr
        assert message in completed.stderr and "Traceback" not in completed.stderr
        assert completed.stdout == ""


def test_mask_is_drawn_translucent_with_an_edge_under_the_boxes():
    image = np.full((60, 80, 3), 100, dtype=np.uint8)
    mask = np.zeros((60, 80), dtype=bool)
    mask[20:40, 30:60] = True
    picture = draw_boxes(image, [DrawnBox((5, 5, 15, 15))], mask=mask)
    assert picture.shape == image.shape  # no caption, no zoom
    inside = np.round((1 - MASK_OPACITY) * 100 + MASK_OPACITY * np.array(PREDICTION_COLOUR)).astype(np.uint8)
    np.testing.assert_array_equal(picture[30, 45], inside)  # translucent fill
    np.testing.assert_array_equal(picture[20, 45], PREDICTION_COLOUR)  # opaque edge
    np.testing.assert_array_equal(picture[50, 70], image[50, 70])  # outside: untouched
    np.testing.assert_array_equal(draw_boxes(image, [DrawnBox((5, 5, 15, 15))])[30, 45], image[30, 45])
    with pytest.raises(ValueError, match="does not match the image"):
        draw_boxes(image, [], mask=mask[:10])
