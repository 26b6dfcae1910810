"""ResDAVEnet-VQ: visually grounded speech with discrete units (Harwath, Hsu and Glass, ICLR 2020).

An image encoder and a speech encoder map an image and a spoken caption to embeddings whose
similarity is high for matching pairs. Vector-quantisation (VQ) layers inside the speech
encoder turn its frames into discrete units (codes) on the way. What the official code
(wnhsu/ResDAVEnet-VQ) does, and what this module does the same way:

* Features: 40 log-mel bands, 25 ms Hamming window, 10 ms hop, DC removal, pre-emphasis 0.97,
  dB relative to the utterance's maximum, floored 80 dB below it (`log_mel`).
* Speech encoder: a (40 x 1) convolution over the bands (width w1), then four residual stages of
  two basic blocks with 1x9 convolutions, each halving the frame rate (widths 128, 256, 256, 512,
  1024; frames 10/20/40/80/160 ms). Five VQ slots: slot 1 after the first convolution, slot k+1
  after stage k; `vq_layers` names the active ones ({2}, {3}, {2,3}, ...; the paper's numbers).
  Temporal jitter (each frame replaced by a neighbour with probability 0.12 either side) follows
  slots 1 and 2 in training.
* VQ: codebooks of 1024 entries updated by an exponential moving average (decay 0.99, Laplace
  smoothing of the counts, entries initialised N(0, 1), counts at 1), straight-through gradients
  and a commitment loss (cost 1) only: the codebook gets no gradient.
* Image encoder: ResNet-50 up to its last stage and a 1x1 convolution to the speech width, giving
  a (D, H, W) map. Here it is written with our own layers, keyed like torchvision's so that a
  torchvision ResNet-50 state dict file loads (`image.pretrained_path`); `backbone: cspdarknet`
  uses csref_model.backbone.CSPDarknet's stride-32 map instead (small, for CPU), and with
  `image.cspdarknet_strides` its stride-16 and stride-8 maps too, summed on the finest grid.
* Similarity: the dot product of the mean-pooled image map and the mean over the valid frames
  of the speech map (the official training and evaluation use only this; its matchmap code is
  never called). `similarity: matchmap` offers the matchmap's MISA score instead: for each frame
  the best-matching image cell, averaged over the valid frames.
* Loss (`triplet_loss`): a random-impostor triplet and a semi-hard-impostor triplet, both
  directions, margin 1, plus the commitment losses of the active VQ layers.

    model = Davenet(DavenetConfig())
    images = image_batch([rgb, ...], model.image_size)            # (B, 3, S, S)
    features, lengths = log_mel_batch([wave_16k, ...], cfg.log_mel)  # (B, 40, T), (B,)
    loss, parts = model.loss(images, features, lengths)
    scores = model.similarity(model.encode_images(images), model.encode_speech(features, lengths))  # (B_img, B_speech)
    view = best_view(SpeechImageRetriever.from_checkpoint(path), wave, sr, [("/cam_a", rgb_a), ("/cam_b", rgb_b)])
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from csref_model.audio import SAMPLE_RATE, resample
from csref_model.backbone import CSPDarknet
from csref_model.checkpoint import CONFIG_FILE, load_into, load_visual_backbone, read_checkpoint_dir, read_state_dict
from csref_model.config import VisualBackboneConfig, check_image_size, resolve_config_path
from csref_model.typed_yaml import from_dict, read_yaml

DAVENET_KIND = "resdavenet_vq"
NUM_VQ_SLOTS = 5
# The official forward jitters the outputs of slots 1 and 2 (after the first conv and stage 1).
JITTER_SLOTS = (1, 2)
IMAGE_BACKBONES = ("resnet50", "cspdarknet")
SIMILARITIES = ("pooled_dot", "matchmap")
CSPDARKNET_STRIDES = (8, 16, 32)  # csref_model.backbone.CSPDarknet's output maps, in order
# ImageNet statistics, as the official image loader normalises.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
# ResNet-50 blocks per stage and bottleneck widths (torchvision's resnet50 layout).
RESNET50_DEPTHS = (3, 4, 6, 3)
RESNET50_WIDTHS = (64, 128, 256, 512)


@dataclass
class LogMelConfig:
    num_mel_bins: int = 40
    window_s: float = 0.025
    hop_s: float = 0.010
    preemphasis: float = 0.97
    fmin_hz: float = 20.0
    # dB below the utterance's maximum where the features are floored (librosa's top_db).
    floor_db: float = 80.0
    # Longer utterances are cut to this many frames (the official target_length, 20.48 s).
    max_frames: int = 2048


@dataclass
class SpeechEncoderConfig:
    # Widths of the first convolution and of residual stages 1-4.
    widths: list[int] = field(default_factory=lambda: [128, 256, 256, 512, 1024])
    # Basic blocks per residual stage.
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    conv_width: int = 9
    # Active VQ slots, 1-5 (1: after the first convolution, k+1: after stage k); [] = none.
    vq_layers: list[int] = field(default_factory=list)
    codebook_size: int = 1024
    ema_decay: float = 0.99
    commitment_cost: float = 1.0
    # Codebooks start as normal(0, codebook_init_std) entries, clamped at 0 with codebook_nonneg_init
    # (the official --init-std and --nonneg-init, defaults 1 and false). The frames they quantise
    # come out of a ReLU: an entry with negative coordinates may never be the nearest one.
    codebook_init_std: float = 1.0
    codebook_nonneg_init: bool = False
    # Probability that a frame is replaced by its left (and, equally, its right) neighbour.
    jitter: float = 0.12


@dataclass
class ImageEncoderConfig:
    # "resnet50" (the paper's) or "cspdarknet" (csref_model.backbone, scaled by `cspdarknet`).
    backbone: str = "resnet50"
    image_size: int = 224
    cspdarknet: VisualBackboneConfig = field(default_factory=VisualBackboneConfig)
    # cspdarknet only: the backbone maps embedded, of its strides 8, 16 and 32 (32 always). Each has
    # its own 1x1 embedder; the coarser embedded maps are repeated up to the finest grid and summed,
    # so that attributes its stride-32 map does not carry (colour: docs/TRAINING.md) reach the embedding.
    cspdarknet_strides: list[int] = field(default_factory=lambda: [32])
    # resnet50 only: a torchvision-layout ResNet-50 state dict (.pth), e.g. ImageNet weights; null = random.
    pretrained_path: str | None = None


@dataclass
class DavenetConfig:
    # Marks a ResDAVEnet-VQ checkpoint's config.yaml.
    kind: str = DAVENET_KIND
    log_mel: LogMelConfig = field(default_factory=LogMelConfig)
    speech: SpeechEncoderConfig = field(default_factory=SpeechEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    # "pooled_dot" (the official training and evaluation) or "matchmap" (MISA).
    similarity: str = "pooled_dot"
    margin: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "DavenetConfig":
        config = from_dict(cls, data, source)
        if config.kind != DAVENET_KIND:
            raise ValueError(f"{source}: kind must be {DAVENET_KIND!r} for a ResDAVEnet-VQ config, got {config.kind!r}")
        speech = config.speech
        if len(speech.widths) != NUM_VQ_SLOTS or len(speech.depths) != NUM_VQ_SLOTS - 1:
            raise ValueError(f"{source}: speech.widths needs {NUM_VQ_SLOTS} numbers and speech.depths "
                             f"{NUM_VQ_SLOTS - 1}, got {speech.widths} and {speech.depths}")
        bad_slots = [slot for slot in speech.vq_layers if not 1 <= slot <= NUM_VQ_SLOTS]
        if bad_slots or len(set(speech.vq_layers)) != len(speech.vq_layers):
            raise ValueError(f"{source}: speech.vq_layers must be distinct slots in 1..{NUM_VQ_SLOTS}, "
                             f"got {speech.vq_layers}")
        if speech.codebook_init_std <= 0:
            raise ValueError(f"{source}: speech.codebook_init_std must be > 0, got {speech.codebook_init_std}")
        if not 0.0 <= speech.jitter <= 0.5:
            raise ValueError(f"{source}: speech.jitter must lie in [0, 0.5], got {speech.jitter}")
        if config.image.backbone not in IMAGE_BACKBONES:
            raise ValueError(f"{source}: image.backbone must be one of {', '.join(IMAGE_BACKBONES)}, "
                             f"got {config.image.backbone!r}")
        check_image_size(config.image.image_size, "image.image_size", source)
        strides = config.image.cspdarknet_strides
        if 32 not in strides or not set(strides) <= set(CSPDARKNET_STRIDES) or len(set(strides)) != len(strides):
            raise ValueError(f"{source}: image.cspdarknet_strides must be distinct strides of {list(CSPDARKNET_STRIDES)} "
                             f"including 32, got {strides}")
        if config.similarity not in SIMILARITIES:
            raise ValueError(f"{source}: similarity must be one of {', '.join(SIMILARITIES)}, "
                             f"got {config.similarity!r}")
        return config


def load_davenet_config(name_or_path: str | Path) -> DavenetConfig:
    """"davenet_base", "davenet_tiny" (config/models/) or a YAML file -> a validated `DavenetConfig`."""
    path = resolve_config_path(name_or_path)
    return DavenetConfig.from_dict(read_yaml(path, "ResDAVEnet-VQ config"), source=str(path))


# ----------------------------------------------------------------------------------------
# Features


def slaney_mel_filters(num_bins: int, n_fft: int, fmin_hz: float, sample_rate: int) -> torch.Tensor:
    """(num_bins, n_fft // 2 + 1) triangular filters on the Slaney mel scale, area-normalised
    (librosa.filters.mel's defaults, which the official features use)."""
    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        # Linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4).
        log_step = math.log(6.4) / 27.0
        return np.where(hz < 1000.0, hz * 3.0 / 200.0, 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) / log_step)

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        log_step = math.log(6.4) / 27.0
        return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * np.exp(log_step * (mel - 15.0)))

    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(np.array(fmin_hz)), hz_to_mel(np.array(sample_rate / 2)), num_bins + 2))
    rising = (fft_hz[None, :] - edges_hz[:-2, None]) / np.diff(edges_hz)[:-1, None]
    falling = (edges_hz[2:, None] - fft_hz[None, :]) / np.diff(edges_hz)[1:, None]
    filters = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return torch.from_numpy(filters.astype(np.float32))


