"""TensorRT 10 engines built from the exported ONNX graphs, an engine cache, and the `tensorrt` backend.

`tensorrt` is an optional dependency imported lazily (`import_tensorrt`): this module loads
without it, and everything that needs it raises `BackendUnavailable` saying what to install.

Engines live next to the graphs in `<onnx dir>/engines/` (or `cache_dir`): `<graph>.engine` plus
`<graph>.engine.json`, the key it was built for: GPU name and compute capability, TensorRT version,
the ONNX file's sha256, precision and optimisation-profile shapes. A key that differs from the one
wanted (another GPU, TensorRT upgrade, re-exported model, new settings) or an engine the runtime
refuses is rebuilt, never run.

FP16 engines: FP16 kernels everywhere except the layers whose range or accumulation needs FP32, which
are pinned to FP32 (precision and output type, with OBEY_PRECISION_CONSTRAINTS): normalisations (the
wav2vec2 feature extractor's GroupNorm, exported as InstanceNormalization, and every LayerNorm),
softmax, reductions, and every layer inside a `layer_norm` scope (the decomposed parts of the
GroupNorm). Network inputs and outputs stay FP32.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from csref_model.audio import WAV2VEC2_BASE_MIN_SAMPLES
from csref_model.runtime.contract import (DEFAULT_MAX_AUDIO_SECONDS, MASK_GRAPH, BackendUnavailable, GraphSpec,
                                          Manifest, check_ground_inputs, check_image, check_mask_inputs, speech_samples)

logger = logging.getLogger(__name__)

WORKSPACE_BYTES = 4 << 30
OPT_AUDIO_SECONDS = 3.0
# ONNX node scopes whose layers run in FP32 in FP16 engines (see the module docstring).
FP32_SCOPES = ("layer_norm", "LayerNorm", "GroupNorm")


@dataclass(frozen=True)
class EngineSettings:
    fp16: bool = False
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    max_batch: int = 4
    min_samples: int = WAV2VEC2_BASE_MIN_SAMPLES  # a model passes its own: contract.min_speech_samples


def import_tensorrt():
    """The tensorrt module; imported here, not at the top, because it is optional and often absent."""
    try:
        import tensorrt
    except ImportError as error:
        raise BackendUnavailable("TensorRT is not installed: pip install tensorrt-cu12 (or -cu13), or use "
                                 "JetPack's python3-libnvinfer; TensorRT 10 or later") from error
    if int(tensorrt.__version__.split(".")[0]) < 10:
        raise BackendUnavailable(f"TensorRT {tensorrt.__version__} is too old: the engines use the TensorRT 10 API")
    return tensorrt


def check_tensorrt(device: torch.device) -> None:
    """Raises BackendUnavailable before any export work when TensorRT cannot run on `device`."""
    if device.type != "cuda":
        raise BackendUnavailable(f"backend 'tensorrt' needs a CUDA device, got {device}")
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailable("backend 'tensorrt' needs the TensorRT 10 Python package "
                                 "(pip install tensorrt-cu12 or tensorrt-cu13, or JetPack's python3-libnvinfer)")


def _trt_logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def profile_shapes(graph: str, input_shapes: dict[str, tuple[int, ...]], settings: EngineSettings
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) per input; -1 dims are the batch (axis 0) and, for speech, the samples (axis 1)."""
    max_samples = speech_samples(settings.max_audio_seconds)
    if max_samples < settings.min_samples:
        raise ValueError(f"max_audio_seconds {settings.max_audio_seconds} is shorter than the shortest utterance "
                         f"the speech encoder accepts ({settings.min_samples} samples)")
    opt_samples = min(speech_samples(OPT_AUDIO_SECONDS), max_samples)
    shapes = {}
    for name, shape in input_shapes.items():
        low, opt, high = list(shape), list(shape), list(shape)
        for axis, size in enumerate(shape):
            if size != -1:
                continue
            if axis == 0:
                low[axis], opt[axis], high[axis] = 1, 1, settings.max_batch
            elif graph == "speech_encoder" and axis == 1:
                low[axis], opt[axis], high[axis] = settings.min_samples, opt_samples, max_samples
            else:
                raise ValueError(f"{graph} input {name} has an unexpected dynamic axis {axis} in shape {shape}")
        shapes[name] = (tuple(low), tuple(opt), tuple(high))
    return shapes


