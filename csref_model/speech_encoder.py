"""Speech encoder: HF wav2vec2 + optional multi-layer fusion (GELUConv) + AttFlat pooling.

State-dict names follow the reference (`model.*`, `fusion_modules.*`, `att_flat.*`) so official
CSRef checkpoints load strictly.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2Model

from csref_model.audio import SAMPLE_RATE
from csref_model.config import WAV2VEC2_SHAPE_FIELDS, SpeechEncoderConfig, resolve_pretrained_path
from csref_model.preprocessing import prepare_waveform, speech_batch

logger = logging.getLogger(__name__)

# AttFlat fills padded positions with -1e4 (the reference value), not -inf: a row with no valid
# position then stays finite. For real rows exp(-1e4 - max) underflows to exactly 0 in float32.
ATT_FLAT_MASK_FILL = -1e4


class GELUConv(nn.Module):
    """Mixes the stacked wav2vec2 hidden states: GELU(BN(x + conv1x1(x))), layers as channels.

    The residual is added *before* the BatchNorm and the GELU is the exact erf form, as in the
    reference (the released weights depend on both).
    """

    def __init__(self, num_states: int):
        super().__init__()
        self.conv = nn.Conv2d(num_states, num_states, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(num_states)
        self.act = nn.GELU()

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        # states: (B, N, T, D), the N hidden states are the conv channels
        return self.act(self.bn(states + self.conv(states)))  # (B, N, T, D)


class FCReLU(nn.Module):
    def __init__(self, in_size: int, out_size: int, dropout: float):
        super().__init__()
        self.linear = nn.Linear(in_size, out_size)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.relu(self.linear(x)))


class AttFlatMLP(nn.Module):
    def __init__(self, in_size: int, mid_size: int, dropout: float):
        super().__init__()
        self.fc = FCReLU(in_size, mid_size, dropout)
        self.linear = nn.Linear(mid_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.fc(x))


class AttFlat(nn.Module):
    """Attention pooling of a sequence to one vector (one glimpse), then a linear projection."""

    def __init__(self, hidden_size: int, output_dim: int, dropout: float):
        super().__init__()
        self.mlp = AttFlatMLP(hidden_size, hidden_size // 2, dropout)
        self.linear_merge = nn.Linear(hidden_size, output_dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # x: (B, L, D); valid: (B, L) bool, True = real (not padded) position
        logits = self.mlp(x)  # (B, L, 1)
        logits = logits.masked_fill(~valid.unsqueeze(-1), ATT_FLAT_MASK_FILL)
        weights = F.softmax(logits, dim=1)  # (B, L, 1)
        pooled = torch.sum(weights * x, dim=1)  # (B, D)
        return self.linear_merge(pooled)  # (B, output_dim)


class IdentityLayerDrop:
    """Mixin for wav2vec2 encoder layers: a layer dropped by LayerDrop passes its input on.

    transformers >= 5 skips a dropped layer without recording its hidden state, so the layer
    fusion would receive fewer states than it has channels. The reference (transformers 4.30)
    recorded the previous state again, which is what passing the input through reproduces.
    """

    layerdrop: float = 0.0

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.training and self.layerdrop > 0 and torch.rand([]) < self.layerdrop:
            return hidden_states
        return super().forward(hidden_states, *args, **kwargs)


@functools.cache
def _with_mixin(mixin: type, module_class: type) -> type:
    """`module_class` with `mixin`'s forward in front of its own (one class per pair)."""
    return type(f"{module_class.__name__}{mixin.__name__}", (mixin, module_class), {})


