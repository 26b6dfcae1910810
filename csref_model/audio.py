"""Audio files and the speech encoder's sample-rate facts: the one home for both.

Every waveform the models see is float32 mono at `SAMPLE_RATE`. Files are read with soundfile
(WAV/FLAC/OGG), channels averaged, and resampled with soxr at "HQ" quality (the resampler
librosa uses by default, so training and inference resample alike).
"""

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile
import soxr

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# facebook/wav2vec2-base feature encoder (7 conv layers); a model passes its own config's.
WAV2VEC2_BASE_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
WAV2VEC2_BASE_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


def min_num_samples(conv_kernel: Sequence[int], conv_stride: Sequence[int]) -> int:
    """Fewest input samples for which a stack of 1-D convs (no padding) yields one frame."""
    length = 1
    for kernel, stride in zip(reversed(conv_kernel), reversed(conv_stride)):
        length = (length - 1) * stride + kernel
    return length


WAV2VEC2_BASE_MIN_SAMPLES = min_num_samples(WAV2VEC2_BASE_CONV_KERNEL, WAV2VEC2_BASE_CONV_STRIDE)  # 400


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file -> (float32 mono waveform (N,), its sample rate).

    Multi-channel files are averaged to mono. Raises FileNotFoundError for a missing file and
    ValueError for one libsndfile cannot read or that holds no samples.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        wave, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (N, channels)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise ValueError(f"could not read audio file {path}: {error} (expected WAV/FLAC/OGG readable by libsndfile)") from error
    if len(wave) == 0:
        raise ValueError(f"audio file {path} contains no samples")
    if wave.shape[1] > 1:
        logger.info("%s has %d channels; averaging them to mono", path, wave.shape[1])
    return wave.mean(axis=1, dtype=np.float32), int(sample_rate)


def resample(wave: np.ndarray, sample_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 (N,) at `sample_rate` -> float32 at `target_rate` (unchanged when equal)."""
    if sample_rate == target_rate:
        return wave.astype(np.float32, copy=False)
    return soxr.resample(wave, sample_rate, target_rate, quality="HQ").astype(np.float32, copy=False)


def load_audio_16k(path: str | Path) -> np.ndarray:
    """Any soundfile-readable file -> float32 mono at SAMPLE_RATE."""
    wave, sample_rate = load_audio(path)
    return resample(wave, sample_rate)