def engine_key(trt, manifest: Manifest, graph: str, settings: EngineSettings, device: torch.device) -> dict:
    """What an engine depends on; any difference means it must be rebuilt."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {
        "gpu": torch.cuda.get_device_name(index),
        "compute_capability": list(torch.cuda.get_device_capability(index)),
        "tensorrt": trt.__version__,
        "onnx_sha256": manifest.graph_hashes[graph],
        "settings": asdict(settings),
    }


def pin_fp32_layers(trt, network) -> int:
    """Marks the precision-sensitive layers FP32 (see the module docstring); returns how many."""
    sensitive_types = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    float_types = {trt.float32, trt.float16}
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type not in sensitive_types and not any(scope in layer.name for scope in FP32_SCOPES):
            continue
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if not outputs or any(output.dtype not in float_types for output in outputs):
            continue  # shape/index arithmetic inside a scope: not a float computation
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            layer.set_output_type(i, trt.float32)
        pinned += 1
    return pinned


def build_engine(onnx_path: Path, graph: str, settings: EngineSettings) -> bytes:
    """Parses one ONNX graph and builds a serialized engine with its optimisation profile."""
    trt = import_tensorrt()
    trt_logger = _trt_logger(trt)
    if not hasattr(trt, "Builder"):
        raise BackendUnavailable("this TensorRT is a runtime-only (lean) install and cannot build engines: build "
                                 "them where the full TensorRT is installed (python -m csref_model export "
                                 "--format tensorrt) on the same GPU model and TensorRT version, and copy the "
                                 "engines/ folder next to the graphs")
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    # parse_from_file resolves external weight files beside the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if settings.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        logger.info("%s: %d precision-sensitive layers pinned to FP32", graph, pin_fp32_layers(trt, network))
    input_shapes = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes(graph, input_shapes, settings).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} (see the TensorRT log above)")
    return bytes(serialized)


def load_or_build_engine(onnx_dir: Path, manifest: Manifest, graph: str, settings: EngineSettings,
                         device: torch.device, cache_dir: Path | None = None) -> tuple[object, bool]:
    """(deserialized ICudaEngine, whether it was (re)built now) for one graph."""
    trt = import_tensorrt()
    engines = Path(cache_dir) if cache_dir is not None else onnx_dir / "engines"
    engine_path, key_path = engines / f"{graph}.engine", engines / f"{graph}.engine.json"
    wanted = engine_key(trt, manifest, graph, settings, device)
    runtime = trt.Runtime(_trt_logger(trt))
    if engine_path.is_file() and key_path.is_file():
        stored = json.loads(key_path.read_text(encoding="utf-8"))
        if stored == wanted:
            engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if engine is not None:
                logger.info("loaded TensorRT engine %s", engine_path)
                return engine, False
            logger.warning("TensorRT refused the cached engine %s: rebuilding it", engine_path)
        else:
            changed = sorted(k for k in wanted if stored.get(k) != wanted[k])
            logger.warning("cached TensorRT engine %s was built for another %s: rebuilding it",
                           engine_path, ", ".join(changed))
    logger.info("building TensorRT engine for %s (%s); this takes minutes", graph, "fp16" if settings.fp16 else "fp32")
    serialized = build_engine(onnx_dir / manifest.graphs[graph], graph, settings)
    engines.mkdir(parents=True, exist_ok=True)
    for path, content in ((engine_path, serialized), (key_path, json.dumps(wanted, indent=2).encode())):
        temporary = path.with_suffix(path.suffix + ".tmp")
        temporary.write_bytes(content)
        os.replace(temporary, path)
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise RuntimeError(f"TensorRT could not load the engine it just built for {graph}")
    return engine, True


def build_engines(onnx_dir: Path, manifest: Manifest, settings: EngineSettings,
                  device: str | torch.device = "cuda", cache_dir: Path | None = None) -> dict[str, Path]:
    """Builds (or finds up to date) the engines of all the manifest's graphs; returns their paths."""
    if not torch.cuda.is_available():
        raise BackendUnavailable("building TensorRT engines needs a CUDA GPU (the engine is specific to it)")
    device = torch.device(device)
    engines = Path(cache_dir) if cache_dir is not None else Path(onnx_dir) / "engines"
    for graph in manifest.graph_specs():
        load_or_build_engine(Path(onnx_dir), manifest, graph, settings, device, cache_dir)
    return {graph: engines / f"{graph}.engine" for graph in manifest.graph_specs()}


