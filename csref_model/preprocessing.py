"""Image and speech preprocessing exactly as the CSRef reference does it.

Image: letterbox to a square S x S canvas (cv2.resize INTER_LINEAR, grey fill 127), RGB in
[0, 1], CHW. Boxes move between original-image pixels, letterboxed-input pixels and the
normalised (cx, cy, w, h) training label with the `Letterbox` geometry.

Speech: mono float32 waveform -> 16 kHz (soxr HQ, csref_model.audio.resample) -> silence trimmed
(librosa.effects.trim defaults) -> batch padded with zeros and each utterance normalised to
zero mean / unit variance over its valid samples (Wav2Vec2FeatureExtractor's maths).

Every user-facing check raises ValueError (FileNotFoundError for a missing file) whose message
says what was wrong and what to do.
"""

import logging
from dataclasses import dataclass
from typing import Sequence

import cv2
import librosa
import numpy as np
import torch

from csref_model.audio import SAMPLE_RATE, WAV2VEC2_BASE_MIN_SAMPLES, resample

logger = logging.getLogger(__name__)

LETTERBOX_FILL = 127
# Label coordinates are clipped to [0, 0.99] by the reference (label2yolobox).
LABEL_MAX = 0.99
# Wav2Vec2FeatureExtractor adds this to the variance before the square root.
NORMALISE_EPS = 1e-7


# ----------------------------------------------------------------------------------------
# Image


@dataclass(frozen=True)
class Letterbox:
    """Geometry of one letterboxed image: original h x w resized to nh x nw, pasted at (dx, dy)."""

    h: int
    w: int
    nh: int
    nw: int
    dx: int
    dy: int
    size: int

    def box_to_original(self, xyxy: np.ndarray | Sequence[float]) -> np.ndarray:
        """Letterboxed-input pixels (..., 4) x1,y1,x2,y2 -> original-image pixels. No clipping."""
        box = np.asarray(xyxy, dtype=np.float64)
        x1 = (box[..., 0] - self.dx) / self.nw * self.w
        y1 = (box[..., 1] - self.dy) / self.nh * self.h
        # The reference adds the scaled width/height to the corner rather than mapping x2, y2.
        x2 = x1 + (box[..., 2] - box[..., 0]) / self.nw * self.w
        y2 = y1 + (box[..., 3] - box[..., 1]) / self.nh * self.h
        return np.stack([x1, y1, x2, y2], axis=-1)

    def box_to_input(self, xyxy: np.ndarray | Sequence[float]) -> np.ndarray:
        """Original-image pixels (..., 4) x1,y1,x2,y2 -> letterboxed-input pixels. No clipping."""
        box = np.asarray(xyxy, dtype=np.float64)
        x1 = box[..., 0] / self.w * self.nw + self.dx
        y1 = box[..., 1] / self.h * self.nh + self.dy
        x2 = box[..., 2] / self.w * self.nw + self.dx
        y2 = box[..., 3] / self.h * self.nh + self.dy
        return np.stack([x1, y1, x2, y2], axis=-1)

    def box_to_label(self, xyxy: np.ndarray | Sequence[float]) -> np.ndarray:
        """Original-image pixels (..., 4) x1,y1,x2,y2 -> training label (..., 4) cx,cy,w,h.

        Normalised by the input side and clipped to [0, 0.99], in the reference's order of
        operations (label2yolobox), so labels match it to the last bit.
        """
        box = np.asarray(xyxy, dtype=np.float64)
        x1 = box[..., 0] / self.w
        y1 = box[..., 1] / self.h
        x2 = box[..., 2] / self.w
        y2 = box[..., 3] / self.h
        cx = ((x1 + x2) / 2 * self.nw + self.dx) / self.size
        cy = ((y1 + y2) / 2 * self.nh + self.dy) / self.size
        bw = (box[..., 2] - box[..., 0]) * (self.nw / self.w / self.size)
        bh = (box[..., 3] - box[..., 1]) * (self.nh / self.h / self.size)
        return np.clip(np.stack([cx, cy, bw, bh], axis=-1), 0.0, LABEL_MAX)