class Float32PositionalConvOnCPU:
    """Mixin for wav2vec2's positional conv embedding: under CPU autocast it runs in float32.

    torch 2.13's CPU (oneDNN) bfloat16 grouped convolution is wrong for 16 groups of 12 channels
    with kernel 32, the Spoken Shapes encoder's positional conv: relative error 1.2 against
    float32 (kernel 30 or 128, or 8 groups: 0.003). It made bf16 autocast pick a random object
    (demo model: test Acc@0.5 0.34 instead of 0.95). One small conv in float32 costs nothing.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(hidden_states.float())
        return super().forward(hidden_states)


def use_float32_positional_conv_on_cpu(model: Wav2Vec2Model) -> None:
    """See Float32PositionalConvOnCPU."""
    embedding = model.encoder.pos_conv_embed
    embedding.__class__ = _with_mixin(Float32PositionalConvOnCPU, type(embedding))


def use_identity_layerdrop(model: Wav2Vec2Model) -> None:
    """Move LayerDrop from the HF encoder loop into the layers (see IdentityLayerDrop)."""
    for layer in model.encoder.layers:
        layer.__class__ = _with_mixin(IdentityLayerDrop, type(layer))
        layer.layerdrop = model.config.layerdrop
    model.config.layerdrop = 0.0


def build_wav2vec2(cfg: SpeechEncoderConfig, load_pretrained: bool = True) -> Wav2Vec2Model:
    """wav2vec2 from a local pretrained directory, or randomly initialised from the YAML fields.

    `load_pretrained=False` skips the pretrained weights silently (a checkpoint will follow).
    """
    arch = cfg.architecture
    fields = {name: getattr(arch, name) for name in arch.__dataclass_fields__}
    if not load_pretrained:
        return Wav2Vec2Model(Wav2Vec2Config(**fields))
    path = resolve_pretrained_path(cfg.pretrained_path)
    if path is None:
        logger.warning("speech encoder: no pretrained_path in the config, wav2vec2 is randomly "
                       "initialised (load a checkpoint or set speech_encoder.pretrained_path)")
        return Wav2Vec2Model(Wav2Vec2Config(**fields))
    training_fields = {k: v for k, v in fields.items() if k not in WAV2VEC2_SHAPE_FIELDS}
    model = Wav2Vec2Model.from_pretrained(str(path), **training_fields)
    mismatched = [f"{k}: config {fields[k]!r} vs {path} {getattr(model.config, k)!r}"
                  for k in WAV2VEC2_SHAPE_FIELDS if _normalise(getattr(model.config, k)) != _normalise(fields[k])]
    if mismatched:
        raise ValueError("speech_encoder.architecture does not match the pretrained wav2vec2: "
                         + "; ".join(mismatched))
    return model


def _normalise(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


class SpeechEncoder(nn.Module):
    """wav2vec2 -> (SREC: all hidden states fused by GELUConv | CSA: last hidden state) -> AttFlat."""

    def __init__(self, cfg: SpeechEncoderConfig, layer_fusion: bool, load_pretrained: bool = True):
        super().__init__()
        self.model = build_wav2vec2(cfg, load_pretrained)
        use_identity_layerdrop(self.model)
        use_float32_positional_conv_on_cpu(self.model)
        self.layer_fusion = layer_fusion
        # All hidden states: the transformer input plus the output of every layer (13 for base).
        self.num_states = cfg.architecture.num_hidden_layers + 1 if layer_fusion else 1
        if layer_fusion:
            self.fusion_modules = GELUConv(self.num_states)
        self.att_flat = AttFlat(cfg.architecture.hidden_size, cfg.output_dim, cfg.att_flat_dropout)

    def frame_valid_mask(self, num_frames: int, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) sample mask -> (B, T) bool frame mask, True = frame computed from real samples."""
        return self.model._get_feature_vector_attention_mask(num_frames, attention_mask)

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) normalised 16 kHz waveforms + (B, L) sample mask (None = all valid) -> (B, output_dim)."""
        attention_mask = self._check_inputs(input_values, attention_mask)
        output = self.model(input_values=input_values, attention_mask=attention_mask,
                            output_hidden_states=self.layer_fusion)
        num_frames = output.last_hidden_state.shape[1]
        valid = self.frame_valid_mask(num_frames, attention_mask)  # (B, T)
        if self.layer_fusion:
            states = torch.stack(output.hidden_states, dim=1)  # (B, N, T, D)
            states = self.fusion_modules(states)  # (B, N, T, D)
            # Layer-major sequence: all T frames of state 0, then state 1, ...
            feat = states.flatten(1, 2)  # (B, N*T, D)
            valid = valid.repeat(1, self.num_states)  # (B, N*T), lines up with feat
        else:
            feat = output.last_hidden_state  # (B, T, D)
        return self.att_flat(feat, valid)  # (B, output_dim)

    def _check_inputs(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if input_values.dim() != 2 or not input_values.is_floating_point():
            raise ValueError(f"input_values must be a float (B, L) tensor, got {input_values.dtype} "
                             f"{tuple(input_values.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones(input_values.shape, dtype=torch.long, device=input_values.device)
        elif attention_mask.shape != input_values.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                             f"input_values {tuple(input_values.shape)}")
        valid_samples = attention_mask.long().sum(dim=1)
        valid_frames = self.model._get_feat_extract_output_lengths(valid_samples)
        if (valid_frames < 1).any():
            min_samples = self.minimum_samples()
            raise ValueError(f"utterance too short for wav2vec2: valid samples per utterance "
                             f"{valid_samples.tolist()}, each needs at least {min_samples} "
                             f"({min_samples / 16:.0f} ms at 16 kHz)")
        return attention_mask

    def check_hidden_state(self, layer: int, source: str = "this speech encoder") -> None:
        """ValueError unless `layer` names a hidden state (0..num_hidden_layers) of `source`."""
        num_layers = self.model.config.num_hidden_layers
        if not 0 <= layer <= num_layers:
            raise ValueError(f"hidden state {layer} does not exist: {source} has 0..{num_layers}")

    @torch.no_grad()
    def hidden_state(self, wave: np.ndarray, layer: int) -> np.ndarray:
        """wav2vec2 hidden state `layer` of one 16 kHz utterance as (T, hidden_size) frames (0: the
        projected convolutional features, k: transformer layer k's output): frame features for
        discrete units (Im2Sp) and for the ABX test."""
        self.check_hidden_state(layer)
        wave = prepare_waveform(wave, SAMPLE_RATE, trim=False, min_samples=self.minimum_samples())
        input_values, attention_mask = speech_batch([wave])
        device = next(self.parameters()).device
        output = self.model(input_values=input_values.to(device), attention_mask=attention_mask.to(device),
                            output_hidden_states=True)
        return output.hidden_states[layer][0].float().cpu().numpy()  # (T, hidden_size)

    def minimum_samples(self) -> int:
        """Fewest samples that give one wav2vec2 frame (400 for the base CNN = 25 ms)."""
        samples = 1
        for kernel, stride in reversed(list(zip(self.model.config.conv_kernel, self.model.config.conv_stride))):
            samples = (samples - 1) * stride + kernel
        return samples


def freeze_speech_encoder(encoder: SpeechEncoder, setting: int | str) -> None:
    """Sets requires_grad with the reference's semantics (see `FreezeConfig`)."""
    if setting == "none":
        return
    wav2vec2 = encoder.model
    if setting == "feature_encoder":
        wav2vec2.freeze_feature_encoder()
        return
    frozen = [wav2vec2.feature_extractor, wav2vec2.feature_projection, wav2vec2.encoder.pos_conv_embed,
              wav2vec2.encoder.layer_norm, *wav2vec2.encoder.layers[:setting]]
    for module in frozen:
        module.requires_grad_(False)
    # masked_spec_embed stays trainable: the reference's freeze has a typo (`required_grad`).
