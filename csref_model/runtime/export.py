"""Export SREC to the ONNX graphs of the contract (csref_model/runtime/contract.py): three, or
four with a mask head (`graph_specs`).

`export_onnx` writes the graphs and `manifest.json`, which records the model hash (weights +
config), the graph files and their hashes and the export settings; `ensure_onnx` reuses a
directory whose manifest matches the model and re-exports otherwise. TensorRT engines are built
from these graphs by csref_model/runtime/tensorrt_backend.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from csref_model.config import ModelConfig
from csref_model.runtime.contract import DEFAULT_MAX_AUDIO_SECONDS, MASK_GRAPH, Manifest, graph_specs, speech_samples

logger = logging.getLogger(__name__)

OPSET = 17
EXAMPLE_AUDIO_SECONDS = 2.0


class SpeechEncoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_speech(input_values, attention_mask)  # (B, D)


class ImageEncoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.model.mask_head is not None:
            return tuple(self.model.encode_image_pyramid(image))  # s8, s16, s32, s4
        return tuple(self.model.encode_image(image))  # s8, s16, s32


class GroundingHeadGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, s8: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor,
                speech_feat: torch.Tensor) -> torch.Tensor:
        return self.model.ground_cells([s8, s16, s32], speech_feat)  # (B, G*G, 5)


class MaskHeadGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, s8: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor, s4: torch.Tensor,
                speech_feat: torch.Tensor) -> torch.Tensor:
        return self.model.mask_features([s8, s16, s32, s4], speech_feat)  # (B, 2, S/4, S/4)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_hash(model: nn.Module, config: ModelConfig) -> str:
    """sha256 of the config and every state_dict tensor (name, dtype, shape, bytes), 16 hex digits."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def example_inputs(config: ModelConfig) -> dict[str, tuple[torch.Tensor, ...]]:
    """CPU tracing inputs. The speech example is a padded batch of two, so the mask path is traced."""
    size = config.image_size
    generator = torch.Generator().manual_seed(0)
    samples = speech_samples(EXAMPLE_AUDIO_SECONDS)
    input_values = torch.randn(2, samples, generator=generator)  # (2, L)
    attention_mask = torch.ones(2, samples, dtype=torch.int32)  # (2, L)
    input_values[1, samples * 3 // 4:] = 0
    attention_mask[1, samples * 3 // 4:] = 0
    image = torch.rand(1, 3, size, size, generator=generator)  # (1, 3, S, S)
    return {"speech_encoder": (input_values, attention_mask), "image_encoder": (image,)}


@torch.no_grad()
def export_onnx(model: nn.Module, config: ModelConfig, out_dir: str | Path,
                max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS, opset: int = OPSET) -> Manifest:
    """Writes the `.onnx` graphs (`graph_specs`) and `manifest.json` into `out_dir` (fp32, CPU tracing)."""
    if opset < OPSET:
        raise ValueError(f"opset {opset} is too old: the graphs need opset {OPSET} or later (LayerNormalization)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().cpu()
    inputs = example_inputs(config)
    image_maps = ImageEncoderGraph(model)(inputs["image_encoder"][0])
    speech_feat = model.encode_speech(*inputs["speech_encoder"])[:1]
    inputs["grounding_head"] = (*image_maps[:3], speech_feat)
    inputs[MASK_GRAPH] = (*image_maps, speech_feat)
    wrappers = {"speech_encoder": SpeechEncoderGraph(model), "image_encoder": ImageEncoderGraph(model),
                "grounding_head": GroundingHeadGraph(model), MASK_GRAPH: MaskHeadGraph(model)}
    graphs, hashes = {}, {}
    for name, spec in graph_specs(config).items():
        path = out_dir / f"{name}.onnx"
        started = time.perf_counter()
        # The wrappers must be in eval mode too: the exporter restores the wrapper's own mode on
        # the whole tree afterwards, and a fresh module is in training mode.
        wrapper = wrappers[name].eval()
        # dynamo=False: the TorchScript exporter handles HF wav2vec2's dynamic length and mask
        # directly, and folds eval-mode BatchNorms into the convolutions.
        with warnings.catch_warnings():
            # The model's Python shape checks are constants for a trace; the graphs' own shapes are checked
            # by the backends before running.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # The head's best-cell gather indexes with arange and argmax, never with negative indices.
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            torch.onnx.export(wrapper, inputs[name], str(path), input_names=list(spec.inputs),
                              output_names=list(spec.outputs), dynamic_axes=spec.dynamic_axes,
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        graphs[name], hashes[name] = path.name, file_sha256(path)
        logger.info("exported %s in %.1f s (%.1f MB)", path, time.perf_counter() - started,
                    path.stat().st_size / 1e6)
    manifest = Manifest(model_hash=model_hash(model, config), config=config.to_dict(), opset=opset,
                        max_audio_seconds=max_audio_seconds, graphs=graphs, graph_hashes=hashes)
    manifest.write(out_dir)
    return manifest


def default_cache_dir() -> Path:
    """$CSREF_CACHE_DIR, else $XDG_CACHE_HOME/csref_ros, else ~/.cache/csref_ros."""
    if os.environ.get("CSREF_CACHE_DIR"):
        return Path(os.environ["CSREF_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "csref_ros"


def ensure_onnx(model: nn.Module, config: ModelConfig, onnx_dir: str | Path | None = None,
                max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS) -> tuple[Path, Manifest]:
    """ONNX graphs of exactly this model: reused from `onnx_dir` (default: a per-model cache folder)
    when its manifest matches the model hash and the files are intact, else exported there."""
    digest = model_hash(model, config)
    directory = Path(onnx_dir) if onnx_dir is not None else default_cache_dir() / "onnx" / digest
    manifest = Manifest.read(directory)
    if manifest is not None and manifest.model_hash == digest and _graphs_intact(directory, manifest, config):
        logger.info("using the ONNX graphs in %s (model %s)", directory, digest)
        return directory, manifest
    if manifest is not None:
        logger.warning("ONNX graphs in %s are for another model or damaged (manifest %s, model %s): re-exporting",
                       directory, manifest.model_hash, digest)
    else:
        logger.info("exporting ONNX graphs of model %s to %s", digest, directory)
    return directory, export_onnx(model, config, directory, max_audio_seconds)


def _graphs_intact(directory: Path, manifest: Manifest, config: ModelConfig) -> bool:
    for name in graph_specs(config):
        path = directory / manifest.graphs.get(name, "")
        if not path.is_file() or file_sha256(path) != manifest.graph_hashes.get(name):
            return False
    return True
