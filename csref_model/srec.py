"""SREC: speech referring expression comprehension (CSRef's grounding model).

image -> CSPDarknet maps (s8, s16, s32); speech -> wav2vec2 + layer fusion + AttFlat vector;
each map x speech -> SimpleFusion; MultiScaleFusion -> top map; GARAN(speech, top) -> head.
With `mask_head.enabled`, a speech-conditioned stride-4 mask decoder (csref_model.mask_head)
reads the fused maps, GARAN's top map and the backbone's stride-4 map (`SREC.segment`); without
it the model, its state_dict and its exported graphs are the box-only SREC's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from csref_model.backbone import CSPDarknet
from csref_model.checkpoint import load_srec_weights, load_visual_backbone, read_config
from csref_model.config import ModelConfig, resolve_pretrained_path
from csref_model.fusion import GaranAttention, MultiScaleFusion, SimpleFusion
from csref_model.head import SRECHead
from csref_model.mask_head import MaskHead
from csref_model.runtime.contract import check_ground_inputs, check_image
from csref_model.speech_encoder import SpeechEncoder, freeze_speech_encoder


class SREC(nn.Module):
    """Attribute names are the reference state_dict prefixes, so official checkpoints load strictly."""

    def __init__(self, cfg: ModelConfig, load_pretrained: bool = True):
        super().__init__()
        self.image_size = cfg.image_size
        hidden = cfg.fusion.hidden_size
        speech_dim = cfg.speech_encoder.output_dim
        self.visual_encoder = CSPDarknet(cfg.visual_backbone)
        self.speech_encoder = SpeechEncoder(cfg.speech_encoder, cfg.speech_encoder.layer_fusion, load_pretrained)
        self.multi_scale_manner = MultiScaleFusion(hidden)
        self.fusion_manner = nn.ModuleList(
            [SimpleFusion(channels, speech_dim, hidden) for channels in self.visual_encoder.out_channels])
        self.attention_manner = GaranAttention(speech_dim, hidden, cfg.fusion.garan_heads)
        self.head = SRECHead(hidden, cfg.head.hidden_size)
        self.mask_head = (MaskHead(self.visual_encoder.stride4_channels, hidden, speech_dim, cfg.mask_head.hidden_size)
                          if cfg.mask_head.enabled else None)

    def encode_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) RGB in [0, 1] -> [(B, C3, S/8, S/8), (B, C4, S/16, S/16), (B, C5, S/32, S/32)]."""
        check_image(image)
        return self.visual_encoder(image)

    def encode_speech(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) normalised 16 kHz audio + (B, L) mask (None = all valid) -> (B, D) speech vector."""
        return self.speech_encoder(input_values, attention_mask)

    def ground_features(self, image_maps: list[torch.Tensor], speech_feat: torch.Tensor,
                        targets: torch.Tensor | None = None) -> torch.Tensor:
        """Fusion + MultiScaleFusion + GARAN + head. Boxes (B, 5), or the loss when targets are given.

        A batch of 1 on either side broadcasts against the other (one frame, several utterances).
        `image_maps` is not modified, so cached image features can be reused.
        """
        _, top = self._trunk(image_maps, speech_feat)
        return self.head(top, targets)

    def ground_cells(self, image_maps: list[torch.Tensor], speech_feat: torch.Tensor) -> torch.Tensor:
        """As `ground_features` without targets, but every cell: (B, G*G, 5) x1, y1, x2, y2, score."""
        return self.head.scored_cells(self._trunk(image_maps, speech_feat)[1])

    def _trunk(self, image_maps: list[torch.Tensor], speech_feat: torch.Tensor) -> tuple[list[torch.Tensor],
                                                                                        torch.Tensor]:
        """-> the SimpleFusion outputs [(B, C, 4G, 4G), (B, C, 2G, 2G), (B, C, G, G)] and GARAN's top (B, C, G, G)."""
        check_ground_inputs(image_maps, speech_feat)
        fused = [fusion(visual, speech_feat) for fusion, visual in zip(self.fusion_manner, image_maps)]
        top = self.multi_scale_manner(fused)  # (B, C, G, G)
        return fused, self.attention_manner(speech_feat, top)  # (B, C, G, G)

    def encode_image_pyramid(self, image: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) -> `encode_image`'s three maps and the backbone's stride-4 map (B, C2, S/4, S/4)
        last: what `mask_features` reads."""
        check_image(image)
        stride4, *image_maps = self.visual_encoder.pyramid(image)
        return [*image_maps, stride4]

    def mask_features(self, maps: list[torch.Tensor], speech_feat: torch.Tensor) -> torch.Tensor:
        """[s8, s16, s32, s4] (`encode_image_pyramid`) + (B, D) speech -> mask logits (B, 2, S/4, S/4)
        (background, target) in letterboxed-input space; needs the mask head (`mask_head.enabled`).
        Batches of 1 broadcast as in `ground_features`."""
        self._require_mask_head()
        *image_maps, stride4 = maps
        fused, top = self._trunk(image_maps, speech_feat)
        return self.mask_head(stride4, fused, top, speech_feat)

    def _require_mask_head(self) -> None:
        if self.mask_head is None:
            raise RuntimeError("this SREC has no mask head; build it with mask_head.enabled: true "
                               "(and train it: python -m csref_training.ssc correct)")

    def segment(self, image: torch.Tensor, input_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes (B, 5) as `forward` and the mask logits (B, 2, S/4, S/4) of `mask_features`."""
        self._require_mask_head()
        maps = self.encode_image_pyramid(image)
        speech_feat = self.encode_speech(input_values, attention_mask)
        fused, top = self._trunk(maps[:3], speech_feat)
        return self.head(top), self.mask_head(maps[3], fused, top, speech_feat)

    def forward(self, image: torch.Tensor, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Boxes (B, 5) = x1, y1, x2, y2, score in letterboxed-input pixels; with targets
        (B, 4) normalised (cx, cy, w, h), the training loss (scalar)."""
        return self.ground_features(self.encode_image(image), self.encode_speech(input_values, attention_mask),
                                    targets)


def build_srec(cfg: ModelConfig, load_pretrained: bool = True) -> SREC:
    """SREC with pretrained encoders from the config's local paths and the reference's freezing.

    `load_pretrained=False` skips pretrained weights (use when a full checkpoint is loaded next).
    """
    model = SREC(cfg, load_pretrained)
    if load_pretrained and cfg.visual_backbone.pretrained_path is not None:
        load_visual_backbone(model.visual_encoder, resolve_pretrained_path(cfg.visual_backbone.pretrained_path))
    freeze_speech_encoder(model.speech_encoder, cfg.freeze.srec_speech_encoder)
    if cfg.freeze.srec_backbone:
        model.visual_encoder.freeze_stem()
    return model



def build_srec_from_checkpoint(path: str | Path, config: ModelConfig | None = None) -> tuple[SREC, ModelConfig]:
    """Builds an SREC model and loads a full checkpoint into it -> (model in eval mode, config).

    `path` is an official `.pth` (then `config` is required) or our directory (its stored config
    is used when `config` is None). Pretrained encoders named in the config are not loaded: the
    checkpoint overwrites every weight anyway.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if config is None:
        config = read_config(path)
    model = build_srec(config, load_pretrained=False)
    load_srec_weights(model, path)
    return model.eval(), config
