"""What every backend and every exported graph agrees on, spelled out once.

SREC runs as three graphs, split as the node uses them (image once per frame, speech once per
utterance, then the cheap grounding step):
* `speech_encoder`: input_values (B, L) float32, normalised audio at SAMPLE_RATE, + attention_mask
  (B, L) int32 -> speech_feat (B, D). B and L are dynamic; L is at least `min_speech_samples`.
* `image_encoder`: image (B, 3, S, S) float32 RGB in [0, 1] -> s8, s16, s32 maps. S is fixed (config).
* `grounding_head`: s8, s16, s32 + speech_feat -> cells (B, G*G, 5) x1, y1, x2, y2, score of every
  cell of the head's grid (row-major) in letterboxed pixels; the Grounder ranks them (the best
  cell is the model's answer, the next ones are the top-k candidates). Image batch and speech
  batch are separate dynamic axes; either may be 1 and broadcasts.
* With a mask head (`mask_head.enabled`, `graph_specs`): the image encoder also outputs the
  stride-4 map s4 (last), and a fourth graph `mask_head`: s8, s16, s32, s4 + speech_feat ->
  mask_logits (B, 2, S/4, S/4) (background, target) on the letterboxed input. The three graphs of
  a model without one are exactly as above.

An export directory holds one `.onnx` file per graph and `manifest.json` (`Manifest`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from csref_model.audio import SAMPLE_RATE, min_num_samples
from csref_model.config import ModelConfig

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: grounding_head outputs every cell (version 1: the best box only)
# Longest utterance the exported speech graph is built for (TensorRT's optimisation profile).
DEFAULT_MAX_AUDIO_SECONDS = 10.0
# Numeric precisions a backend may be asked for, and their torch dtypes; which backend serves
# which is decided in selection.py.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class GraphSpec:
    """Names and dynamic axes of one graph's inputs and outputs."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]


IMAGE_MAPS = ("s8", "s16", "s32")  # backbone outputs at strides 8, 16, 32
GRAPHS: dict[str, GraphSpec] = {
    "speech_encoder": GraphSpec(
        inputs=("input_values", "attention_mask"), outputs=("speech_feat",),
        dynamic_axes={"input_values": {0: "speech_batch", 1: "samples"},
                      "attention_mask": {0: "speech_batch", 1: "samples"},
                      "speech_feat": {0: "speech_batch"}}),
    "image_encoder": GraphSpec(
        inputs=("image",), outputs=IMAGE_MAPS,
        dynamic_axes={name: {0: "image_batch"} for name in ("image", *IMAGE_MAPS)}),
    "grounding_head": GraphSpec(
        inputs=(*IMAGE_MAPS, "speech_feat"), outputs=("cells",),
        dynamic_axes={**{name: {0: "image_batch"} for name in IMAGE_MAPS},
                      "speech_feat": {0: "speech_batch"}, "cells": {0: "batch"}}),
}


MASK_GRAPH = "mask_head"
MASK_MAPS = (*IMAGE_MAPS, "s4")  # the image encoder's outputs when the model has a mask head


def graph_specs(config: ModelConfig) -> dict[str, GraphSpec]:
    """The graphs of a model: GRAPHS, or with a mask head the image encoder with s4 and MASK_GRAPH."""
    if not config.mask_head.enabled:
        return GRAPHS
    return {
        **GRAPHS,
        "image_encoder": GraphSpec(inputs=("image",), outputs=MASK_MAPS,
                                   dynamic_axes={name: {0: "image_batch"} for name in ("image", *MASK_MAPS)}),
        MASK_GRAPH: GraphSpec(
            inputs=(*MASK_MAPS, "speech_feat"), outputs=("mask_logits",),
            dynamic_axes={**{name: {0: "image_batch"} for name in MASK_MAPS},
                          "speech_feat": {0: "speech_batch"}, "mask_logits": {0: "batch"}}),
    }


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (missing package, device or engine); the message says why."""


@runtime_checkable
class Backend(Protocol):
    """The calls the Grounder makes; torch tensors in (CPU is fine), outputs on the backend's device
    except `ground_features`, whose cells are float32."""

    name: str
    device: torch.device
    has_mask: bool  # the model has a mask head: encode_image adds s4, mask_features works

    def encode_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) float32 in [0, 1] -> [s8, s16, s32] maps."""

    def encode_speech(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) float32 + (B, L) int mask -> (B, D) speech feature."""

    def encode_image_and_speech(self, image: torch.Tensor, input_values: torch.Tensor,
                                attention_mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Both encoders for one `ground()` call (concurrently where that is faster)."""

    def ground_features(self, maps: list[torch.Tensor], speech_feat: torch.Tensor) -> torch.Tensor:
        """[s8, s16, s32] (s4 after them is ignored) + (B, D) -> (B, G*G, 5) x1, y1, x2, y2, score
        of every cell in letterboxed pixels."""

    def mask_features(self, maps: list[torch.Tensor], speech_feat: torch.Tensor) -> torch.Tensor:
        """[s8, s16, s32, s4] + (B, D) -> (B, 2, S/4, S/4) float32 mask logits; only for a model
        with a mask head (`has_mask`)."""


