"""Export SREC to three ONNX graphs (and TensorRT engines built from them), split as the node runs it.

    python -m csref_model.export --checkpoint CKPT --config base --format onnx --out exported/
    python -m csref_model.export --checkpoint CKPT --config base --format tensorrt --fp16 --out exported/

Graphs (`GRAPHS`), each an `.onnx` file in the output directory:
* `speech_encoder`: input_values (B, L) float32 + attention_mask (B, L) int32 -> speech_feat (B, D).
  B and L are dynamic: one utterance, or a padded batch with its mask.
* `image_encoder`: image (B, 3, S, S) float32 in [0, 1] -> s8, s16, s32 maps. S is fixed (config).
* `grounding_head`: s8, s16, s32 + speech_feat -> boxes (B, 5) x1, y1, x2, y2, score in letterboxed
  pixels (fusion, MultiScaleFusion, GARAN, head, best-cell decode). Image batch and speech batch are
  separate dynamic axes; either may be 1 and broadcasts, as in `SREC.ground_features`.

`manifest.json` records the model hash (weights + config), the graph files and their hashes and
the export settings; `ensure_onnx` re-exports when the model no longer matches it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from csref_model.config import ModelConfig

logger = logging.getLogger(__name__)

OPSET = 17
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
GRAPHS = ("speech_encoder", "image_encoder", "grounding_head")
SAMPLE_RATE = 16000
DEFAULT_MAX_AUDIO_SECONDS = 10.0
USER_ERROR = 2


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

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s8, s16, s32 = self.model.encode_image(image)
        return s8, s16, s32


class GroundingHeadGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, s8: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor,
                speech_feat: torch.Tensor) -> torch.Tensor:
        return self.model.ground_features([s8, s16, s32], speech_feat)  # (B, 5)


@dataclass
class GraphSpec:
    """Names and dynamic axes of one graph's inputs and outputs."""

    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]


def graph_specs() -> dict[str, GraphSpec]:
    return {
        "speech_encoder": GraphSpec(
            inputs=["input_values", "attention_mask"], outputs=["speech_feat"],
            dynamic_axes={"input_values": {0: "speech_batch", 1: "samples"},
                          "attention_mask": {0: "speech_batch", 1: "samples"},
                          "speech_feat": {0: "speech_batch"}}),
        "image_encoder": GraphSpec(
            inputs=["image"], outputs=["s8", "s16", "s32"],
            dynamic_axes={name: {0: "image_batch"} for name in ("image", "s8", "s16", "s32")}),
        "grounding_head": GraphSpec(
            inputs=["s8", "s16", "s32", "speech_feat"], outputs=["boxes"],
            dynamic_axes={**{name: {0: "image_batch"} for name in ("s8", "s16", "s32")},
                          "speech_feat": {0: "speech_batch"}, "boxes": {0: "batch"}}),
    }


@dataclass
class Manifest:
    model_hash: str
    config: dict
    opset: int
    max_audio_seconds: float
    graphs: dict[str, str]  # graph name -> file name
    graph_hashes: dict[str, str]  # graph name -> sha256 of the .onnx file
    torch_version: str = torch.__version__
    version: int = MANIFEST_VERSION

    def write(self, directory: Path) -> None:
        path = directory / MANIFEST
        with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2)
        os.replace(path.with_suffix(".tmp"), path)


