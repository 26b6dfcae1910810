"""Inference backends behind the Grounder: the model's three split calls on torch, ONNX Runtime or TensorRT.

Every backend offers the same three calls, with torch tensors in and out:
* `encode_image(image (B, 3, S, S) float32 in [0, 1]) -> [s8, s16, s32]` maps;
* `encode_speech(input_values (B, L) float32, attention_mask (B, L) int32) -> (B, D)`;
* `ground_features(maps, speech_feat) -> (B, 5)` x1, y1, x2, y2, score in letterboxed pixels;
* `encode_image_and_speech(image, input_values, attention_mask) -> (maps, speech_feat)`, both
  encoders for one `ground()` call (concurrently where that is faster).
Inputs may live on the CPU; outputs stay on the backend's device until `ground_features`, whose
boxes are float32.

`create_backend(name, ...)` builds one by name. An explicitly named backend that cannot run here
raises `BackendUnavailable` saying why; `auto` tries the fastest candidates for the device in
order and logs its choice and every candidate it skipped.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from csref_model.backbone import ConvBnAct
from csref_model.config import ModelConfig
from csref_model.fusion import ConvBnLeaky, GaranAttention, SimpleFusion
from csref_model.head import BaseConv
from csref_model.srec import check_image

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Fastest first, from the measurements in docs/DEPLOYMENT.md.
AUTO_ORDER = {"cuda": ("tensorrt", "torch", "onnxruntime"), "cpu": ("onnxruntime", "torch")}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (missing package, device or engine); the message says why."""


# ----------------------------------------------------------------------------------------
# torch


def fold_batchnorm(model: nn.Module) -> int:
    """Folds every eval-mode BatchNorm that directly follows a convolution into it, in place.

    Returns the number of folded pairs. BatchNorms that follow something else stay: SimpleFusion's
    `norm` (after the visual x speech product) and GELUConv's (after its residual sum).
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (running statistics are folded)")
    pairs = []  # (owner, conv attribute or index, bn attribute or index)
    for module in model.modules():
        if isinstance(module, (ConvBnAct, BaseConv)):
            pairs.append((module, "conv", "bn"))
        elif isinstance(module, ConvBnLeaky):
            pairs.append((module, "conv", "batch_norm"))
        elif isinstance(module, GaranAttention):
            pairs.append((module, "w_o", "layer_norm"))  # layer_norm(w_o(out)) + visual
        elif isinstance(module, SimpleFusion):
            pairs += [(module.v_proj, 0, 1), (module.q_proj, 0, 1)]
    for owner, conv_key, bn_key in pairs:
        conv, bn = _child(owner, conv_key), _child(owner, bn_key)
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
            continue  # already folded
        _set_child(owner, conv_key, fuse_conv_bn_eval(conv, bn))
        _set_child(owner, bn_key, nn.Identity())
    return len(pairs)


def _child(owner: nn.Module, key: str | int) -> nn.Module:
    return owner[key] if isinstance(key, int) else getattr(owner, key)


def _set_child(owner: nn.Module, key: str | int, module: nn.Module) -> None:
    if isinstance(key, int):
        owner[key] = module
    else:
        setattr(owner, key, module)


class ConvolutionalParts(nn.Module):
    """The image and grounding halves of SREC, for a folded copy that shares no BatchNorm with the original."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.visual_encoder = model.visual_encoder
        self.fusion_manner = model.fusion_manner
        self.multi_scale_manner = model.multi_scale_manner
        self.attention_manner = model.attention_manner
        self.head = model.head