def check_image(image: np.ndarray, name: str = "image") -> None:
    """Raise ValueError unless `image` is an H x W x 3 uint8 RGB array."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array (H x W x 3 uint8 RGB), got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"{name} must have dtype uint8 (0..255 RGB), got {image.dtype}; "
            "for float images in [0, 1] use (image * 255).round().astype(np.uint8)"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        hint = ""
        if image.ndim == 2:
            hint = "; it looks greyscale: convert with cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)"
        elif image.ndim == 3 and image.shape[2] == 4:
            hint = "; it looks RGBA: drop alpha with image[..., :3]"
        elif image.ndim == 3 and image.shape[0] == 3:
            hint = "; it looks channels-first: use image.transpose(1, 2, 0)"
        raise ValueError(f"{name} must have shape H x W x 3 (RGB), got {image.shape}{hint}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {image.shape}")


def letterbox_geometry(h: int, w: int, size: int) -> Letterbox:
    """Resized size and padding offsets for an h x w picture on a size x size canvas."""
    aspect = w / h
    # Same float expressions as the reference, so int() truncates identically.
    if aspect < 1:
        nh, nw = size, int(size * aspect)
    else:
        nw, nh = size, int(size / aspect)
    if nw < 1 or nh < 1:
        raise ValueError(
            f"image of {w}x{h} pixels has too extreme an aspect ratio for a {size}x{size} input "
            f"(it would be resized to {nw}x{nh}); crop it first"
        )
    return Letterbox(h=h, w=w, nh=nh, nw=nw, dx=(size - nw) // 2, dy=(size - nh) // 2, size=size)


def letterbox(image: np.ndarray, size: int) -> tuple[torch.Tensor, Letterbox]:
    """H x W x 3 uint8 RGB -> ((3, size, size) float32 in [0, 1], geometry)."""
    check_image(image)
    h, w = image.shape[:2]
    geometry = letterbox_geometry(h, w, size)
    resized = cv2.resize(np.ascontiguousarray(image), (geometry.nw, geometry.nh), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((size, size, 3), LETTERBOX_FILL, dtype=np.uint8)
    canvas[geometry.dy : geometry.dy + geometry.nh, geometry.dx : geometry.dx + geometry.nw] = resized
    tensor = torch.from_numpy(canvas).permute(2, 0, 1).float().div(255)  # (3, S, S)
    return tensor, geometry


# ----------------------------------------------------------------------------------------
# Speech


def check_waveform(wave: np.ndarray, name: str = "audio") -> np.ndarray:
    """Raise ValueError unless `wave` is a non-empty, finite, not all-zero 1-D float waveform.

    Returns it as float32.
    """
    if not isinstance(wave, np.ndarray):
        raise ValueError(f"{name} must be a 1-D numpy float32 array, got {type(wave).__name__}")
    if wave.ndim != 1:
        raise ValueError(
            f"{name} must be a mono 1-D waveform, got shape {wave.shape}; "
            "squeeze a single channel or average channels (e.g. wave.mean(axis=1) for (N, C))"
        )
    if not np.issubdtype(wave.dtype, np.floating):
        hint = "; for 16-bit PCM use wave.astype(np.float32) / 32768" if np.issubdtype(wave.dtype, np.integer) else ""
        raise ValueError(f"{name} must be a float waveform in [-1, 1], got dtype {wave.dtype}{hint}")
    if wave.size == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    if not np.isfinite(wave).all():
        bad = int(np.count_nonzero(~np.isfinite(wave)))
        raise ValueError(f"{name} contains {bad} NaN/inf samples (first at index {int(np.argmin(np.isfinite(wave)))})")
    if not np.any(wave):
        raise ValueError(f"{name} is all zeros ({wave.size} samples of silence): nothing to recognise")
    return wave.astype(np.float32, copy=False)


def prepare_waveform(
    wave: np.ndarray,
    sample_rate: int,
    trim: bool = True,
    min_samples: int = WAV2VEC2_BASE_MIN_SAMPLES,
) -> np.ndarray:
    """Validate, resample to 16 kHz and trim silence -> float32 (N,) ready for `speech_batch`.

    `min_samples` is the shortest waveform (at 16 kHz, after trimming) the speech encoder's
    conv stack can turn into one frame; see `min_num_samples`.
    """
    wave = check_waveform(wave)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer, float)):
        raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate!r}")
    if not (np.isfinite(sample_rate) and sample_rate > 0):
        raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate!r}")
    wave = resample(wave, sample_rate)
    if trim:
        wave, _ = librosa.effects.trim(wave)
    if wave.shape[0] < min_samples:
        raise ValueError(
            f"audio too short: {wave.shape[0]} samples at 16 kHz{' after trimming silence' if trim else ''} "
            f"({1000 * wave.shape[0] / SAMPLE_RATE:.1f} ms); the speech encoder needs at least "
            f"{min_samples} samples ({1000 * min_samples / SAMPLE_RATE:.1f} ms)"
        )
    return np.ascontiguousarray(wave, dtype=np.float32)


def speech_batch(waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """16 kHz waveforms -> (input_values (B, L) float32, attention_mask (B, L) int32).

    Wav2Vec2FeatureExtractor(do_normalize=True, padding=True): zero-pad to the longest, then
    (x - mean) / sqrt(var + 1e-7) over each utterance's valid samples, padded tail 0.
    """
    if len(waves) == 0:
        raise ValueError("speech_batch needs at least one waveform")
    waves = [check_waveform(wave, name=f"waveform {i}") for i, wave in enumerate(waves)]
    max_len = max(wave.shape[0] for wave in waves)
    input_values = np.zeros((len(waves), max_len), dtype=np.float32)
    attention_mask = np.zeros((len(waves), max_len), dtype=np.int32)
    for row, wave in enumerate(waves):
        length = wave.shape[0]
        # The same float32 numpy expression as Wav2Vec2FeatureExtractor (bit-identical to it).
        input_values[row, :length] = (wave - wave.mean()) / np.sqrt(wave.var() + NORMALISE_EPS)
        attention_mask[row, :length] = 1
    return torch.from_numpy(input_values), torch.from_numpy(attention_mask)
