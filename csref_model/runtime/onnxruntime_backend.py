"""The exported ONNX graphs on ONNX Runtime: CPU, or the CUDA execution provider when it is present.

`onnxruntime` is an optional dependency (the `export` extra): it is imported when a backend is
built, after `check_onnxruntime` has said clearly what is missing.
"""

from __future__ import annotations

import importlib.util
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from csref_model.runtime.contract import (MASK_GRAPH, BackendUnavailable, Manifest, check_ground_inputs,
                                          check_mask_inputs,
                                          check_image)

logger = logging.getLogger(__name__)


def check_onnxruntime(device: torch.device) -> None:
    """Raises BackendUnavailable before any export work when ONNX Runtime cannot run on `device`."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise BackendUnavailable("backend 'onnxruntime' needs the onnxruntime package (pip install 'csref_ros[export]')")
    import onnxruntime  # optional dependency, present as checked just above

    available = onnxruntime.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" not in available:
        raise BackendUnavailable(f"backend 'onnxruntime' on CUDA needs onnxruntime-gpu (the CUDA execution provider); "
                                 f"this onnxruntime has {', '.join(available)}")
    if device.type not in ("cpu", "cuda"):
        raise BackendUnavailable(f"backend 'onnxruntime' runs on cpu or cuda, not {device}")


class OnnxRuntimeBackend:
    """All graph optimisations are on (conv+BN folding, GELU/LayerNorm fusions, constant folding).

    `threads` (default: torch's thread count) are the intra-op threads of the speech encoder and
    grounding head, the path after the end of a sentence; the image encoder gets half of them, so
    that on the CPU a frame can be encoded beside an utterance, and `encode_image_and_speech` runs
    the two encoders concurrently (measured on 2 shared cores: 1.15-1.4x faster than one after the
    other with 2 threads each).
    """

    name = "onnxruntime"

    def __init__(self, onnx_dir: str | Path, device: str | torch.device = "cpu", threads: int | None = None):
        self.device = torch.device(device)
        check_onnxruntime(self.device)
        import onnxruntime  # optional dependency, checked by check_onnxruntime

        if self.device.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        manifest = Manifest.read(onnx_dir)
        if manifest is None:
            raise FileNotFoundError(f"{onnx_dir} holds no export manifest: export the model first "
                                    "(python -m csref_model export ... --format onnx --out DIR)")
        self.threads = threads or torch.get_num_threads()
        graph_threads = {"speech_encoder": self.threads, "image_encoder": max(1, self.threads // 2),
                         "grounding_head": self.threads, MASK_GRAPH: self.threads}
        self.specs = manifest.graph_specs()
        self.sessions = {}
        for name in self.specs:
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

    def _run(self, graph: str, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """`inputs` in the order of the graph's input names (its GraphSpec)."""
        arrays = {name: x.detach().cpu().numpy() for name, x in zip(self.specs[graph].inputs, inputs, strict=True)}
        return [torch.from_numpy(x) for x in self.sessions[graph].run(None, arrays)]

    def encode_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        check_image(image, self.image_size)
        return self._run("image_encoder", (image.float(),))

    def encode_image_and_speech(self, image: torch.Tensor, input_values: torch.Tensor,
                                attention_mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        maps = self.image_worker.submit(self.encode_image, image)
        speech_feat = self.encode_speech(input_values, attention_mask)
        return maps.result(), speech_feat

    def encode_speech(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run("speech_encoder", (input_values.float(), attention_mask.to(torch.int32)))[0]

    @property
    def has_mask(self) -> bool:
        return MASK_GRAPH in self.sessions

    def ground_features(self, maps: list[torch.Tensor], speech_feat: torch.Tensor) -> torch.Tensor:
        check_ground_inputs(maps, speech_feat)
        return self._run("grounding_head", (*maps[:3], speech_feat))[0]

    def mask_features(self, maps: list[torch.Tensor], speech_feat: torch.Tensor) -> torch.Tensor:
        check_mask_inputs(self.has_mask, maps, speech_feat)
        return self._run(MASK_GRAPH, (*maps, speech_feat))[0]
