"""Grounder backends: folded-BN torch on the base oracle, ONNX Runtime behind the unchanged Grounder API,
backend selection, `auto` and its fallbacks, and clear errors for what cannot run here."""

import logging

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from csref_model import Grounder
from csref_model.audio import SAMPLE_RATE
from csref_model.boxes import box_iou
from csref_model.grounder import CANDIDATE_MAX_IOU
from csref_model.runtime.contract import Backend, BackendUnavailable
from csref_model.runtime.onnxruntime_backend import OnnxRuntimeBackend
from csref_model.runtime.selection import create_backend
from csref_model.runtime.torch_backend import TorchBackend, fold_batchnorm
from csref_model.config import load_model_config
from csref_model.head import best_cell
from csref_model.srec import build_srec


def count_batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


@pytest.fixture(scope="module")
def tiny():
    config = load_model_config("tiny")
    torch.manual_seed(0)
    return build_srec(config, load_pretrained=False).eval(), config


def test_folded_torch_cpu_matches_the_oracle_and_leaves_the_model_alone(base_oracle):
    model, config, oracle = base_oracle
    batchnorms = count_batchnorms(model)
    backend = TorchBackend(model, "cpu")
    # Every conv->BN pair is folded; only SimpleFusion.norm (x3) and GELUConv's BN remain.
    assert backend.folded == batchnorms - 4 and count_batchnorms(backend.parts) == 3
    assert count_batchnorms(model) == batchnorms  # the original keeps its BatchNorms
    x, tolerances = oracle["inputs"], oracle["tolerances"]
    boxes = best_cell(backend.ground_features(backend.encode_image(x["image"]),
                                              backend.encode_speech(x["input_values"], x["attention_mask"])))
    reference = oracle["outputs"]["boxes"]
    assert (boxes[:, :4] - reference[:, :4]).abs().max() <= tolerances["boxes_xyxy_px"]
    assert (boxes[:, 4] - reference[:, 4]).abs().max() <= tolerances["boxes_score"]
    with torch.no_grad():
        maps = backend.encode_image(x["image"])
        top = backend.parts.multi_scale_manner(
            [fusion(m, oracle["intermediates"]["speech_flat_feat"]) for fusion, m in zip(backend.parts.fusion_manner, maps)])
    assert (top - oracle["intermediates"]["msf_top_s32"]).abs().max() <= tolerances["msf_top_s32"]


def test_fold_batchnorm_refuses_training_mode(tiny):
    model, config = tiny
    training_copy = build_srec(config, load_pretrained=False).train()
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(training_copy)