def read_manifest(directory: str | Path) -> Manifest | None:
    """The manifest in `directory`, or None when there is none or it is from another format version."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("version") != MANIFEST_VERSION:
            return None
        return Manifest(**data)
    except (json.JSONDecodeError, TypeError) as error:
        logger.warning("ignoring unreadable export manifest %s (%s)", path, error)
        return None


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


def example_inputs(config: ModelConfig, device: torch.device) -> dict[str, tuple[torch.Tensor, ...]]:
    """Tracing inputs. The speech example is a padded batch of two, so the mask path is traced."""
    size = config.image_size
    generator = torch.Generator().manual_seed(0)
    samples = SAMPLE_RATE * 2
    input_values = torch.randn(2, samples, generator=generator)
    attention_mask = torch.ones(2, samples, dtype=torch.int32)
    input_values[1, samples * 3 // 4:] = 0
    attention_mask[1, samples * 3 // 4:] = 0
    image = torch.rand(1, 3, size, size, generator=generator)
    return {"speech_encoder": (input_values.to(device), attention_mask.to(device)),
            "image_encoder": (image.to(device),)}


@torch.no_grad()
def export_onnx(model: nn.Module, config: ModelConfig, out_dir: str | Path,
                max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS, opset: int = OPSET) -> Manifest:
    """Writes the three `.onnx` graphs and `manifest.json` into `out_dir` (fp32, CPU tracing)."""
    if opset < OPSET:
        raise ValueError(f"opset {opset} is too old: the graphs need opset {OPSET} or later (LayerNormalization)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().cpu()
    device = torch.device("cpu")
    inputs = example_inputs(config, device)
    inputs["grounding_head"] = (*model.encode_image(inputs["image_encoder"][0]),
                                model.encode_speech(*inputs["speech_encoder"])[:1])
    wrappers = {"speech_encoder": SpeechEncoderGraph(model), "image_encoder": ImageEncoderGraph(model),
                "grounding_head": GroundingHeadGraph(model)}
    specs = graph_specs()
    graphs, hashes = {}, {}
    for name in GRAPHS:
        spec, path = specs[name], out_dir / f"{name}.onnx"
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
            torch.onnx.export(wrapper, inputs[name], str(path), input_names=spec.inputs, output_names=spec.outputs,
                              dynamic_axes=spec.dynamic_axes, opset_version=opset, do_constant_folding=True,
                              dynamo=False)
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
    manifest = read_manifest(directory)
    if manifest is not None and manifest.model_hash == digest and _graphs_intact(directory, manifest):
        logger.info("using the ONNX graphs in %s (model %s)", directory, digest)
        return directory, manifest
    if manifest is not None:
        logger.warning("ONNX graphs in %s are for another model or damaged (manifest %s, model %s): re-exporting",
                       directory, manifest.model_hash, digest)
    else:
        logger.info("exporting ONNX graphs of model %s to %s", digest, directory)
    return directory, export_onnx(model, config, directory, max_audio_seconds)


def _graphs_intact(directory: Path, manifest: Manifest) -> bool:
    for name in GRAPHS:
        path = directory / manifest.graphs.get(name, "")
        if not path.is_file() or file_sha256(path) != manifest.graph_hashes.get(name):
            return False
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m csref_model.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="official .pth file or our checkpoint directory")
    parser.add_argument("--config", default=None,
                        help="base, tiny or a YAML path (default: the config stored in our checkpoint directory)")
    parser.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--fp16", action="store_true", help="TensorRT: FP16 engines (norms and softmax kept FP32)")
    parser.add_argument("--max-audio-seconds", type=float, default=DEFAULT_MAX_AUDIO_SECONDS,
                        help="longest utterance the TensorRT speech profile accepts (default %(default)s)")
    parser.add_argument("--max-batch", type=int, default=4, help="TensorRT profiles: largest batch (default 4)")
    parser.add_argument("--opset", type=int, default=OPSET)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from csref_model.checkpoint import build_srec_from_checkpoint
    from csref_model.config import load_model_config

    try:
        if args.max_audio_seconds <= 0:
            raise ValueError(f"--max-audio-seconds must be positive, got {args.max_audio_seconds}")
        if args.fp16 and args.format != "tensorrt":
            raise ValueError("--fp16 applies to --format tensorrt (ONNX graphs are exported in fp32)")
        if args.config is None and Path(args.checkpoint).is_file():
            raise ValueError(f"{args.checkpoint} is an official-format file, which stores no model config: "
                             "pass --config base (the paper's model) or a YAML path")
        config = load_model_config(args.config) if args.config is not None else None
        model, config = build_srec_from_checkpoint(args.checkpoint, config)
        manifest = export_onnx(model, config, args.out, args.max_audio_seconds, args.opset)
        if args.format == "tensorrt":
            from csref_model.audio import min_num_samples
            from csref_model.tensorrt_engine import EngineSettings, build_engines

            architecture = config.speech_encoder.architecture
            settings = EngineSettings(fp16=args.fp16, max_audio_seconds=args.max_audio_seconds,
                                      max_batch=args.max_batch,
                                      min_samples=min_num_samples(architecture.conv_kernel, architecture.conv_stride))
            build_engines(Path(args.out), manifest, settings)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR
    for name in GRAPHS:
        print(f"{name}: {Path(args.out) / manifest.graphs[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
