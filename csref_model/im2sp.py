"""Im2Sp for a robot: say which object was chosen, as speech generated from the image and its box.

Im2Sp ("Towards Practical and Efficient Image-to-Speech Captioning with Vision-Language
Pre-training and Multi-modal Tokens", Kim et al., ICASSP 2024) generates discrete speech units
from an image with a GIT decoder and turns them into a waveform with a unit vocoder. Ours keeps
that shape, scaled down, and adds the target box, so the units say the expression of one object:

    image -> frozen CSPDarknet (SREC's backbone): s8, s16, s32 maps
             G*G global tokens: each s32 cell + its s16 and s8 cells averaged (+ learned positions)
             R*R region tokens: s16 + s8 features sampled inside the box
    box   -> one token (letterboxed x1, y1, x2, y2 / S)
    prefix = [global | box | region] tokens; then BOS, units..., EOS
    GIT decoder: one transformer stack; the prefix attends to itself only, each unit token to
    the whole prefix and to the units before it; the output head is the token embedding (tied).
    Inference: greedy (validation) or beam search (evaluation).

    units (deduplicated) -> UnitVocoder: per-unit durations + log-mel frames -> Griffin-Lim.

Token ids are clean (Im2Sp shifts HuBERT ids around GIT's BERT ids 0/101/102): PAD 0, BOS 1,
EOS 2, unit u -> u + 3. Units are deduplicated as Im2Sp does (runs of one unit -> one token);
the vocoder gets the run lengths back from its duration predictor.

`Answerer` is what a robot calls: (image, box) -> waveform and the text meant: the expression of
its lexicon (the training expressions and their units) nearest the decoded units by edit distance.
`ExpressionRetriever` (CSA speech->text over a closed set) is the evaluation's Judge 1 of what the
waveform actually says.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import librosa
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from csref_model.audio import SAMPLE_RATE
from csref_model.backbone import CSPDarknet
from csref_model.checkpoint import CONFIG_FILE, load_into, read_checkpoint_dir, read_config
from csref_model.config import VisualBackboneConfig
from csref_model.csa import CSA, load_tokenizer
from csref_model.preprocessing import letterbox, prepare_waveform, speech_batch
from csref_model.typed_yaml import from_dict

IM2SP_KIND = "im2sp"
VOCODER_KIND = "unit_vocoder"
PAD, BOS, EOS = 0, 1, 2
NUM_SPECIAL_TOKENS = 3
# The parts of an answer directory (`Answerer.from_directory`).
ANSWER_DECODER, ANSWER_VOCODER, ANSWER_LEXICON = "decoder", "vocoder", "lexicon.json"


def deduplicate(units: Sequence[int]) -> tuple[list[int], list[int]]:
    """Runs of one unit -> (the unit of each run, the run's length in frames), as Im2Sp reduces units."""
    runs: list[int] = []
    lengths: list[int] = []
    for unit in units:
        if runs and runs[-1] == unit:
            lengths[-1] += 1
        else:
            runs.append(int(unit))
            lengths.append(1)
    return runs, lengths


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance of two unit sequences."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def units_to_tokens(units: Sequence[int]) -> list[int]:
    return [BOS, *(int(u) + NUM_SPECIAL_TOKENS for u in units), EOS]


def tokens_to_units(tokens: Sequence[int]) -> list[int]:
    """Generated ids -> units, up to the first EOS (specials dropped)."""
    units = []
    for token in tokens:
        if token == EOS:
            break
        if token >= NUM_SPECIAL_TOKENS:
            units.append(int(token) - NUM_SPECIAL_TOKENS)
    return units


# ----------------------------------------------------------------------------------------
# The region-to-unit decoder


@dataclass
class Im2SpConfig:
    # Marks an Im2Sp decoder checkpoint's config.yaml.
    kind: str = IM2SP_KIND
    image_size: int = 256
    # The frozen image encoder (SREC's CSPDarknet; weights from a checkpoint at initialisation). Its
    # stride-32 map keeps shape and size but not colour (a linear probe of SREC's: colour 0.11,
    # s16 0.63, s8 1.00), and an answer must say the colour when it tells the target apart, so
    # every token carries the finer maps too.
    visual_backbone: VisualBackboneConfig = field(default_factory=VisualBackboneConfig)
    num_units: int = 100  # k of the unit inventory
    hidden_size: int = 256  # GIT-base: 768
    num_layers: int = 4  # GIT-base: 6
    num_heads: int = 4
    ffn_size: int = 1024
    dropout: float = 0.1
    region_grid: int = 3  # R: R*R tokens sampled inside the box from the s16 map
    max_tokens: int = 160  # BOS + units + EOS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "Im2SpConfig":
        config = from_dict(cls, data, source)
        if config.kind != IM2SP_KIND:
            raise ValueError(f"{source}: kind must be {IM2SP_KIND!r} for an Im2Sp decoder config, got {config.kind!r}")
        if config.image_size % 32:
            raise ValueError(f"{source}: image_size must be a multiple of 32, got {config.image_size}")
        return config

    @property
    def vocab_size(self) -> int:
        return self.num_units + NUM_SPECIAL_TOKENS


def git_attention_mask(prefix_len: int, text_len: int, device: torch.device) -> torch.Tensor:
    """(P+T, P+T) bool, True = may not attend: the prefix sees the prefix; text sees the prefix
    and the text up to itself (GIT's seq2seq mask)."""
    total = prefix_len + text_len
    blocked = torch.ones(total, total, dtype=torch.bool, device=device).triu(1)  # causal
    blocked[:prefix_len, :prefix_len] = False  # bidirectional within the prefix
    return blocked


class Im2Sp(nn.Module):
    def __init__(self, cfg: Im2SpConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.image_encoder = CSPDarknet(cfg.visual_backbone)
        self.image_encoder.requires_grad_(False)  # frozen, as Im2Sp's vision encoder
        c8, c16, c32 = self.image_encoder.out_channels
        grid = cfg.image_size // 32
        self.global_proj = nn.Linear(c8 + c16 + c32, d)
        self.global_pos = nn.Parameter(torch.zeros(grid * grid, d))
        self.region_proj = nn.Linear(c8 + c16, d)
        self.region_pos = nn.Parameter(torch.zeros(cfg.region_grid ** 2, d))
        self.box_proj = nn.Linear(4, d)
        self.prefix_norm = nn.LayerNorm(d)
        self.token_embedding = nn.Embedding(cfg.vocab_size, d)
        self.position_embedding = nn.Embedding(cfg.max_tokens, d)
        layer = nn.TransformerEncoderLayer(d, cfg.num_heads, cfg.ffn_size, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(d)
        nn.init.normal_(self.global_pos, std=0.02)
        nn.init.normal_(self.region_pos, std=0.02)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def train(self, mode: bool = True) -> "Im2Sp":
        super().train(mode)
        self.image_encoder.eval()  # frozen BatchNorm statistics
        return self

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) letterboxed RGB in [0, 1] -> the s8 (B, C3, S/8, S/8), s16 (B, C4, S/16, S/16)
        and s32 (B, C5, S/32, S/32) maps."""
        s8, s16, s32 = self.image_encoder(image)
        return s8, s16, s32

    def prefix(self, s8: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The maps of `encode_image` and boxes (B, 4) x1, y1, x2, y2 in letterboxed px -> (B, P, D)."""
        size = self.cfg.image_size
        batch = boxes.shape[0]
        cells = torch.cat([s32, F.avg_pool2d(s16, 2), F.avg_pool2d(s8, 4)], dim=1)  # (B, C5+C4+C3, G, G)
        global_tokens = self.global_proj(cells.flatten(2).transpose(1, 2)) + self.global_pos  # (B, G*G, D)
        unit_box = boxes / size  # (B, 4) in [0, 1]
        box_token = self.box_proj(unit_box)[:, None]  # (B, 1, D)
        # R x R sample points at the centres of an R x R split of the box, in grid_sample's [-1, 1].
        steps = (torch.arange(self.cfg.region_grid, device=boxes.device, dtype=boxes.dtype) + 0.5) / self.cfg.region_grid
        xs = unit_box[:, 0:1] + steps[None] * (unit_box[:, 2:3] - unit_box[:, 0:1])  # (B, R)
        ys = unit_box[:, 1:2] + steps[None] * (unit_box[:, 3:4] - unit_box[:, 1:2])  # (B, R)
        grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1) * 2 - 1  # (B, R, R, 2)
        grid = grid.to(s16.dtype)
        sampled = torch.cat([F.grid_sample(s16, grid, align_corners=False),
                             F.grid_sample(s8, grid, align_corners=False)], dim=1)  # (B, C4+C3, R, R)
        region_tokens = self.region_proj(sampled.flatten(2).transpose(1, 2)) + self.region_pos  # (B, R*R, D)
        return self.prefix_norm(torch.cat([global_tokens, box_token.expand(batch, -1, -1), region_tokens], dim=1))

    def logits(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """prefix (B, P, D), tokens (B, T) -> next-token logits (B, T, V)."""
        num_tokens = tokens.shape[1]
        if num_tokens > self.cfg.max_tokens:
            raise ValueError(f"{num_tokens} tokens exceed max_tokens={self.cfg.max_tokens}")
        positions = torch.arange(num_tokens, device=tokens.device)
        text = self.token_embedding(tokens) + self.position_embedding(positions)  # (B, T, D)
        mask = git_attention_mask(prefix.shape[1], num_tokens, tokens.device)
        hidden = self.blocks(torch.cat([prefix, text], dim=1), mask=mask)  # (B, P+T, D)
        hidden = self.final_norm(hidden[:, prefix.shape[1]:])  # (B, T, D)
        return hidden @ self.token_embedding.weight.t()  # (B, T, V), head tied to the embeddings

    def forward(self, s8: torch.Tensor, s16: torch.Tensor, s32: torch.Tensor, boxes: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
        """Image maps + boxes (see `prefix`) and tokens (B, T) -> next-token logits (B, T, V)."""
        return self.logits(self.prefix(s8, s16, s32, boxes), tokens)

    @torch.no_grad()
    def greedy(self, prefix: torch.Tensor, max_units: int | None = None) -> list[list[int]]:
        """prefix (B, P, D) -> the units of each row, argmax at every step (no cache: a few dozen steps)."""
        max_steps = min(max_units or self.cfg.max_tokens, self.cfg.max_tokens - 1)
        tokens = torch.full((prefix.shape[0], 1), BOS, dtype=torch.long, device=prefix.device)
        done = torch.zeros(prefix.shape[0], dtype=torch.bool, device=prefix.device)
        for _ in range(max_steps):
            next_token = self.logits(prefix, tokens)[:, -1].argmax(-1)  # (B,)
            next_token = torch.where(done, torch.full_like(next_token, PAD), next_token)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            done |= next_token == EOS
            if done.all():
                break
        return [tokens_to_units(row[1:].tolist()) for row in tokens]

    @torch.no_grad()
    def beam_search(self, prefix: torch.Tensor, beam_size: int = 5, length_penalty: float = 1.0,
                    max_units: int | None = None) -> list[int]:
        """prefix (1, P, D) -> the units of the best hypothesis; scores are summed log-probabilities
        over length ** length_penalty (finished hypotheses count their EOS)."""
        if prefix.shape[0] != 1:
            raise ValueError(f"beam_search decodes one prefix at a time, got a batch of {prefix.shape[0]}")
        max_steps = min(max_units or self.cfg.max_tokens, self.cfg.max_tokens - 1)
        beams = torch.full((1, 1), BOS, dtype=torch.long, device=prefix.device)  # (K, t)
        scores = torch.zeros(1, device=prefix.device)  # (K,)
        finished: list[tuple[float, list[int]]] = []
        for _ in range(max_steps):
            log_probs = self.logits(prefix.expand(beams.shape[0], -1, -1), beams)[:, -1].log_softmax(-1)  # (K, V)
            log_probs[:, PAD] = log_probs[:, BOS] = -math.inf
            candidates = (scores[:, None] + log_probs).flatten()  # (K*V,)
            top_scores, top_index = candidates.topk(min(2 * beam_size, candidates.numel()))
            vocab = log_probs.shape[1]
            next_beams, next_scores = [], []
            for score, index in zip(top_scores.tolist(), top_index.tolist()):
                row, token = divmod(index, vocab)
                if token == EOS:
                    length = beams.shape[1]  # units + EOS
                    finished.append((score / length ** length_penalty, beams[row, 1:].tolist()))
                else:
                    next_beams.append(torch.cat([beams[row], beams.new_tensor([token])]))
                    next_scores.append(score)
                if len(next_beams) == beam_size:
                    break
            if len(finished) >= beam_size or not next_beams:
                break
            best_alive = max(next_scores) / (beams.shape[1] + 1) ** length_penalty
            if finished and max(f[0] for f in finished) > best_alive and length_penalty <= 1.0:
                # Scores only fall as hypotheses grow (log-probabilities are negative), so no live
                # beam can overtake the best finished one once its normalised score is behind.
                break
            beams, scores = torch.stack(next_beams), torch.tensor(next_scores, device=prefix.device)
        if not finished:
            finished.append((float(scores[0]) / beams.shape[1] ** length_penalty, beams[0, 1:].tolist()))
        return tokens_to_units(max(finished, key=lambda f: f[0])[1])


def teacher_forcing_loss(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T-1, V) of tokens[:, :-1] against tokens[:, 1:] (B, T) BOS ... EOS PAD... ->
    (mean cross-entropy over the non-PAD targets, their token accuracy)."""
    targets = tokens[:, 1:]
    loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=PAD)
    valid = targets != PAD
    accuracy = ((logits.argmax(-1) == targets) & valid).sum() / valid.sum().clamp(min=1)
    return loss, accuracy


def build_im2sp_from_checkpoint(path: str | Path) -> tuple[Im2Sp, Im2SpConfig]:
    """Our Im2Sp decoder checkpoint directory -> (model in eval mode, config)."""
    state_dict, config_dict = read_checkpoint_dir(path)
    config = Im2SpConfig.from_dict(config_dict, source=str(Path(path) / CONFIG_FILE))
    model = Im2Sp(config)
    load_into(model, state_dict, str(path))
    return model.eval(), config


# ----------------------------------------------------------------------------------------
# The unit vocoder: units + durations -> log-mel -> Griffin-Lim


@dataclass
class MelConfig:
    n_fft: int = 1024
    hop_length: int = 160  # 10 ms
    win_length: int = 640
    n_mels: int = 80
    fmax: float = 8000.0
    floor: float = 1e-5  # log(max(mel, floor))
    griffin_lim_iters: int = 32


@dataclass
class UnitVocoderConfig:
    kind: str = VOCODER_KIND
    num_units: int = 100
    # Mel frames per unit frame: the unit frame rate (CSA's wav2vec2 CNN: 640 samples = 40 ms) over the hop.
    frames_per_unit: int = 4
    hidden_size: int = 192
    unit_layers: int = 3  # conv blocks over the deduplicated units (durations are read from them)
    frame_layers: int = 4  # conv blocks over the unit frames (each predicts frames_per_unit mel frames)
    kernel_size: int = 5
    max_run: int = 16  # a unit frame's position within its run is embedded up to this
    dropout: float = 0.1
    mel: MelConfig = field(default_factory=MelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "UnitVocoderConfig":
        config = from_dict(cls, data, source)
        if config.kind != VOCODER_KIND:
            raise ValueError(f"{source}: kind must be {VOCODER_KIND!r} for a unit vocoder config, got {config.kind!r}")
        return config


def log_mel(wave: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """16 kHz float waveform -> (frames, n_mels) log magnitude mel (the vocoder's target)."""
    mel = librosa.feature.melspectrogram(y=wave, sr=SAMPLE_RATE, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                                         win_length=cfg.win_length, n_mels=cfg.n_mels, fmax=cfg.fmax, power=1.0)
    return np.log(np.maximum(mel, cfg.floor)).T.astype(np.float32)


def griffin_lim(log_mel_frames: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """(frames, n_mels) log magnitude mel -> 16 kHz float32 waveform (Griffin-Lim phase), peak 0.9."""
    mel = np.exp(log_mel_frames.T.astype(np.float64))
    magnitude = librosa.feature.inverse.mel_to_stft(mel, sr=SAMPLE_RATE, n_fft=cfg.n_fft, power=1.0, fmax=cfg.fmax)
    # A fixed start phase: the same units always sound the same (and judges score them the same).
    wave = librosa.griffinlim(magnitude, n_iter=cfg.griffin_lim_iters, hop_length=cfg.hop_length,
                              win_length=cfg.win_length, n_fft=cfg.n_fft, random_state=0)
    peak = np.abs(wave).max()
    return (wave * (0.9 / peak) if peak > 0 else wave).astype(np.float32)


class ConvBlock(nn.Module):
    """Residual 1-D conv + LayerNorm over (B, T, C), padded positions zeroed."""

    def __init__(self, channels: int, kernel_size: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # x: (B, T, C), valid: (B, T) bool
        y = F.gelu(self.conv(x.transpose(1, 2)).transpose(1, 2))
        return self.norm(x + self.dropout(y)) * valid[..., None]


class UnitVocoder(nn.Module):
    """Deduplicated units -> per-unit durations (in unit frames) and log-mel frames."""

    def __init__(self, cfg: UnitVocoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.unit_embedding = nn.Embedding(cfg.num_units + 1, d, padding_idx=cfg.num_units)  # last id: padding
        self.unit_blocks = nn.ModuleList(ConvBlock(d, cfg.kernel_size, cfg.dropout) for _ in range(cfg.unit_layers))
        self.duration_head = nn.Linear(d, 1)  # log(1 + run length)
        self.run_position = nn.Embedding(cfg.max_run, d)
        self.frame_blocks = nn.ModuleList(ConvBlock(d, cfg.kernel_size, cfg.dropout) for _ in range(cfg.frame_layers))
        self.mel_head = nn.Linear(d, cfg.frames_per_unit * cfg.mel.n_mels)

    def encode_units(self, units: torch.Tensor, unit_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """units (B, U) (padding = num_units), valid (B, U) -> unit states (B, U, D), log-duration (B, U)."""
        x = self.unit_embedding(units) * unit_valid[..., None]
        for block in self.unit_blocks:
            x = block(x, unit_valid)
        return x, self.duration_head(x).squeeze(-1)

    def frames(self, states: torch.Tensor, durations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Length regulation: unit states (B, U, D), durations (B, U) in unit frames -> log-mel
        (B, F, n_mels) and frame validity (B, F), F = frames_per_unit * the longest total duration.
        The conv blocks run at the unit frame rate; each unit frame predicts its frames_per_unit mel frames."""
        ends = durations.cumsum(1)  # (B, U)
        total = ends[:, -1]  # (B,)
        frame_index = torch.arange(int(total.max()), device=states.device)  # (T,)
        # The unit of each frame: how many units end at or before it.
        owner = (frame_index[None, :, None] >= ends[:, None, :]).sum(-1).clamp(max=states.shape[1] - 1)  # (B, T)
        position = frame_index[None] - torch.gather(ends - durations, 1, owner)  # (B, T) frames since the run began
        x = torch.gather(states, 1, owner[..., None].expand(-1, -1, states.shape[2]))  # (B, T, D)
        x = x + self.run_position(position.clamp(max=self.run_position.num_embeddings - 1))
        valid = frame_index[None] < total[:, None]  # (B, T)
        x = x * valid[..., None]
        for block in self.frame_blocks:
            x = block(x, valid)
        batch, steps = valid.shape
        mel = self.mel_head(x).view(batch, steps * self.cfg.frames_per_unit, self.cfg.mel.n_mels)  # (B, F, M)
        return mel, valid.repeat_interleave(self.cfg.frames_per_unit, dim=1)

    def forward(self, units: torch.Tensor, unit_valid: torch.Tensor,
                durations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced durations -> (log-mel (B, F, M), frame validity (B, F), predicted log-duration (B, U))."""
        states, log_duration = self.encode_units(units, unit_valid)
        mel, valid = self.frames(states, durations * unit_valid)
        return mel, valid, log_duration

    @torch.no_grad()
    def synthesise_mel(self, units: Sequence[int]) -> np.ndarray:
        """Deduplicated units -> (frames, n_mels) log-mel, durations predicted (at least one frame per unit)."""
        if not units:
            raise ValueError("no units to synthesise (the decoder produced an empty sequence)")
        unit_tensor = torch.tensor([list(units)], dtype=torch.long)
        valid = torch.ones_like(unit_tensor, dtype=torch.bool)
        states, log_duration = self.encode_units(unit_tensor, valid)
        durations = torch.clamp(torch.round(log_duration.exp() - 1), min=1).long()
        mel, _ = self.frames(states, durations)
        return mel[0].numpy()

    def synthesise(self, units: Sequence[int]) -> np.ndarray:
        """Deduplicated units -> 16 kHz float32 waveform."""
        return griffin_lim(self.synthesise_mel(units), self.cfg.mel)


def build_vocoder_from_checkpoint(path: str | Path) -> tuple[UnitVocoder, UnitVocoderConfig]:
    state_dict, config_dict = read_checkpoint_dir(path)
    config = UnitVocoderConfig.from_dict(config_dict, source=str(Path(path) / CONFIG_FILE))
    model = UnitVocoder(config)
    load_into(model, state_dict, str(path))
    return model.eval(), config


# ----------------------------------------------------------------------------------------
# Speech -> text over a closed set (Judge 1, and the answer's text)


class ExpressionRetriever:
    """A CSA model's speech->text retrieval over a fixed list of sentences (cosine, top 1)."""

    def __init__(self, csa: CSA, tokenizer: Any, expressions: Sequence[str], batch_size: int = 256):
        if not expressions:
            raise ValueError("ExpressionRetriever needs at least one expression")
        self.csa, self.expressions = csa.eval(), list(expressions)
        chunks = []
        with torch.no_grad():
            for start in range(0, len(self.expressions), batch_size):
                encoded = tokenizer(self.expressions[start:start + batch_size], padding=True, return_tensors="pt")
                chunks.append(F.normalize(csa.encode_text(encoded["input_ids"], encoded["attention_mask"]), dim=-1))
        self.text_vectors = torch.cat(chunks)  # (N, D)

    @classmethod
    def from_checkpoint(cls, path: str | Path, expressions: Sequence[str]) -> "ExpressionRetriever":
        config = read_config(path)
        csa = CSA(config, load_pretrained=False)
        state_dict, _ = read_checkpoint_dir(path)
        load_into(csa, state_dict, str(path))
        return cls(csa, load_tokenizer(config.text_encoder), expressions)

    @torch.no_grad()
    def retrieve(self, waves: Sequence[np.ndarray], sample_rate: int = SAMPLE_RATE) -> list[str]:
        """Waveforms -> the best-matching expression of each."""
        minimum = self.csa.speech_encoder.minimum_samples()
        prepared = [prepare_waveform(wave, sample_rate, min_samples=minimum) for wave in waves]
        input_values, attention_mask = speech_batch(prepared)
        speech = F.normalize(self.csa.encode_speech(input_values, attention_mask), dim=-1)  # (B, D)
        best = (speech @ self.text_vectors.t()).argmax(1)
        return [self.expressions[int(i)] for i in best]


# ----------------------------------------------------------------------------------------
# The robot's answer


@dataclass(frozen=True)
class Answer:
    waveform: np.ndarray  # (N,) float32 at SAMPLE_RATE
    sample_rate: int
    units: list[int]  # the decoded (deduplicated) units
    text: str  # the lexicon's expression nearest the units: what the answer means to say


class Answerer:
    """(image, box) -> the spoken answer naming that object.

        answerer = Answerer.from_directory("runs/im2sp_answer")   # decoder/ vocoder/ lexicon.json
        answer = answerer.answer(image_rgb_uint8, box_xyxy)         # box in original-image pixels
        answer.waveform, answer.sample_rate, answer.text
    """

    def __init__(self, decoder: Im2Sp, vocoder: UnitVocoder, lexicon: dict[str, list[int]], beam_size: int = 5):
        if decoder.cfg.num_units != vocoder.cfg.num_units:
            raise ValueError(f"decoder speaks {decoder.cfg.num_units} units but the vocoder reads "
                             f"{vocoder.cfg.num_units}: they were trained on different unit inventories")
        if not lexicon:
            raise ValueError("the answer lexicon is empty: it needs the expressions the decoder was trained on")
        self.decoder, self.vocoder, self.lexicon = decoder.eval(), vocoder.eval(), lexicon
        self.beam_size = beam_size

    @classmethod
    def from_directory(cls, path: str | Path, beam_size: int = 5) -> "Answerer":
        """An answer directory: decoder/ and vocoder/ checkpoints and lexicon.json ({text: units})."""
        path = Path(path)
        if not (path / ANSWER_LEXICON).is_file():
            raise FileNotFoundError(f"{path} is not an answer directory (no {ANSWER_LEXICON}; it holds "
                                    f"{ANSWER_DECODER}/, {ANSWER_VOCODER}/ and {ANSWER_LEXICON}: make one with "
                                    "python -m csref_training.im2sp bundle)")
        decoder, _ = build_im2sp_from_checkpoint(path / ANSWER_DECODER)
        vocoder, _ = build_vocoder_from_checkpoint(path / ANSWER_VOCODER)
        return cls(decoder, vocoder, json.loads((path / ANSWER_LEXICON).read_text()), beam_size)

    @torch.no_grad()
    def answer_units(self, image_rgb: np.ndarray, box_xyxy: Sequence[float]) -> list[int]:
        box = np.asarray(box_xyxy, dtype=np.float32)
        if box.shape != (4,) or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"box must be x1, y1, x2, y2 with x2 > x1 and y2 > y1 (original-image pixels), got {box_xyxy}")
        image, geometry = letterbox(image_rgb, self.decoder.cfg.image_size)
        maps = self.decoder.encode_image(image[None])
        boxes = torch.from_numpy(geometry.box_to_input(box).astype(np.float32))[None]  # (1, 4)
        prefix = self.decoder.prefix(*maps, boxes)
        return self.decoder.beam_search(prefix, self.beam_size)

    def text_of(self, units: Sequence[int]) -> str:
        """The lexicon's expression whose units are nearest `units` (edit distance over their length)."""
        return min(self.lexicon, key=lambda text: edit_distance(units, self.lexicon[text]) / len(self.lexicon[text]))

    def answer(self, image_rgb: np.ndarray, box_xyxy: Sequence[float]) -> Answer:
        """H x W x 3 uint8 RGB and the chosen box (x1, y1, x2, y2, original pixels) -> the answer."""
        units = self.answer_units(image_rgb, box_xyxy)
        if not units:
            raise RuntimeError("the Im2Sp decoder produced no units for this box (EOS first); nothing to say")
        return Answer(self.vocoder.synthesise(units), SAMPLE_RATE, units, self.text_of(units))
