"""Across-speaker minimal-pair ABX: how well a speech representation tells phones apart.

The ResDAVEnet-VQ paper reports the ZeroSpeech 2019 ABX error of each layer: lower layers (and
their VQ codes) are the more phone-like. ZeroSpeech's items are triphones cut out of read speech
by forced alignment; we have no aligner, so each item is a whole English CVC word spoken alone by
espeak-ng, and the words of a group differ in exactly one phone at one position (`MINIMAL_PAIRS`:
the vowel of b_t, the onset of _at, the coda of ba_).

A triplet (A, B, X): A and B spoken by one voice, X by another; A and X are the same word, B a word
of A's group. It is an error when X is nearer to B than to A (a tie counts one half). The distance
is ZeroSpeech's: dynamic time warping over the frames' angular distance (arccos of the cosine, / pi),
averaged along the best path. The error of an ordered word pair (A, B) is averaged over voice pairs,
then over the pairs of each group; `abx_error` is the mean of the groups.

Voices are espeak-ng's `heldout` list by default: no model of this repository trained on them.

    python -m csref_training.abx                                   # log-mel (the input of ResDAVEnet-VQ)
    python -m csref_training.abx --checkpoint runs/davenet/best    # ResDAVEnet-VQ: convK and quantK of slots 1-5
    python -m csref_training.abx --checkpoint models/spoken_shapes_tiny --layers 0,2,4   # wav2vec2 states
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from csref_model.checkpoint import CONFIG_FILE, load_speech_encoder
from csref_model.davenet import (
    DAVENET_KIND,
    NUM_VQ_SLOTS,
    Davenet,
    LogMelConfig,
    build_davenet_from_checkpoint,
    log_mel,
)
from csref_model.typed_yaml import read_yaml
from csref_training.spoken_shapes.speech import ESPEAK_DEFAULT_RATE, HELDOUT_VOICES, synthesize, trim_to_audible

logger = logging.getLogger(__name__)

# Groups of words that differ in one phone at one position (checked against espeak-ng's phonemes
# in tests/test_abx.py).
MINIMAL_PAIRS = {
    "vowel": ("bit", "bet", "bat", "but", "boot", "beat", "bait", "bite", "boat"),
    "onset": ("bat", "cat", "fat", "hat", "mat", "pat", "rat", "sat"),
    "coda": ("bad", "bag", "ban", "bat", "back", "bash"),
}
DEFAULT_VOICES = HELDOUT_VOICES[:: len(HELDOUT_VOICES) // 6][:6]

# One utterance (float32 at SAMPLE_RATE) -> its frames (T, D).
Representation = Callable[[np.ndarray], np.ndarray]


def speak_items(voices: tuple[str, ...], pitch: int = 50) -> dict[tuple[str, str], np.ndarray]:
    """(word, voice) -> the word spoken alone, silence trimmed."""
    items = {}
    for voice in voices:
        for word in sorted(set(itertools.chain(*MINIMAL_PAIRS.values()))):
            items[word, voice] = trim_to_audible(synthesize(word, voice, ESPEAK_DEFAULT_RATE, pitch))
    return items


def dtw_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean angular frame distance along the best warping path of (Ta, D) and (Tb, D) frames."""
    a_unit = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b_unit = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    frame = np.arccos(np.clip(a_unit @ b_unit.T, -1.0, 1.0)) / np.pi  # (Ta, Tb)
    rows, cols = frame.shape
    cost = np.full((rows + 1, cols + 1), np.inf)
    steps = np.zeros((rows + 1, cols + 1))
    cost[0, 0] = 0.0
    # Anti-diagonals: every cell of one depends only on the two before it.
    for diagonal in range(2, rows + cols + 1):
        i = np.arange(max(1, diagonal - cols), min(rows, diagonal - 1) + 1)
        j = diagonal - i
        previous = np.stack([cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]])  # (3, n)
        lengths = np.stack([steps[i - 1, j - 1], steps[i - 1, j], steps[i, j - 1]])
        best = previous.argmin(axis=0)
        pick = np.arange(len(i))
        cost[i, j] = previous[best, pick] + frame[i - 1, j - 1]
        steps[i, j] = lengths[best, pick] + 1
    return float(cost[rows, cols] / steps[rows, cols])


def abx_errors(features: dict[tuple[str, str], np.ndarray], voices: tuple[str, ...]) -> dict[str, float]:
    """ABX error of each group of `MINIMAL_PAIRS` and their mean (`abx_error`), from frames of every
    (word, voice) item."""
    distance: dict[tuple[str, str, str, str], float] = {}

    def between(word_1: str, voice_1: str, word_2: str, voice_2: str) -> float:
        key = (word_1, voice_1, word_2, voice_2)
        if key not in distance:
            distance[key] = dtw_distance(features[word_1, voice_1], features[word_2, voice_2])
        return distance[key]

    errors = {}
    for group, words in MINIMAL_PAIRS.items():
        per_pair = []
        for word_a, word_b in itertools.permutations(words, 2):
            per_voices = []
            for voice_ab, voice_x in itertools.permutations(voices, 2):
                to_a = between(word_a, voice_ab, word_a, voice_x)
                to_b = between(word_b, voice_ab, word_a, voice_x)
                per_voices.append(1.0 if to_b < to_a else 0.5 if to_b == to_a else 0.0)
            per_pair.append(np.mean(per_voices))
        errors[group] = float(np.mean(per_pair))
    errors["abx_error"] = float(np.mean([errors[group] for group in MINIMAL_PAIRS]))
    return errors


