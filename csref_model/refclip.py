"""RefCLIP for speech: weakly supervised grounding that learns from (image, spoken command) pairs
with no boxes, by choosing among a frozen class-agnostic detector's candidates.

RefCLIP ("A Universal Teacher for Weakly Supervised Referring Expression Comprehension", CVPR
2023), with our CSA speech encoder's aligned vector in place of its GRU language branch and our
class-agnostic detector (`csref_model.detector`) in place of its COCO YOLOv3:

    image -> frozen detector: backbone maps (s8, s16, s32) and per-cell boxes + objectness
          -> the `select_num` (17) cells of highest objectness on the stride-32 grid
    maps  -> trainable MultiScaleFusion (backbone widths in, nearest upsampling) -> top map
          -> the selected cells' features -> linear_vs                      (B, K, D)
             (+ linear_geometry of the cells' boxes, our `candidate_geometry` extension)
    audio -> frozen CSA speech encoder -> speech vector -> linear_ts        (B, D)
    score = raw dot product of the two (temperature 1)

Training loss of expression b over 2B-1 logits: the best cell of every image of the batch, plus
the second-best cell of every other image ("negative anchor augmentation"); the target is its
own image's best cell, so cells of the same image are never negatives. Inference: the box of the
best-scoring cell. RefCLIP averages objectness over a cell's 3 anchors and returns the
highest-objectness anchor's box; our detector is anchor-free (one box per cell), so both are
that cell's box. No NMS. The score returned with the box is ours (RefCLIP returns none): the
chosen cell's dot product minus that of the best cell of another object (box IoU < 0.5 with the
chosen one). It ranks pseudo-labels by how sure the choice is; the raw dot product does not
(docs/TRAINING.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from csref_model.boxes import box_iou, xyxy_to_cxcywh
from csref_model.checkpoint import CONFIG_FILE, load_into, read_checkpoint_dir
from csref_model.config import SpeechEncoderConfig
from csref_model.detector import DetectorConfig, ObjectDetector
from csref_model.fusion import MultiScaleFusion
from csref_model.head import decode_cell_corners
from csref_model.speech_encoder import SpeechEncoder
from csref_model.typed_yaml import from_dict

REFCLIP_KIND = "refclip"


@dataclass
class RefCLIPConfig:
    # Marks a RefCLIP checkpoint's config.yaml.
    kind: str = REFCLIP_KIND
    # The frozen candidate detector's config (its weights come from its checkpoint at initialisation).
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    # The frozen CSA speech encoder's config (no layer fusion: CSA's aligned vector).
    speech_encoder: SpeechEncoderConfig = field(default_factory=SpeechEncoderConfig)
    # MultiScaleFusion width (RefCLIP: 1024) and the shared embedding size (RefCLIP: HIDDEN_SIZE 512).
    fusion_channels: int = 1024
    hidden_size: int = 512
    # Candidate cells per image (RefCLIP: SELECT_NUM 17).
    select_num: int = 17
    # Our extension, off as published: add a linear projection of each candidate's box geometry
    # to its embedding. A stride-32 conv feature barely knows where it is in the image, so
    # without it a place word ("on the left") cannot be scored; the score's geometry term is
    # linear, so learnt from commands that hold of the whole image it still ranks within one.
    candidate_geometry: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "RefCLIPConfig":
        config = from_dict(cls, data, source)
        if config.kind != REFCLIP_KIND:
            raise ValueError(f"{source}: kind must be {REFCLIP_KIND!r} for a RefCLIP config, got {config.kind!r}")
        grid_cells = (config.detector.image_size // 32) ** 2
        if not 2 <= config.select_num <= grid_cells:
            raise ValueError(f"{source}: select_num must be in [2, {grid_cells}] (the detector's stride-32 cells), "
                             f"got {config.select_num}")
        return config


def box_geometry(boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """(..., 4) x1, y1, x2, y2 in letterboxed px -> (..., 6) centre x, y, width, height and the
    centre's distance from the middle, horizontally and vertically, as fractions of the input
    (the letterbox is centred, so its middle is the picture's)."""
    centre_size = xyxy_to_cxcywh(boxes / image_size)  # (..., 4)
    return torch.cat([centre_size, (centre_size[..., :2] - 0.5).abs()], dim=-1)


def anchor_contrastive_loss(scores: torch.Tensor) -> torch.Tensor:
    """RefCLIP's loss with negative anchor augmentation.

    scores: (B_expr, B_img, K) dot products of expression b with candidate k of image a, where
    expression b belongs to image b. Logits of b: the best candidate of each image (B) and the
    second-best candidate of every other image (B - 1); cross-entropy towards its own image's best.
    """
    batch = scores.shape[0]
    top2 = scores.topk(2, dim=2).values  # (B, B, 2)
    best, second = top2[..., 0], top2[..., 1]  # (B, B) each
    others = ~torch.eye(batch, dtype=torch.bool, device=scores.device)
    logits = torch.cat([best, second[others].view(batch, batch - 1)], dim=1)  # (B, 2B - 1)
    return F.cross_entropy(logits, torch.arange(batch, device=scores.device))


class RefCLIP(nn.Module):
    def __init__(self, cfg: RefCLIPConfig):
        super().__init__()
        self.select_num = cfg.select_num
        self.image_size = cfg.detector.image_size
        self.detector = ObjectDetector(cfg.detector)
        self.speech_encoder = SpeechEncoder(cfg.speech_encoder, layer_fusion=False, load_pretrained=False)
        self.multi_scale_manner = MultiScaleFusion(cfg.fusion_channels, self.detector.visual_encoder.out_channels,
                                                   upsampling="nearest")
        self.linear_vs = nn.Linear(cfg.fusion_channels, cfg.hidden_size)
        self.linear_ts = nn.Linear(cfg.speech_encoder.output_dim, cfg.hidden_size)
        self.linear_geometry = nn.Linear(6, cfg.hidden_size) if cfg.candidate_geometry else None
        # Both encoders stay frozen: RefCLIP learns only the fusion and the projections.
        self.detector.requires_grad_(False)
        self.speech_encoder.requires_grad_(False)

    def candidates(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> candidate boxes (B, K, 5) x1, y1, x2, y2, objectness (input px) and their
        embeddings (B, K, D), K = select_num cells of highest objectness."""
        with torch.no_grad():
            maps = self.detector.encode_image(image)
            cells = decode_cell_corners(*self.detector.raw_outputs(maps))  # (B, G*G, 5)
        top = self.multi_scale_manner(maps)  # (B, C, G, G)
        features = top.flatten(2).transpose(1, 2)  # (B, G*G, C), row-major like the cells
        indices = cells[..., 4].topk(self.select_num, dim=1).indices  # (B, K)
        boxes = torch.gather(cells, 1, indices[..., None].expand(-1, -1, cells.shape[2]))  # (B, K, 5)
        selected = torch.gather(features, 1, indices[..., None].expand(-1, -1, features.shape[2]))  # (B, K, C)
        embeddings = self.linear_vs(selected)  # (B, K, D)
        if self.linear_geometry is not None:
            embeddings = embeddings + self.linear_geometry(box_geometry(boxes[..., :4], self.image_size))
        return boxes, embeddings

    def encode_speech(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) normalised 16 kHz audio + mask -> (B, D) projected CSA speech vector."""
        with torch.no_grad():
            speech = self.speech_encoder(input_values, attention_mask)  # (B, Ds)
        return self.linear_ts(speech)

    def score_candidates(self, image: torch.Tensor, input_values: torch.Tensor,
                         attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image b with utterance b -> candidate boxes (B, K, 5) (input px) and their scores (B, K),
        the dot product of each candidate of image b with utterance b."""
        boxes, visual = self.candidates(image)  # (B, K, 5), (B, K, D)
        speech = self.encode_speech(input_values, attention_mask)  # (B, D)
        return boxes, torch.einsum("bkd,bd->bk", visual, speech)

    def forward(self, image: torch.Tensor, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_loss: bool = False) -> torch.Tensor:
        """Image b with utterance b -> the chosen boxes (B, 5) x1, y1, x2, y2, margin (input px; the
        margin is the module docstring's score), or with return_loss the scalar RefCLIP loss of the batch."""
        if return_loss:
            _, visual = self.candidates(image)  # (B, K, D)
            speech = self.encode_speech(input_values, attention_mask)  # (B, D)
            return anchor_contrastive_loss(torch.einsum("akd,bd->bak", visual, speech))  # (B_expr, B_img, K)
        boxes, scores = self.score_candidates(image, input_values, attention_mask)  # (B, K, 5), (B, K)
        best_score, best = scores.max(dim=1)  # (B,)
        chosen = boxes[torch.arange(boxes.shape[0], device=boxes.device), best]  # (B, 5)
        same_object = box_iou(chosen[:, None, :4], boxes[..., :4]) >= 0.5  # (B, K), the chosen cell included
        # Where every candidate is the chosen object, the margin is over the weakest of them.
        rival_score = scores.masked_fill(same_object, float("-inf")).max(dim=1).values  # (B,)
        rival_score = torch.where(torch.isfinite(rival_score), rival_score, scores.min(dim=1).values)
        return torch.cat([chosen[:, :4], (best_score - rival_score)[:, None]], dim=1)


def build_refclip_from_checkpoint(path: str | Path) -> tuple[RefCLIP, RefCLIPConfig]:
    """Our RefCLIP checkpoint directory -> (model in eval mode, config)."""
    state_dict, config_dict = read_checkpoint_dir(path)
    config = RefCLIPConfig.from_dict(config_dict, source=str(Path(path) / CONFIG_FILE))
    model = RefCLIP(config)
    load_into(model, state_dict, str(path))
    return model.eval(), config
