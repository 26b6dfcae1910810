"""Backend selection: `create_backend(name, ...)` builds one backend by name, or picks for `auto`.

An explicitly named backend that cannot run here raises `BackendUnavailable` saying why; `auto`
tries the fastest candidates for the device in order and logs its choice and every candidate it
skipped. ONNX Runtime and TensorRT run the exported graphs (csref_model/runtime/export.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from csref_model.config import ModelConfig
from csref_model.runtime.contract import (DEFAULT_MAX_AUDIO_SECONDS, PRECISIONS, Backend, BackendUnavailable,
                                          min_speech_samples)
from csref_model.runtime.export import ensure_onnx
from csref_model.runtime.onnxruntime_backend import OnnxRuntimeBackend, check_onnxruntime
from csref_model.runtime.tensorrt_backend import EngineSettings, TensorRTBackend, check_tensorrt
from csref_model.runtime.torch_backend import TorchBackend

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")
# Fastest first, from the measurements in docs/DEPLOYMENT.md.
AUTO_ORDER = {"cuda": ("tensorrt", "torch", "onnxruntime"), "cpu": ("onnxruntime", "torch")}


def create_backend(name: str, model: nn.Module, config: ModelConfig, device: str | torch.device = "cpu",
                   precision: str = "fp32", onnx_dir: str | Path | None = None, threads: int | None = None,
                   max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS) -> Backend:
    """The backend `name` ("torch", "onnxruntime", "tensorrt" or "auto") for this model on `device`.

    ONNX Runtime and TensorRT use the ONNX graphs in `onnx_dir` when its manifest matches the
    model, else export them there (default: a per-model folder under ~/.cache/csref_ros).
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if name != "auto":
        return _build(name, model, config, device, precision, onnx_dir, threads, max_audio_seconds)
    candidates = AUTO_ORDER.get(device.type)
    if candidates is None:
        raise ValueError(f"backend 'auto' supports cpu and cuda devices, not {device}")
    if device.type == "cpu" and precision != "fp32":
        candidates = ("torch",)  # reaches the clear fp32-only error of the torch backend
    skipped = []
    for candidate in candidates:
        try:
            backend = _build(candidate, model, config, device, precision, onnx_dir, threads, max_audio_seconds)
        except BackendUnavailable as error:
            skipped.append(f"{candidate}: {error}")
            continue
        logger.info("backend 'auto' on %s chose %s%s", device, candidate,
                    "; skipped " + "; ".join(skipped) if skipped else "")
        if skipped:
            logger.warning("backend 'auto' fell back to %s (%s)", candidate, "; ".join(skipped))
        return backend
    raise BackendUnavailable(f"no backend can run on {device}: " + "; ".join(skipped))


def _build(name: str, model: nn.Module, config: ModelConfig, device: torch.device, precision: str,
           onnx_dir: str | Path | None, threads: int | None, max_audio_seconds: float) -> Backend:
    if name == "torch":
        return TorchBackend(model, device, precision)
    if name == "onnxruntime":
        if precision != "fp32":
            raise BackendUnavailable(f"backend 'onnxruntime' runs the fp32 graphs; {precision} is served by "
                                     "the torch (CUDA) and tensorrt backends")
        check_onnxruntime(device)
        directory, _ = ensure_onnx(model, config, onnx_dir, max_audio_seconds)
        return OnnxRuntimeBackend(directory, device, threads)
    if name == "tensorrt":
        check_tensorrt(device)
        if precision == "bf16":
            raise BackendUnavailable("backend 'tensorrt' builds fp32 or fp16 engines; use precision fp16")
        settings = EngineSettings(fp16=precision == "fp16", max_audio_seconds=max_audio_seconds,
                                  min_samples=min_speech_samples(config))
        directory, manifest = ensure_onnx(model, config, onnx_dir, max_audio_seconds)
        return TensorRTBackend(directory, manifest, settings, device)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