def log_mel(wave: torch.Tensor, cfg: LogMelConfig) -> torch.Tensor:
    """(N,) float waveform at SAMPLE_RATE -> (num_mel_bins, T) dB features, T = 1 + N // hop (at most
    cfg.max_frames), in [-floor_db, 0]."""
    window = round(cfg.window_s * SAMPLE_RATE)  # 400 samples, also the FFT size
    hop = round(cfg.hop_s * SAMPLE_RATE)  # 160
    wave = wave.float()
    if wave.numel() < 2:
        raise ValueError(f"log_mel needs at least 2 samples, got {wave.numel()}")
    wave = wave - wave.mean()
    wave = torch.cat([wave[:1], wave[1:] - cfg.preemphasis * wave[:-1]])
    spectrum = torch.stft(wave, n_fft=window, hop_length=hop, win_length=window,
                          window=torch.hamming_window(window, periodic=False, device=wave.device),
                          center=True, pad_mode="constant", return_complex=True)  # (F, T)
    filters = slaney_mel_filters(cfg.num_mel_bins, window, cfg.fmin_hz, SAMPLE_RATE).to(wave.device)
    mel = filters @ spectrum.abs().pow(2)  # (num_mel_bins, T)
    db = 10.0 * torch.log10(mel.clamp_min(1e-10))
    db = (db - db.max()).clamp_min(-cfg.floor_db)
    return db[:, :cfg.max_frames]