def log_mel_frames(wave: np.ndarray) -> np.ndarray:
    return log_mel(torch.from_numpy(wave), LogMelConfig()).T.numpy()  # (T, num_mel_bins)


def davenet_frames(model: Davenet, slot: int, quantised: bool) -> Representation:
    """ResDAVEnet-VQ's frames at slot `slot` (1: the first convolution, k + 1: residual stage k), as the
    official run_extract_feats_abx.py dumps them for ZeroSpeech: `quantK` the VQ layer's output,
    `convK` its input (the continuous frames, at a slot with or without a VQ layer)."""
    encoder = model.speech_encoder
    if quantised and slot not in encoder.vq_layers:
        raise ValueError(f"slot {slot} has no VQ layer (active: {encoder.vq_layers or 'none'})")

    @torch.no_grad()
    def frames(wave: np.ndarray) -> np.ndarray:
        features = log_mel(torch.from_numpy(wave), model.cfg.log_mel)[None]  # (1, num_mel_bins, T)
        lengths = torch.tensor([features.shape[-1]])
        if quantised:
            output = encoder(features, lengths, upto_slot=slot)
            x, lengths = output.embeddings, output.lengths  # (1, W, T_slot)
        else:  # what flows up from the slot below, through this slot's stage (slot 1: the convolution's output)
            below = encoder(features, lengths, upto_slot=slot - 1)
            x, lengths = below.embeddings, below.lengths
            if slot > 1:
                x, lengths = encoder.run_stage(slot, x.unsqueeze(2), lengths)
                x = x.squeeze(2)
        return x[0, :, :int(lengths[0])].T.numpy()  # (T_slot, W)
    return frames


def representations(checkpoint: Path | None, layers: list[int] | None) -> dict[str, Representation]:
    """Name -> representation: log-mel without a checkpoint, else the checkpoint's layers."""
    if checkpoint is None:
        return {"log_mel": log_mel_frames}
    if read_yaml(checkpoint / CONFIG_FILE, "checkpoint config").get("kind") == DAVENET_KIND:
        model = build_davenet_from_checkpoint(checkpoint)[0]
        named = {}
        for slot in layers or range(1, NUM_VQ_SLOTS + 1):
            if not 1 <= slot <= NUM_VQ_SLOTS:
                raise ValueError(f"ResDAVEnet-VQ has slots 1..{NUM_VQ_SLOTS}, not {slot}")
            named[f"davenet_conv{slot}"] = davenet_frames(model, slot, quantised=False)
            if slot in model.speech_encoder.vq_layers:
                named[f"davenet_quant{slot}"] = davenet_frames(model, slot, quantised=True)
        return named
    encoder = load_speech_encoder(checkpoint)
    for index in layers or []:
        encoder.check_hidden_state(index, f"the speech encoder of {checkpoint}")
    return {f"wav2vec2_state{index}": functools.partial(encoder.hidden_state, layer=index)
            for index in (layers or range(encoder.model.config.num_hidden_layers + 1))}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(prog="python -m csref_training.abx", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a ResDAVEnet-VQ, CSA or SREC checkpoint directory "
                        "(none: log-mel features)")
    parser.add_argument("--layers", help="comma-separated ResDAVEnet-VQ slots (1-5) or wav2vec2 hidden states "
                        "(0 = the convolutional features' projection); default: all")
    parser.add_argument("--voices", default=",".join(DEFAULT_VOICES),
                        help="comma-separated voices of any engine (espeak-ng names, flite:slt, festival:kal, ...), at "
                        "least two (default: six of espeak-ng's held-out list)")
    args = parser.parse_args(argv)
    voices = tuple(args.voices.split(","))
    if len(voices) < 2:
        parser.error(f"--voices needs at least two voices for across-speaker triplets, got {args.voices!r}")
    if args.checkpoint is not None and not (args.checkpoint / CONFIG_FILE).is_file():
        parser.error(f"--checkpoint {args.checkpoint} is not a checkpoint directory (no {CONFIG_FILE})")
    try:
        layers = [int(layer) for layer in args.layers.split(",")] if args.layers else None
    except ValueError:
        parser.error(f"--layers takes comma-separated integers such as 1,2,3, got {args.layers!r}")
    named = representations(args.checkpoint, layers)
    items = speak_items(voices)
    results = {}
    for name, represent in named.items():
        features = {key: represent(wave) for key, wave in items.items()}
        results[name] = abx_errors(features, voices)
        logger.info("%s: %s", name, results[name])
    print(json.dumps({"voices": list(voices), "words": MINIMAL_PAIRS, "abx": results}, indent=2))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(0 if main() else 1)