class TorchBackend:
    """Eager PyTorch, tuned per device.

    CPU: inference mode, BatchNorms folded into the convolutions of a copy of the image/grounding
    parts (the speech encoder is shared with the original model, which stays untouched), optional
    channels-last for the image encoder.
    CUDA: cuDNN on (benchmark mode), TF32 off unless `allow_tf32`, fp16/bf16 by autocast (norms and
    softmax stay fp32 under autocast), and CUDA graphs for the fixed-shape image encoder and
    grounding head, captured per batch size on first use.
    """

    name = "torch"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", precision: str = "fp32",
                 fold_bn: bool = True, channels_last: bool = False, cuda_graphs: bool = True,
                 allow_tf32: bool = False):
        self.device = torch.device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if self.device.type == "cpu" and precision != "fp32":
            raise ValueError(f"the torch backend runs {precision} on CUDA only; use precision='fp32' on the CPU")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("device 'cuda' requested but torch sees no CUDA GPU "
                                     f"(torch {torch.__version__}); use device='cpu'")
        self.precision = precision
        self.model = model.to(self.device).eval()
        self.parts = ConvolutionalParts(self.model).eval()
        self.folded = 0
        if fold_bn:
            self.parts = copy.deepcopy(self.parts)
            self.folded = fold_batchnorm(self.parts)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.parts.visual_encoder.to(memory_format=torch.channels_last)
        self.use_cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs: dict[tuple, CapturedCall] = {}
        if self.device.type == "cuda":
            torch.backends.cudnn.enabled = True
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            torch.backends.cudnn.allow_tf32 = allow_tf32
        logger.info("torch backend on %s, %s, %d conv+BN pairs folded, channels_last=%s, cuda_graphs=%s",
                    self.device, precision, self.folded, channels_last, self.use_cuda_graphs)

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=PRECISIONS[self.precision],
                              enabled=self.precision != "fp32")

    def _image_maps(self, image: torch.Tensor) -> list[torch.Tensor]:
        with self._autocast():
            return self.parts.visual_encoder(image.contiguous(memory_format=self.memory_format))

    def _ground(self, s8: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor,
                speech_feat: torch.Tensor) -> torch.Tensor:
        parts = self.parts
        with self._autocast():
            fused = [fusion(visual, speech_feat) for fusion, visual in zip(parts.fusion_manner, (s8, s16, s32))]
            top = parts.attention_manner(speech_feat, parts.multi_scale_manner(fused))  # (B, C, G, G)
            return parts.head(top).float()  # (B, 5)

    @torch.inference_mode()
    def encode_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        check_image(image)
        image = image.to(self.device, non_blocking=True)
        if self.use_cuda_graphs:
            return self._captured("image", self._image_maps, (image,))
        return self._image_maps(image)

    @torch.inference_mode()
    def encode_speech(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            feat = self.model.encode_speech(input_values.to(self.device, non_blocking=True),
                                            attention_mask.to(self.device, non_blocking=True))
        return feat.float()

    def encode_image_and_speech(self, image: torch.Tensor, input_values: torch.Tensor,
                                attention_mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        # torch's intra-op threads already use every core for each encoder in turn.
        return self.encode_image(image), self.encode_speech(input_values, attention_mask)

    @torch.inference_mode()
    def ground_features(self, maps: list[torch.Tensor], speech_feat: torch.Tensor) -> torch.Tensor:
        _check_ground_inputs(maps, speech_feat)
        if self.use_cuda_graphs:
            return self._captured("ground", self._ground, (*maps, speech_feat))
        return self._ground(*maps, speech_feat)

    def _captured(self, name: str, function: Callable, inputs: tuple[torch.Tensor, ...]):
        key = (name, *(tuple(x.shape) for x in inputs), *(x.dtype for x in inputs))
        if key not in self.graphs:
            self.graphs[key] = CapturedCall(function, inputs)
            logger.info("captured a CUDA graph for %s with input shapes %s", name, key[1:1 + len(inputs)])
        return self.graphs[key](inputs)


class CapturedCall:
    """A CUDA graph of `function` on static copies of its inputs; outputs are cloned on every call so
    cached features survive the next replay."""

    def __init__(self, function: Callable, inputs: tuple[torch.Tensor, ...]):
        self.static_inputs = tuple(x.clone() for x in inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # cuDNN autotuning and lazy initialisation happen before capture
                function(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = function(*self.static_inputs)

    def __call__(self, inputs: tuple[torch.Tensor, ...]):
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        if isinstance(self.static_outputs, torch.Tensor):
            return self.static_outputs.clone()
        return [x.clone() for x in self.static_outputs]


def _check_ground_inputs(maps: list[torch.Tensor], speech_feat: torch.Tensor) -> None:
    if len(maps) != 3:
        raise ValueError(f"ground_features needs the 3 image maps of encode_image (strides 8, 16, 32), got {len(maps)}")
    image_batch, speech_batch = maps[0].shape[0], speech_feat.shape[0]
    if image_batch != speech_batch and 1 not in (image_batch, speech_batch):
        raise ValueError(f"image batch {image_batch} and speech batch {speech_batch} differ (one of them may be 1)")


# ----------------------------------------------------------------------------------------
# ONNX Runtime


class OnnxRuntimeBackend:
    """The exported ONNX graphs on ONNX Runtime: CPU, or the CUDA execution provider when it is present.

    All graph optimisations are on (conv+BN folding, GELU/LayerNorm fusions, constant folding).
    `threads` (default: torch's thread count) are the intra-op threads of the speech encoder and
    grounding head, the path after the end of a sentence; the image encoder gets half of them, so
    that on the CPU a frame can be encoded beside an utterance, and `encode_image_and_speech` runs
    the two encoders concurrently (measured on 2 shared cores: 1.15-1.4x faster than one after the
    other with 2 threads each).
    """

    name = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, device: str | torch.device = "cpu", threads: int | None = None):
        self.device = torch.device(device)
        _check_onnxruntime(self.device)
        import onnxruntime

        from csref_model.export import GRAPHS, read_manifest

        if self.device.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        manifest = read_manifest(onnx_dir)
        if manifest is None:
            raise FileNotFoundError(f"{onnx_dir} holds no export manifest: export the model first "
                                    "(python -m csref_model.export ... --format onnx --out DIR)")
        self.threads = threads or torch.get_num_threads()
        graph_threads = {"speech_encoder": self.threads, "image_encoder": max(1, self.threads // 2),
                         "grounding_head": self.threads}
        self.sessions = {}
        for name in GRAPHS:
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = graph_threads[name]
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # warnings about unused initialisers and shape inference are noise here
            # Idle workers sleep instead of spinning: on a CPU shared with other processes (the robot's
            # other nodes), spinning threads steal the cores the work needs (measured on 2 loaded cores:
            # speech 3 s with 2 threads 1.69 s spinning vs 1.37 s not); on an idle CPU the cost is noise.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.sessions[name] = onnxruntime.InferenceSession(str(Path(onnx_dir) / manifest.graphs[name]), options,
                                                               providers=providers)
        # ONNX Runtime releases the GIL while it runs, so a Python thread gives real concurrency.
        self.image_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="csref-image")
        self.providers = self.sessions["speech_encoder"].get_providers()
        self.image_size = manifest.config["image_size"]
        logger.info("onnxruntime backend: %s, %d intra-op threads, graphs from %s",
                    ", ".join(self.providers), self.threads, onnx_dir)

    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        arrays = {name: x.detach().cpu().numpy() for name, x in feeds.items()}
        return [torch.from_numpy(x) for x in self.sessions[graph].run(None, arrays)]

    def encode_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        check_image(image, self.image_size)
        return self._run("image_encoder", {"image": image.float()})

    def encode_image_and_speech(self, image: torch.Tensor, input_values: torch.Tensor,
                                attention_mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        maps = self.image_worker.submit(self.encode_image, image)
        speech_feat = self.encode_speech(input_values, attention_mask)
        return maps.result(), speech_feat

    def encode_speech(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run("speech_encoder", {"input_values": input_values.float(),
                                            "attention_mask": attention_mask.to(torch.int32)})[0]

    def ground_features(self, maps: list[torch.Tensor], speech_feat: torch.Tensor) -> torch.Tensor:
        _check_ground_inputs(maps, speech_feat)
        s8, s16, s32 = maps
        return self._run("grounding_head", {"s8": s8, "s16": s16, "s32": s32, "speech_feat": speech_feat})[0]


# ----------------------------------------------------------------------------------------
# Selection


def _check_onnxruntime(device: torch.device) -> None:
    """Raises BackendUnavailable before any export work when ONNX Runtime cannot run on `device`."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise BackendUnavailable("backend 'onnxruntime' needs the onnxruntime package (pip install 'csref_ros[export]')")
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" not in available:
        raise BackendUnavailable(f"backend 'onnxruntime' on CUDA needs onnxruntime-gpu (the CUDA execution provider); "
                                 f"this onnxruntime has {', '.join(available)}")
    if device.type not in ("cpu", "cuda"):
        raise BackendUnavailable(f"backend 'onnxruntime' runs on cpu or cuda, not {device}")


def tensorrt_importable() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def create_backend(name: str, model: nn.Module, config: ModelConfig, device: str | torch.device = "cpu",
                   precision: str = "fp32", onnx_dir: str | Path | None = None, threads: int | None = None,
                   max_audio_seconds: float | None = None):
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
        candidates = ("torch",)  # reaches the clear fp32-only error below
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
           onnx_dir: str | Path | None, threads: int | None, max_audio_seconds: float | None):
    from csref_model.export import DEFAULT_MAX_AUDIO_SECONDS, ensure_onnx

    max_audio_seconds = max_audio_seconds or DEFAULT_MAX_AUDIO_SECONDS
    if name == "torch":
        return TorchBackend(model, device, precision)
    if name == "onnxruntime":
        if precision != "fp32":
            raise BackendUnavailable(f"backend 'onnxruntime' runs the fp32 graphs; {precision} is served by "
                                     "the torch (CUDA) and tensorrt backends")
        _check_onnxruntime(device)
        directory, _ = ensure_onnx(model, config, onnx_dir, max_audio_seconds)
        return OnnxRuntimeBackend(directory, device, threads)
    if name == "tensorrt":
        if device.type != "cuda":
            raise BackendUnavailable(f"backend 'tensorrt' needs a CUDA device, got {device}")
        if not tensorrt_importable():
            raise BackendUnavailable("backend 'tensorrt' needs the TensorRT 10 Python package "
                                     "(pip install tensorrt-cu12 or tensorrt-cu13, or JetPack's python3-libnvinfer)")
        if precision == "bf16":
            raise BackendUnavailable("backend 'tensorrt' builds fp32 or fp16 engines; use precision fp16")
        from csref_model.audio import min_num_samples
        from csref_model.tensorrt_engine import EngineSettings, TensorRTBackend

        architecture = config.speech_encoder.architecture
        settings = EngineSettings(fp16=precision == "fp16", max_audio_seconds=max_audio_seconds,
                                  min_samples=min_num_samples(architecture.conv_kernel, architecture.conv_stride))
        directory, manifest = ensure_onnx(model, config, onnx_dir, max_audio_seconds)
        return TensorRTBackend(directory, manifest, settings, device)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