def log_mel_batch(waves: Sequence[np.ndarray | torch.Tensor], cfg: LogMelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Waveforms at SAMPLE_RATE -> (B, num_mel_bins, T_max) features padded with the floor (silence),
    and (B,) frame counts."""
    features = [log_mel(torch.as_tensor(np.asarray(w, dtype=np.float32)), cfg) for w in waves]
    return pad_features(features, cfg.floor_db)


def pad_features(features: Sequence[torch.Tensor], floor_db: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[(F, T_b)] -> (B, F, T_max) padded with -floor_db (trailing silence), and (B,) lengths. The
    padding never reaches the embeddings: the speech encoder zeroes every frame past an
    utterance's end before each convolution (`ResDavenetVQ.forward`)."""
    lengths = torch.tensor([f.shape[1] for f in features])
    batch = torch.full((len(features), features[0].shape[0], int(lengths.max())), -floor_db)
    for index, feature in enumerate(features):
        batch[index, :, :feature.shape[1]] = feature
    return batch, lengths


def image_batch(images_rgb: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
    """HxWx3 uint8 RGB images -> (B, 3, S, S) resized to S x S and normalised with ImageNet statistics.

    The official loader crops (randomly in training, 224 of 256 at test time); a crop can cut
    away objects a caption names, so the whole image is resized instead."""
    batch = []
    for image in images_rgb:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"images must be HxWx3 uint8 RGB arrays, got shape {image.shape} dtype {image.dtype}")
        resized = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
        batch.append(torch.from_numpy(resized).permute(2, 0, 1).float() / 255.0)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (torch.stack(batch) - mean) / std


# ----------------------------------------------------------------------------------------
# Speech encoder


def frame_lengths(lengths: torch.Tensor, halvings: int) -> torch.Tensor:
    """Valid frames after `halvings` stride-2 stages (each maps T to ceil(T / 2))."""
    for _ in range(halvings):
        lengths = torch.div(lengths + 1, 2, rounding_mode="floor")
    return lengths


def valid_mask(lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B,) lengths -> (B, T) True on valid frames."""
    return torch.arange(num_frames, device=lengths.device)[None, :] < lengths[:, None]


def frame_mask(lengths: torch.Tensor, num_frames: int, dtype: torch.dtype) -> torch.Tensor:
    """(B,) lengths -> (B, 1, 1, T) 1 on valid frames: multiplies (B, C, 1, T) speech frames."""
    return valid_mask(lengths, num_frames)[:, None, None, :].to(dtype)


class VectorQuantizerEMA(nn.Module):
    """Nearest-codebook-entry quantisation with an EMA-updated codebook.

    Training forward passes also update the codebook from their valid frames: counts and sums of
    the frames assigned to each entry are averaged with `decay`, the counts Laplace-smoothed
    (eps 1e-8), and each entry becomes its average sum / count. The codebook is a buffer: the loss
    only pulls the encoder towards it (commitment).
    """

    def __init__(self, codebook_size: int, dim: int, decay: float, commitment_cost: float, init_std: float = 1.0,
                 nonneg_init: bool = False, eps: float = 1e-8):
        super().__init__()
        self.decay, self.commitment_cost, self.eps = decay, commitment_cost, eps
        codebook = torch.randn(codebook_size, dim) * init_std
        if nonneg_init:
            codebook.clamp_(min=0)
        self.register_buffer("codebook", codebook)  # (K, D)
        self.register_buffer("ema_count", torch.ones(codebook_size))  # (K,)
        self.register_buffer("ema_sum", codebook.clone())  # (K, D): count x entry

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, D, T) and valid (B, T) -> quantised (B, D, T) (straight-through in training),
        codes (B, T) and the commitment loss over the valid frames (scalar)."""
        batch, dim, frames = x.shape
        flat = x.permute(0, 2, 1).reshape(-1, dim).float()  # (B*T, D)
        with torch.no_grad():
            distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.t()
                         + self.codebook.pow(2).sum(1)[None, :])  # (B*T, K)
            codes = distances.argmin(dim=1)  # (B*T,)
        quantised = self.codebook[codes]  # (B*T, D)
        keep = valid.reshape(-1)
        commitment = self.commitment_cost * (flat[keep] - quantised[keep]).pow(2).mean()
        if self.training:
            self.update_codebook(flat[keep].detach(), codes[keep])
            quantised = flat + (quantised - flat).detach()
        quantised = quantised.to(x.dtype).view(batch, frames, dim).permute(0, 2, 1)
        return quantised, codes.view(batch, frames), commitment

    @torch.no_grad()
    def update_codebook(self, frames: torch.Tensor, codes: torch.Tensor) -> None:
        """One EMA step from frames (N, D) assigned to codes (N,)."""
        onehot = F.one_hot(codes, self.codebook.shape[0]).to(frames.dtype)  # (N, K)
        self.ema_count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.codebook.shape[0] * self.eps) * total
        self.ema_count.copy_(smoothed)
        self.ema_sum.mul_(self.decay).add_(onehot.t() @ frames, alpha=1 - self.decay)
        self.codebook.copy_(self.ema_sum / self.ema_count[:, None])