class TensorRTGraph:
    """One graph's engine with its execution context; runs on torch CUDA tensors on the current stream."""

    def __init__(self, graph: str, spec: GraphSpec, engine, device: torch.device):
        trt = import_tensorrt()
        self.graph = graph
        self.spec = spec
        self.engine = engine
        self.device = device
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                  trt.int64: torch.int64, trt.bool: torch.bool}
        self.dtypes = {n: dtypes[engine.get_tensor_dtype(n)] for n in names}
        # (min, opt, max) of profile 0, to refuse out-of-range shapes with a clear message.
        self.bounds = {n: engine.get_tensor_profile_shape(n, 0) for n in self.inputs}

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """`inputs` in the order of the graph's input names (its GraphSpec)."""
        feeds = dict(zip(self.spec.inputs, inputs, strict=True))
        keep_alive = []
        for name in self.inputs:
            x = feeds[name].to(self.device, self.dtypes[name], non_blocking=True).contiguous()
            low, _, high = self.bounds[name]
            if any(s < lo or s > hi for s, lo, hi in zip(x.shape, low, high)):
                raise ValueError(f"input {name} of shape {tuple(x.shape)} is outside the engine's profile "
                                 f"{tuple(low)}..{tuple(high)}: rebuild the engines with a larger "
                                 "--max-audio-seconds / --max-batch")
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
            keep_alive.append(x)
        outputs = []
        for name in self.outputs:
            y = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, y.data_ptr())
            outputs.append(y)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
        return outputs


class TensorRTBackend:
    """The engines behind the Grounder's calls (three, four with a mask head); inputs may be CPU
    tensors, outputs are CUDA tensors."""

    name = "tensorrt"

    def __init__(self, onnx_dir: str | Path, manifest: Manifest, settings: EngineSettings,
                 device: str | torch.device = "cuda", cache_dir: Path | None = None):
        import_tensorrt()
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailable(f"backend 'tensorrt' needs a CUDA GPU, got {self.device}")
        self.image_size = manifest.config["image_size"]
        self.rebuilt = []
        self.graphs = {}
        for graph, spec in manifest.graph_specs().items():
            engine, rebuilt = load_or_build_engine(Path(onnx_dir), manifest, graph, settings, self.device, cache_dir)
            self.graphs[graph] = TensorRTGraph(graph, spec, engine, self.device)
            if rebuilt:
                self.rebuilt.append(graph)
        logger.info("tensorrt backend on %s (%s), engines built now: %s", torch.cuda.get_device_name(self.device),
                    "fp16" if settings.fp16 else "fp32", ", ".join(self.rebuilt) or "none")

    def encode_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        check_image(image, self.image_size)
        return self.graphs["image_encoder"]((image,))

    def encode_speech(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.graphs["speech_encoder"]((input_values, attention_mask))[0]

    def encode_image_and_speech(self, image: torch.Tensor, input_values: torch.Tensor,
                                attention_mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        # Both engines are queued on one CUDA stream; the GPU is the bottleneck, not the host.
        return self.encode_image(image), self.encode_speech(input_values, attention_mask)

    @property
    def has_mask(self) -> bool:
        return MASK_GRAPH in self.graphs

    def ground_features(self, maps: list[torch.Tensor], speech_feat: torch.Tensor) -> torch.Tensor:
        check_ground_inputs(maps, speech_feat)
        return self.graphs["grounding_head"]((*maps[:3], speech_feat))[0]

    def mask_features(self, maps: list[torch.Tensor], speech_feat: torch.Tensor) -> torch.Tensor:
        check_mask_inputs(self.has_mask, maps, speech_feat)
        return self.graphs[MASK_GRAPH]((*maps, speech_feat))[0].float()
