"""Text encoder for CSA: a BERT-family model pooled to one vector per sentence."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from transformers import AutoTokenizer, BertConfig, BertModel, PreTrainedTokenizerBase

from csref_model.config import BERT_SHAPE_FIELDS, TextEncoderConfig, resolve_pretrained_path

logger = logging.getLogger(__name__)


def build_bert(cfg: TextEncoderConfig, load_pretrained: bool = True) -> BertModel:
    arch = cfg.architecture
    fields = {name: getattr(arch, name) for name in arch.__dataclass_fields__}
    if not load_pretrained:
        return BertModel(BertConfig(**fields))
    path = resolve_pretrained_path(cfg.pretrained_path)
    if path is None:
        logger.warning("text encoder: no pretrained_path in the config, BERT is randomly initialised "
                       "(load a checkpoint or set text_encoder.pretrained_path)")
        return BertModel(BertConfig(**fields))
    model = BertModel.from_pretrained(str(path))
    mismatched = [f"{k}: config {fields[k]!r} vs {path} {getattr(model.config, k)!r}"
                  for k in BERT_SHAPE_FIELDS if getattr(model.config, k) != fields[k]]
    if mismatched:
        raise ValueError("text_encoder.architecture does not match the pretrained BERT: " + "; ".join(mismatched))
    return model


def load_tokenizer(cfg: TextEncoderConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of `tokenizer_path` (or of `pretrained_path` when that is null)."""
    path = resolve_pretrained_path(cfg.tokenizer_path or cfg.pretrained_path)
    if path is None:
        raise ValueError("text_encoder: neither tokenizer_path nor pretrained_path is set, so there is "
                         "no tokenizer; point one of them at a local BERT directory")
    return AutoTokenizer.from_pretrained(str(path))


class TextEncoder(nn.Module):
    """BERT -> sentence vector: last-layer [CLS] ("cls", the reference) or masked mean ("mean")."""

    def __init__(self, cfg: TextEncoderConfig, load_pretrained: bool = True):
        super().__init__()
        self.model = build_bert(cfg, load_pretrained)
        self.pooling = cfg.pooling

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        # text_ids, text_mask: (B, N) token ids and 1/0 attention mask
        hidden = self.model(input_ids=text_ids, attention_mask=text_mask).last_hidden_state  # (B, N, D)
        if self.pooling == "cls":
            # hidden_states[-1][:, 0], not pooler_output (the reference uses the raw [CLS] state)
            return hidden[:, 0]  # (B, D)
        weights = text_mask.unsqueeze(-1).to(hidden.dtype)  # (B, N, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)  # (B, D)
