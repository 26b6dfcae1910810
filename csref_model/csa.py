"""CSA: contrastive semantic alignment of the speech encoder to a frozen text encoder (CLIP loss)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from csref_model.config import ModelConfig
from csref_model.speech_encoder import SpeechEncoder, freeze_speech_encoder
from csref_model.text_encoder import TextEncoder, load_tokenizer

__all__ = ["CLIPLoss", "CSA", "build_csa", "load_tokenizer"]


class CLIPLoss(nn.Module):
    """Symmetric InfoNCE over the batch with a learnable temperature (CLIP)."""

    def __init__(self):
        super().__init__()
        # ln(1/0.07), CLIP's initial temperature; learnable and never clamped (as the reference).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, speech_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
        # speech_feat, text_feat: (B, D); row i of each describes the same utterance
        speech_feat = speech_feat / speech_feat.norm(dim=-1, keepdim=True)
        text_feat = text_feat / text_feat.norm(dim=-1, keepdim=True)
        logits = self.logit_scale.exp() * speech_feat @ text_feat.t()  # (B, B) speech -> text
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


class CSA(nn.Module):
    """Attribute names are the reference state_dict prefixes."""

    def __init__(self, cfg: ModelConfig, load_pretrained: bool = True):
        super().__init__()
        if cfg.speech_encoder.output_dim != cfg.text_encoder.architecture.hidden_size:
            raise ValueError(f"speech_encoder.output_dim ({cfg.speech_encoder.output_dim}) must equal the text "
                             f"encoder's hidden_size ({cfg.text_encoder.architecture.hidden_size}) for the CLIP loss")
        # CSA pools the last wav2vec2 hidden state only (no layer fusion), as the reference.
        self.speech_encoder = SpeechEncoder(cfg.speech_encoder, layer_fusion=False, load_pretrained=load_pretrained)
        self.text_encoder = TextEncoder(cfg.text_encoder, load_pretrained)
        self.contrastive_loss = CLIPLoss()

    def encode_speech(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) normalised 16 kHz audio + (B, L) mask -> (B, D)."""
        return self.speech_encoder(input_values, attention_mask)

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, N) token ids + (B, N) mask -> (B, D)."""
        return self.text_encoder(text_ids, text_mask)

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None, text_ids: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        """Scalar CLIP loss of a batch of (utterance, transcript) pairs."""
        return self.contrastive_loss(self.encode_speech(input_values, attention_mask),
                                     self.encode_text(text_ids, text_mask))


def build_csa(cfg: ModelConfig, load_pretrained: bool = True) -> CSA:
    """CSA with pretrained encoders from the config's local paths and the reference's freezing."""
    model = CSA(cfg, load_pretrained)
    freeze_speech_encoder(model.speech_encoder, cfg.freeze.csa_speech_encoder)
    if cfg.freeze.csa_text_encoder:
        model.text_encoder.requires_grad_(False)
    return model