def temporal_jitter(x: torch.Tensor, probability: float) -> torch.Tensor:
    """(B, C, 1, T): each frame index replaced by its left or right neighbour with `probability`
    each (the same draw for the whole batch, as the official code), edges clamped."""
    frames = x.shape[-1]
    shift = torch.multinomial(torch.tensor([probability, 1 - 2 * probability, probability]), frames,
                              replacement=True) - 1  # (T,) in {-1, 0, 1}
    index = (torch.arange(frames) + shift).clamp(0, frames - 1).to(x.device)
    return x.index_select(-1, index)


def residual_stage(make_block: Callable[..., nn.Module], in_channels: int, out_channels: int, depth: int,
                   stride: int) -> nn.Sequential:
    """`depth` residual blocks, `make_block(in_channels=, stride=)` each: the first takes `in_channels`
    with the stage's stride, the others `out_channels` with stride 1 (both encoders' stages)."""
    blocks = [make_block(in_channels=in_channels, stride=stride)]
    blocks += [make_block(in_channels=out_channels, stride=1) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class SpeechBlock(nn.Module):
    """Basic residual block of two 1 x conv_width convolutions over time; the first may stride 2."""

    def __init__(self, in_channels: int, out_channels: int, conv_width: int, stride: int):
        super().__init__()
        pad = (0, conv_width // 2)
        self.conv1 = nn.Conv2d(in_channels, out_channels, (1, conv_width), (1, stride), pad, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, (1, conv_width), 1, pad, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, (1, stride), bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """`x` zero past each utterance's end; `valid` (B, 1, 1, T / stride) 1 on the output's valid
        frames, so the output is zero past the end too."""
        out = F.relu(self.bn1(self.conv1(x))) * valid  # (B, C_out, 1, T / stride)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x)) * valid


@dataclass
class SpeechOutput:
    embeddings: torch.Tensor  # (B, D, T_out) last stage
    lengths: torch.Tensor  # (B,) valid frames of `embeddings`
    codes: dict[int, torch.Tensor]  # VQ slot -> (B, T_slot) codebook indices
    code_lengths: dict[int, torch.Tensor]  # VQ slot -> (B,) valid frames
    commitment: torch.Tensor  # sum over active VQ layers of their commitment losses (scalar)


class ResDavenetVQ(nn.Module):
    """(B, num_mel_bins, T) log-mel features -> `SpeechOutput` (frames of 2^4 x the hop)."""

    def __init__(self, cfg: SpeechEncoderConfig, num_mel_bins: int):
        super().__init__()
        widths = cfg.widths
        self.vq_layers = sorted(cfg.vq_layers)
        self.jitter = cfg.jitter
        self.conv1 = nn.Conv2d(1, widths[0], (num_mel_bins, 1), bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.stages = nn.ModuleList([
            residual_stage(functools.partial(SpeechBlock, out_channels=widths[stage + 1], conv_width=cfg.conv_width),
                           widths[stage], widths[stage + 1], depth, stride=2)
            for stage, depth in enumerate(cfg.depths)])
        self.quantizers = nn.ModuleDict({
            str(slot): VectorQuantizerEMA(cfg.codebook_size, widths[slot - 1], cfg.ema_decay, cfg.commitment_cost,
                                          cfg.codebook_init_std, cfg.codebook_nonneg_init)
            for slot in self.vq_layers})
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        self.out_channels = widths[-1]

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, upto_slot: int = NUM_VQ_SLOTS) -> SpeechOutput:
        """Stops after slot `upto_slot` (units of a lower layer need not run the upper stages).

        Frames past each utterance's end are zeroed before every convolution, as the convolutions'
        own zero padding does at the end of a lone utterance: in eval mode an utterance encodes the
        same alone and in any padded batch (the official loader gets there by padding every
        utterance to 2048 frames)."""
        x = F.relu(self.bn1(self.conv1(features.unsqueeze(1))))  # (B, W1, 1, T)
        codes, code_lengths, commitments = {}, {}, []
        current = lengths
        for slot in range(1, upto_slot + 1):
            if slot > 1:
                x, current = self.run_stage(slot, x, current)  # (B, W_slot, 1, ceil(T_prev / 2))
            if str(slot) in self.quantizers:
                quantised, slot_codes, commitment = self.quantizers[str(slot)](
                    x.squeeze(2), valid_mask(current, x.shape[-1]))
                x = quantised.unsqueeze(2)
                codes[slot], code_lengths[slot] = slot_codes, current
                commitments.append(commitment)
            if self.training and self.jitter > 0 and slot in JITTER_SLOTS:
                x = temporal_jitter(x, self.jitter)
            x = x * frame_mask(current, x.shape[-1], x.dtype)
        commitment = torch.stack(commitments).sum() if commitments else x.new_zeros(())
        return SpeechOutput(x.squeeze(2), current, codes, code_lengths, commitment)

    def run_stage(self, slot: int, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stage below slot `slot` (>= 2) on (B, W, 1, T) frames that are zero past
        `lengths` -> (its (B, W_slot, 1, ceil(T / 2)) output, zero past the end, and its lengths)."""
        lengths = frame_lengths(lengths, 1)
        valid = frame_mask(lengths, (x.shape[-1] + 1) // 2, x.dtype)  # the first conv strides 2
        for block in self.stages[slot - 2]:
            x = block(x, valid)
        return x, lengths


# ----------------------------------------------------------------------------------------
# Image encoder


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck (1x1, 3x3 with the stride, 1x1 to 4x width), torchvision's key names."""

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = 4 * width
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """(B, 3, S, S) -> (B, 2048, S/32, S/32): ResNet-50 without its pooling and classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        for stage, (depth, width) in enumerate(zip(RESNET50_DEPTHS, RESNET50_WIDTHS)):
            setattr(self, f"layer{stage + 1}", residual_stage(functools.partial(Bottleneck, width=width), in_channels,
                                                              4 * width, depth, stride=2 if stage > 0 else 1))
            in_channels = 4 * width
        self.out_channels = in_channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(image))), 3, 2, 1)  # (B, 64, S/4, S/4)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ImageEncoder(nn.Module):
    """(B, 3, S, S) normalised RGB -> (B, D, S/s, S/s) embedding map, s = 32 or the finest of
    `cspdarknet_strides`."""

    def __init__(self, cfg: ImageEncoderConfig, embedding_dim: int):
        super().__init__()
        self.backbone_name = cfg.backbone
        self.backbone = ResNet50() if cfg.backbone == "resnet50" else CSPDarknet(cfg.cspdarknet)
        channels = self.backbone.out_channels if cfg.backbone == "resnet50" else self.backbone.out_channels[-1]
        self.embedder = nn.Conv2d(channels, embedding_dim, 1)
        # The stride-16 and stride-8 maps' embedders (coarse to fine), when cspdarknet_strides names them.
        finer = sorted((stride for stride in cfg.cspdarknet_strides if stride != 32), reverse=True) \
            if cfg.backbone == "cspdarknet" else []
        self.finer_embedders = nn.ModuleDict({
            str(stride): nn.Conv2d(self.backbone.out_channels[CSPDARKNET_STRIDES.index(stride)], embedding_dim, 1)
            for stride in finer})

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.backbone(image)
        if self.backbone_name == "resnet50":
            return self.embedder(features)
        embedded = self.embedder(features[-1])  # (B, D, S/32, S/32)
        for stride, embedder in self.finer_embedders.items():
            finer = embedder(features[CSPDARKNET_STRIDES.index(int(stride))])  # (B, D, S/stride, S/stride)
            embedded = finer + F.interpolate(embedded, size=finer.shape[-2:], mode="nearest")
        return embedded


# ----------------------------------------------------------------------------------------
# The model, its similarity and its loss


def triplet_loss(scores: torch.Tensor, margin: float, impostors: torch.Tensor | None = None) -> torch.Tensor:
    """The official loss on a (B, B) similarity matrix whose diagonal holds the matching pairs:
    in each direction (rows, then columns as anchors) a hinge against one random impostor and
    one against the semi-hard impostor (the most similar one still below the positive), each
    averaged over the anchors; the four terms summed. As in the official code, which zeroes the
    scores that are not below the positive (the positive's own among them) and takes the row's
    maximum, the semi-hard impostor scores max(0, that most similar one): a positive must reach
    the margin whatever its impostors score, and an anchor with no impostor below it still pays
    max(0, margin - positive).
    `impostors` (B_img, B_speech) bool, optional: False where image i also matches utterance j
    (a command that fits another scene), so that pair is never an impostor; the official code has
    every off-diagonal pair as one."""
    batch = scores.shape[0]
    if batch < 2 or scores.shape[1] != batch:
        raise ValueError(f"triplet_loss needs a square similarity matrix of at least 2 pairs, got {tuple(scores.shape)}")
    allowed = ~torch.eye(batch, dtype=torch.bool, device=scores.device)
    if impostors is not None:
        allowed = allowed & impostors
    total = scores.new_zeros(())
    for anchored, usable in ((scores, allowed), (scores.t(), allowed.t())):
        positive = anchored.diag()  # (B,)
        has_random = usable.any(dim=1)
        # One usable impostor per anchor, uniformly (an anchor without one picks itself and adds 0).
        impostor = torch.multinomial((usable | ~has_random[:, None]).float(), 1).squeeze(1)  # (B,)
        random_scores = anchored[torch.arange(batch, device=scores.device), impostor]
        hinge = (margin + random_scores - positive).clamp_min(0)
        total = total + torch.where(has_random, hinge, torch.zeros_like(hinge)).mean()
        below = (anchored < positive[:, None]) & usable  # the diagonal is never below itself
        hardest = anchored.masked_fill(~below, 0.0).max(dim=1).values  # (B,) the diagonal's 0 always in
        total = total + (margin + hardest - positive).clamp_min(0).mean()
    return total


class Davenet(nn.Module):
    def __init__(self, cfg: DavenetConfig):
        super().__init__()
        self.cfg = cfg
        self.image_size = cfg.image.image_size
        self.speech_encoder = ResDavenetVQ(cfg.speech, cfg.log_mel.num_mel_bins)
        self.image_encoder = ImageEncoder(cfg.image, self.speech_encoder.out_channels)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D, S/s, S/s), s = 32 or the finest of `image.cspdarknet_strides`."""
        return self.image_encoder(images)

    def encode_speech(self, features: torch.Tensor, lengths: torch.Tensor) -> SpeechOutput:
        return self.speech_encoder(features, lengths)

    @staticmethod
    def pool_images(image_maps: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, D): the mean over cells, the image side of the pooled dot product."""
        return image_maps.mean(dim=(2, 3))

    @staticmethod
    def pool_speech(speech: SpeechOutput) -> torch.Tensor:
        """B utterances -> (B, D): the mean over each utterance's valid frames."""
        valid = valid_mask(speech.lengths, speech.embeddings.shape[-1]).to(speech.embeddings.dtype)  # (B, T)
        return (speech.embeddings * valid[:, None, :]).sum(-1) / valid.sum(1).clamp_min(1)[:, None]

    def similarity(self, image_maps: torch.Tensor, speech: SpeechOutput) -> torch.Tensor:
        """(B_img, D, H, W) maps and B_sp utterances -> (B_img, B_sp) scores."""
        if self.cfg.similarity == "pooled_dot":
            return self.pool_images(image_maps) @ self.pool_speech(speech).t()
        # MISA: each frame's best image cell, averaged over the valid frames.
        valid = valid_mask(speech.lengths, speech.embeddings.shape[-1]).to(speech.embeddings.dtype)  # (B_sp, T)
        count = valid.sum(1).clamp_min(1)  # (B_sp,)
        matchmap = torch.einsum("idp,sdt->ispt", image_maps.flatten(2), speech.embeddings)  # (B_img, B_sp, HW, T)
        best_cell = matchmap.max(dim=2).values  # (B_img, B_sp, T)
        return (best_cell * valid[None]).sum(-1) / count[None]

    def loss(self, images: torch.Tensor, features: torch.Tensor, lengths: torch.Tensor,
             impostors: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Image b with caption b -> (triplet loss + commitment, the parts as floats); `impostors`
        as in `triplet_loss`."""
        speech = self.encode_speech(features, lengths)
        scores = self.similarity(self.encode_images(images), speech)  # (B, B)
        triplet = triplet_loss(scores.float(), self.cfg.margin, impostors)
        return triplet + speech.commitment, {"triplet": float(triplet.detach()), "commitment": float(speech.commitment.detach())}


def build_davenet(cfg: DavenetConfig) -> Davenet:
    """A fresh model, with the image backbone's pretrained weights when the config names a file."""
    model = Davenet(cfg)
    if cfg.image.backbone == "cspdarknet" and cfg.image.cspdarknet.pretrained_path:
        load_visual_backbone(model.image_encoder.backbone, cfg.image.cspdarknet.pretrained_path)
    if cfg.image.backbone == "resnet50" and cfg.image.pretrained_path:
        load_into(model.image_encoder.backbone, read_state_dict(cfg.image.pretrained_path), cfg.image.pretrained_path,
                  allow_unexpected=("fc.",))
    return model


def build_davenet_from_checkpoint(path: str | Path) -> tuple[Davenet, DavenetConfig]:
    """Our ResDAVEnet-VQ checkpoint directory -> (model in eval mode, config)."""
    state_dict, config_dict = read_checkpoint_dir(path)
    config = DavenetConfig.from_dict(config_dict, source=str(Path(path) / CONFIG_FILE))
    model = Davenet(config)
    load_into(model, state_dict, str(path))
    return model.eval(), config


def speech_units(model: Davenet, wave: np.ndarray, sample_rate: int, slot: int) -> list[int]:
    """The codes of VQ slot `slot` for one utterance, one per frame of that slot."""
    if slot not in model.speech_encoder.vq_layers:
        raise ValueError(f"VQ slot {slot} is not active in this model (active: {model.speech_encoder.vq_layers or 'none'})")
    features, lengths = log_mel_batch([resample(wave, sample_rate)], model.cfg.log_mel)
    with torch.no_grad():
        output = model.speech_encoder(features, lengths, upto_slot=slot)
    return output.codes[slot][0, :int(output.code_lengths[slot][0])].tolist()


class SpeechImageRetriever:
    """Ranks images by how well they match a spoken description ("which view shows it?").

        retriever = SpeechImageRetriever.from_checkpoint("runs/davenet/best")
        order, scores = retriever.rank(wave, sample_rate, [rgb_a, rgb_b, ...])
    """

    def __init__(self, model: Davenet, device: str | torch.device = "cpu", batch_size: int = 16):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> "SpeechImageRetriever":
        return cls(build_davenet_from_checkpoint(path)[0], device)

    @torch.no_grad()
    def scores(self, wave: np.ndarray, sample_rate: int, images_rgb: Sequence[np.ndarray]) -> np.ndarray:
        """(N,) similarity of each image to the utterance."""
        if not images_rgb:
            raise ValueError("no images to rank")
        features, lengths = log_mel_batch([resample(wave, sample_rate)], self.model.cfg.log_mel)
        speech = self.model.encode_speech(features.to(self.device), lengths.to(self.device))
        scores = []
        for start in range(0, len(images_rgb), self.batch_size):
            images = image_batch(images_rgb[start:start + self.batch_size], self.model.image_size).to(self.device)
            scores.append(self.model.similarity(self.model.encode_images(images), speech)[:, 0])
        return torch.cat(scores).cpu().numpy()

    def rank(self, wave: np.ndarray, sample_rate: int, images_rgb: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(image indices best first, their scores)."""
        scores = self.scores(wave, sample_rate, images_rgb)
        order = np.argsort(-scores, kind="stable")
        return order, scores[order]


@dataclass(frozen=True)
class BestView:
    """The view that best matches an utterance, among labelled candidates."""

    label: str  # the caller's name for it: a camera topic, a frame's stamp
    index: int  # into the candidates
    score: float
    # Its lead over the runner-up (inf with a single candidate): a small margin means "can't tell".
    margin: float
    ranking: list[tuple[str, float]]  # (label, score) of every candidate, best first


def best_view(retriever: SpeechImageRetriever, wave: np.ndarray, sample_rate: int,
              views: Sequence[tuple[str, np.ndarray]]) -> BestView:
    """Which of several camera views (recent frames, or the latest frame of each camera) shows
    what the utterance describes: `views` are (label, HxWx3 uint8 RGB) pairs; ties go to the
    earlier one. The ROS-free half of the node's best-view option."""
    if not views:
        raise ValueError("best_view needs at least one (label, image) view to choose from")
    labels = [label for label, _ in views]
    order, scores = retriever.rank(wave, sample_rate, [image for _, image in views])
    margin = float(scores[0] - scores[1]) if len(scores) > 1 else math.inf
    return BestView(labels[order[0]], int(order[0]), float(scores[0]), margin,
                    [(labels[index], float(score)) for index, score in zip(order, scores)])
