"""Inference API: an RGB image and a spoken referring expression in, the box meant out.

    grounder = Grounder.from_checkpoint("csref_refcoco_speech.pth", config="base")
    result = grounder.ground(image_rgb_uint8, waveform_float32, sample_rate)
    result.box_xyxy, result.score          # original-image pixels, sigmoid objectness
    result.candidates                      # (top_k, 5) the best cells, best first (top_k=1 by default)
    result.mask                            # (H, W) bool target pixels when the model has a mask head, else None

For a robot the two encoders run separately: the image once per camera frame, the speech once
per utterance, then `ground_features` fuses them; the result is identical to `ground`.

`backend` picks what runs the model (csref_model/runtime/selection.py): "torch" (default), "onnxruntime",
"tensorrt" or "auto" (the fastest available here); the API and the results (within the parity
tolerance, or the precision asked for) are the same for all.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from csref_model.audio import SAMPLE_RATE
from csref_model.boxes import box_iou
from csref_model.config import ModelConfig, load_model_config
from csref_model.mask_head import mask_to_original
from csref_model.preprocessing import Letterbox, letterbox, prepare_waveform, speech_batch
from csref_model.runtime.contract import min_speech_samples
from csref_model.runtime.selection import create_backend
from csref_model.srec import build_srec_from_checkpoint

logger = logging.getLogger(__name__)

# A candidate overlapping a better one more than this is the same object seen by a neighbouring
# cell (the head predicts one box per grid cell), not another candidate.
CANDIDATE_MAX_IOU = 0.5


@dataclass(frozen=True)
class GroundingResult:
    box_xyxy: np.ndarray  # (4,) float32 x1, y1, x2, y2 in original-image pixels, not clipped
    score: float  # sigmoid objectness of the chosen cell
    image_size: tuple[int, int]  # (width, height) of the original image
    # (K, 5) x1, y1, x2, y2, score of the best cells of the head's grid, best first (row 0 is
    # box_xyxy, score), original-image pixels, not clipped. K <= the top_k asked for: a cell whose
    # box overlaps a better candidate's by more than CANDIDATE_MAX_IOU is left out.
    candidates: np.ndarray
    # (H, W) bool, the target's pixels in the original image, when the model has a mask head
    # (csref_model.mask_head); None otherwise.
    mask: np.ndarray | None = None

    def to_dict(self) -> dict:
        return {"box_xyxy": [float(v) for v in self.box_xyxy], "score": self.score, "image_size": list(self.image_size),
                "candidates": [{"box_xyxy": [float(v) for v in row[:4]], "score": float(row[4])} for row in self.candidates]}


@dataclass(frozen=True)
class ImageFeatures:
    maps: list[torch.Tensor]  # backbone outputs at strides 8, 16, 32 (and 4 with a mask head), each (1, C, H, W)
    letterbox: Letterbox


@dataclass(frozen=True)
class SpeechFeatures:
    feature: torch.Tensor  # (1, D) pooled utterance feature


class Grounder:
    def __init__(self, model: nn.Module, config: ModelConfig, device: str | torch.device = "cpu",
                 backend: str = "torch", precision: str = "fp32", onnx_dir: str | Path | None = None,
                 threads: int | None = None):
        """`precision` is fp32, fp16 or bf16 (reduced precision on CUDA only); `onnx_dir` holds (or
        receives) the exported graphs for onnxruntime/tensorrt; `threads` sets ONNX Runtime's."""
        self.device = torch.device(device)
        self.model = model.eval()
        self.config = config
        self.backend = create_backend(backend, self.model, config, self.device, precision, onnx_dir, threads)
        self.min_samples = min_speech_samples(config)
        self.has_mask = self.backend.has_mask

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config: str | Path | ModelConfig | None = None,
        device: str | torch.device = "cpu",
        **backend_options,
    ) -> "Grounder":
        """Official `.pth` (needs `config`, e.g. "base") or our checkpoint directory.

        `config` is "base", "tiny", a YAML path or a ModelConfig; None reads it from our directory.
        `backend_options`: backend, precision, onnx_dir, threads (see `__init__`).
        """
        if config is None and Path(path).is_file():
            raise ValueError(f"{path} is an official-format file, which stores no model config: "
                             "pass config='base' (the paper's model) or a YAML path")
        if config is not None and not isinstance(config, ModelConfig):
            config = load_model_config(config)
        model, config = build_srec_from_checkpoint(path, config)
        return cls(model, config, device, **backend_options)

    @classmethod
    def from_model(cls, model: nn.Module, config: ModelConfig, device: str | torch.device = "cpu",
                   **backend_options) -> "Grounder":
        return cls(model, config, device, **backend_options)

    @torch.inference_mode()
    def ground(self, image: np.ndarray, audio: np.ndarray, sample_rate: int = SAMPLE_RATE,
               top_k: int = 1) -> GroundingResult:
        """One H x W x 3 uint8 RGB image and one mono float waveform -> the box meant (and the
        top_k best cells as candidates)."""
        image_tensor, geometry = letterbox(image, self.config.image_size)
        input_values, attention_mask = self._speech_inputs([audio], sample_rate)
        image_maps, speech_feat = self.backend.encode_image_and_speech(image_tensor[None], input_values, attention_mask)
        return self._results(image_maps, speech_feat, [geometry], top_k)[0]

    @torch.inference_mode()
    def ground_batch(
        self, images: Sequence[np.ndarray], audios: Sequence[np.ndarray], sample_rate: int = SAMPLE_RATE, top_k: int = 1
    ) -> list[GroundingResult]:
        """Pairs of images and utterances, images encoded as one batch.

        Each utterance is encoded on its own, so every result equals `ground` on its pair up to
        float rounding (padded wav2vec2 batches change the features of shorter utterances).
        """
        if len(images) != len(audios):
            raise ValueError(f"ground_batch needs as many images as utterances, got {len(images)} and {len(audios)}")
        if not images:
            return []
        letterboxed = [letterbox(image, self.config.image_size) for image in images]
        image_batch = torch.stack([tensor for tensor, _ in letterboxed])  # (B, 3, S, S)
        speech = torch.cat([self._encode_speech(audio, sample_rate) for audio in audios])  # (B, D)
        return self._results(self.backend.encode_image(image_batch), speech, [g for _, g in letterboxed], top_k)

    @torch.inference_mode()
    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        image_tensor, geometry = letterbox(image, self.config.image_size)
        return ImageFeatures(maps=self.backend.encode_image(image_tensor[None]), letterbox=geometry)

    @torch.inference_mode()
    def encode_speech(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> SpeechFeatures:
        return SpeechFeatures(feature=self._encode_speech(audio, sample_rate))

    @torch.inference_mode()
    def ground_features(self, image_features: ImageFeatures, speech_features: SpeechFeatures,
                        top_k: int = 1) -> GroundingResult:
        return self._results(image_features.maps, speech_features.feature, [image_features.letterbox], top_k)[0]

    def _results(self, maps: list[torch.Tensor], speech_feat: torch.Tensor, geometries: list[Letterbox],
                 top_k: int) -> list[GroundingResult]:
        cells = self.backend.ground_features(maps, speech_feat)  # (B, G*G, 5)
        masks = self.backend.mask_features(maps, speech_feat) if self.has_mask else [None] * len(cells)  # (B, 2, S/4, S/4)
        return [_result(item, geometry, top_k, logits) for item, geometry, logits in zip(cells, geometries, masks)]

    def _speech_inputs(self, audios: Sequence[np.ndarray], sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
        waves = [prepare_waveform(audio, sample_rate, min_samples=self.min_samples) for audio in audios]
        return speech_batch(waves)  # (B, L), (B, L) on the CPU; the backend moves them

    def _encode_speech(self, audio: np.ndarray, sample_rate: int) -> torch.Tensor:
        return self.backend.encode_speech(*self._speech_inputs([audio], sample_rate))  # (1, D)


def _result(cells: torch.Tensor, geometry: Letterbox, top_k: int, mask_logits: torch.Tensor | None) -> GroundingResult:
    """(G*G, 5) letterboxed-input x1, y1, x2, y2, score of every cell (and (2, S/4, S/4) mask logits)
    -> result in original-image pixels."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    cells = cells.double().cpu().numpy()
    # Stable: equal scores keep grid order, so the best is argmax's first index, as the reference.
    ordered = cells[np.argsort(-cells[:, 4], kind="stable")]  # (G*G, 5)
    kept = [0]
    for index in range(1, len(ordered)):
        if len(kept) == top_k:
            break
        if box_iou(ordered[kept, :4], ordered[index, :4]).max() <= CANDIDATE_MAX_IOU:
            kept.append(index)
    ranked = ordered[kept]  # (K, 5)
    candidates = np.concatenate([geometry.box_to_original(ranked[:, :4]), ranked[:, 4:]], axis=1).astype(np.float32)
    return GroundingResult(
        box_xyxy=candidates[0, :4].copy(),
        score=float(ranked[0, 4]),
        image_size=(geometry.w, geometry.h),
        candidates=candidates,
        mask=None if mask_logits is None else mask_to_original(mask_logits, geometry),
    )