def scene(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((240, 320, 3), 180, dtype=np.uint8)
    for _ in range(4):
        x, y = int(rng.integers(0, 280)), int(rng.integers(0, 200))
        cv2.rectangle(image, (x, y), (x + 30, y + 25), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    return image


def voiced(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = 0.2 * np.sin(2 * np.pi * (120 + 40 * rng.random()) * t) * (1.1 + np.sin(2 * np.pi * 3 * t))
    return (wave + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def test_onnxruntime_grounder_has_the_same_api_and_answers(tiny, tmp_path):
    model, config = tiny
    torch_grounder = Grounder.from_model(model, config, backend="torch")
    ort_grounder = Grounder.from_model(model, config, backend="onnxruntime", onnx_dir=tmp_path, threads=1)
    assert isinstance(ort_grounder.backend, OnnxRuntimeBackend) and ort_grounder.backend.threads == 1
    assert isinstance(ort_grounder.backend, Backend) and isinstance(torch_grounder.backend, Backend)
    images = [scene(0), scene(1)]
    audios = [voiced(1.2, 2), voiced(2.1, 3)]
    for image, audio in zip(images, audios):
        expected, result = torch_grounder.ground(image, audio), ort_grounder.ground(image, audio)
        np.testing.assert_allclose(result.box_xyxy, expected.box_xyxy, rtol=0, atol=1e-2)
        assert result.score == pytest.approx(expected.score, abs=1e-4) and result.image_size == expected.image_size
        split = ort_grounder.ground_features(ort_grounder.encode_image(image), ort_grounder.encode_speech(audio))
        assert np.array_equal(split.box_xyxy, result.box_xyxy) and split.score == result.score
    batch = ort_grounder.ground_batch(images, audios)
    for result, image, audio in zip(batch, images, audios):
        np.testing.assert_allclose(result.box_xyxy, ort_grounder.ground(image, audio).box_xyxy, rtol=0, atol=1e-3)
    # Top-k candidates: the same cells from both backends, best first, the first one the answer.
    grid_cells = (config.image_size // 32) ** 2
    for image, audio in zip(images, audios):
        expected, result = torch_grounder.ground(image, audio, top_k=5), ort_grounder.ground(image, audio, top_k=5)
        assert result.candidates.shape == expected.candidates.shape and 1 <= len(result.candidates) <= 5
        np.testing.assert_allclose(result.candidates, expected.candidates, rtol=0, atol=1e-2)
        for candidates in (result.candidates, expected.candidates):
            assert np.all(np.diff(candidates[:, 4]) <= 0)
        assert np.array_equal(result.candidates[0, :4], result.box_xyxy) and result.candidates[0, 4] == np.float32(result.score)
        every_cell = ort_grounder.ground(image, audio, top_k=10_000).candidates
        assert len(every_cell) <= grid_cells and every_cell[0, 4] == np.float32(result.score)
        overlaps = box_iou(every_cell[:, None, :4], every_cell[None, :, :4])  # (K, K)
        assert (overlaps[~np.eye(len(every_cell), dtype=bool)] <= CANDIDATE_MAX_IOU + 1e-6).all()
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        ort_grounder.ground(images[0], audios[0], top_k=0)
    with pytest.raises(ValueError, match="at least 400 samples"):
        ort_grounder.ground(images[0], np.sin(np.arange(300, dtype=np.float32)))
    with pytest.raises(ValueError, match=f"must be {config.image_size}x{config.image_size}"):
        ort_grounder.backend.encode_image(torch.zeros(1, 3, config.image_size + 32, config.image_size + 32))


def test_auto_on_cpu_picks_onnxruntime_and_logs_it(tiny, tmp_path, caplog):
    model, config = tiny
    with caplog.at_level(logging.INFO, logger="csref_model.runtime.selection"):
        backend = create_backend("auto", model, config, "cpu", onnx_dir=tmp_path)
    assert backend.name == "onnxruntime"
    assert "backend 'auto' on cpu chose onnxruntime" in caplog.text


def test_unavailable_backends_fail_clearly(tiny, tmp_path):
    model, config = tiny
    with pytest.raises(BackendUnavailable, match="'tensorrt' needs a CUDA device"):
        create_backend("tensorrt", model, config, "cpu", onnx_dir=tmp_path)
    with pytest.raises(ValueError, match="backend must be one of torch, onnxruntime, tensorrt, auto"):
        create_backend("openvino", model, config, "cpu")
    with pytest.raises(ValueError, match="fp16 on CUDA only"):
        Grounder.from_model(model, config, backend="torch", precision="fp16")
    with pytest.raises(BackendUnavailable, match="'onnxruntime' runs the fp32 graphs"):
        create_backend("onnxruntime", model, config, "cpu", precision="bf16", onnx_dir=tmp_path)
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16"):
        create_backend("torch", model, config, "cpu", precision="int4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback chain on a machine without CUDA")
def test_auto_on_cuda_without_a_gpu_tries_every_candidate_then_says_why(tiny, tmp_path):
    model, config = tiny
    with pytest.raises(BackendUnavailable) as error:
        create_backend("auto", model, config, "cuda", onnx_dir=tmp_path)
    message = str(error.value)
    assert "tensorrt:" in message and "torch:" in message and "onnxruntime:" in message
    assert "torch sees no CUDA GPU" in message
