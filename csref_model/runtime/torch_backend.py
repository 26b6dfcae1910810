"""Eager PyTorch backend, tuned per device: BatchNorms folded into convolutions, channels-last,
autocast to fp16/bf16 and CUDA graphs of the fixed-shape image encoder and grounding step."""

from __future__ import annotations

import copy
import logging
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from csref_model.fusion import GaranAttention, SimpleFusion
from csref_model.layers import ConvBnAct
from csref_model.runtime.contract import (PRECISIONS, BackendUnavailable, check_ground_inputs, check_image,
                                          check_mask_inputs)

logger = logging.getLogger(__name__)


def fold_batchnorm(model: nn.Module) -> int:
    """Folds every eval-mode BatchNorm that directly follows a convolution into it, in place.

    Returns the number of folded pairs. BatchNorms that follow something else stay: SimpleFusion's
    `norm` (after the visual x speech product) and GELUConv's (after its residual sum).
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (running statistics are folded)")
    pairs = []  # (owner, conv attribute or index, bn attribute or index)
    for module in model.modules():
        if isinstance(module, ConvBnAct):
            pairs.append((module, "conv", module.norm_name))
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
        self.mask_head = model.mask_head


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

    @property
    def has_mask(self) -> bool:
        return self.parts.mask_head is not None

    def _image_maps(self, image: torch.Tensor) -> list[torch.Tensor]:
        with self._autocast():
            stride4, *maps = self.parts.visual_encoder.pyramid(image.contiguous(memory_format=self.memory_format))
            return [*maps, stride4] if self.has_mask else maps  # s8, s16, s32 (, s4)

    def _trunk(self, s8: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor,
               speech_feat: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        parts = self.parts
        fused = [fusion(visual, speech_feat) for fusion, visual in zip(parts.fusion_manner, (s8, s16, s32))]
        return fused, parts.attention_manner(speech_feat, parts.multi_scale_manner(fused))  # top (B, C, G, G)

    def _ground(self, s8: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor,
                speech_feat: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            _, top = self._trunk(s8, s16, s32, speech_feat)
            return self.parts.head.scored_cells(top).float()  # (B, G*G, 5)

    def _mask(self, s8: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor, s4: torch.Tensor,
              speech_feat: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            fused, top = self._trunk(s8, s16, s32, speech_feat)
            return self.parts.mask_head(s4, fused, top, speech_feat).float()  # (B, 2, S/4, S/4)

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
        check_ground_inputs(maps, speech_feat)
        if self.use_cuda_graphs:
            return self._captured("ground", self._ground, (*maps[:3], speech_feat))
        return self._ground(*maps[:3], speech_feat)

    @torch.inference_mode()
    def mask_features(self, maps: list[torch.Tensor], speech_feat: torch.Tensor) -> torch.Tensor:
        check_mask_inputs(self.has_mask, maps, speech_feat)
        if self.use_cuda_graphs:
            return self._captured("mask", self._mask, (*maps, speech_feat))
        return self._mask(*maps, speech_feat)

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