def min_speech_samples(config: ModelConfig) -> int:
    """Fewest samples an utterance needs for this model's wav2vec2 conv stack to yield one frame."""
    architecture = config.speech_encoder.architecture
    return min_num_samples(architecture.conv_kernel, architecture.conv_stride)


def speech_samples(seconds: float) -> int:
    """Samples of `seconds` of audio at the speech encoder's SAMPLE_RATE."""
    return int(seconds * SAMPLE_RATE)


def check_image(image: torch.Tensor, size: int | None = None) -> None:
    """The image input rules of every backend; `size` is the one side an exported graph accepts."""
    if image.dim() != 4 or image.shape[1] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float (B, 3, S, S) tensor, got {image.dtype} {tuple(image.shape)}")
    height, width = image.shape[-2:]
    if height != width or height % 32:
        raise ValueError(f"image must be square with a side that is a multiple of 32 (letterbox it), "
                         f"got {height}x{width}")
    if size is not None and height != size:
        raise ValueError(f"image must be {size}x{size}, the size the graphs were exported for, got {height}x{width}")


def check_ground_inputs(maps: list[torch.Tensor], speech_feat: torch.Tensor) -> None:
    """The grounding step's input rules: the image maps of encode_image (strides 8, 16, 32, and 4
    for a mask head), and batches that match or broadcast."""
    if len(maps) not in (len(IMAGE_MAPS), len(MASK_MAPS)):
        raise ValueError(f"ground_features needs the image maps of encode_image (strides 8, 16, 32, "
                         f"and 4 with a mask head), got {len(maps)}")
    image_batch, speech_batch = maps[0].shape[0], speech_feat.shape[0]
    if image_batch != speech_batch and 1 not in (image_batch, speech_batch):
        raise ValueError(f"image batch {image_batch} and speech batch {speech_batch} differ (one of them may be 1)")


def check_mask_inputs(has_mask: bool, maps: list[torch.Tensor], speech_feat: torch.Tensor) -> None:
    """The mask step's input rules: a model with a mask head and the four maps of its encode_image."""
    if not has_mask:
        raise RuntimeError("this model has no mask head, so it gives no mask (train one: python -m csref_training.ssc correct)")
    if len(maps) != len(MASK_MAPS):
        raise ValueError(f"mask_features needs the {len(MASK_MAPS)} image maps of encode_image (strides 8, 16, 32, 4), "
                         f"got {len(maps)}")
    check_ground_inputs(maps, speech_feat)


@dataclass
class Manifest:
    """What an export directory holds and which model it was exported from."""

    model_hash: str
    config: dict
    opset: int
    max_audio_seconds: float
    graphs: dict[str, str]  # graph name -> file name
    graph_hashes: dict[str, str]  # graph name -> sha256 of the .onnx file
    torch_version: str = torch.__version__
    version: int = MANIFEST_VERSION

    def write(self, directory: str | Path) -> None:
        path = Path(directory) / MANIFEST
        with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2)
        os.replace(path.with_suffix(".tmp"), path)

    def graph_specs(self) -> dict[str, GraphSpec]:
        """The graphs of the exported model (`graph_specs` of its config)."""
        return graph_specs(ModelConfig.from_dict(self.config, "export manifest"))

    @classmethod
    def read(cls, directory: str | Path) -> Manifest | None:
        """The manifest in `directory`, or None when there is none or it is from another format version."""
        path = Path(directory) / MANIFEST
        if not path.is_file():
            return None
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("version") != MANIFEST_VERSION:
                return None
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as error:
            logger.warning("ignoring unreadable export manifest %s (%s)", path, error)
            return None
