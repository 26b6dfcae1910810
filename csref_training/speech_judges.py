"""Judges of generated Spoken Shapes speech: does it say the expression it should?

- Judge 1 (`csref_model.im2sp.ExpressionRetriever`): our CSA model's speech->text retrieval over
  every expression the grammar can form (`all_expressions`); exact-expression accuracy.
- Judge 2: our SREC model as the listener (`csref_model.Grounder`): does the speech, grounded on
  the same image, select the target box (IoU > 0.5)?
- Judge 3 (`GrammarRecogniser`): pocketsphinx's English acoustic model (trained on real human
  speech, shipped in the pip package) constrained by a JSGF grammar of the Spoken Shapes
  expressions; exact match of the parsed expression. A weak recogniser: report it relative to its
  ceiling on the generator's own speech.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from csref_model.audio import SAMPLE_RATE
from csref_training.spoken_shapes.grammar import (
    CARRIER_PHRASES,
    COLOURS,
    HORIZONTAL_PLACES,
    SHAPES,
    SIZES,
    VERTICAL_PLACES,
    Expression,
    parse_expression,
)


def all_expressions() -> list[str]:
    """Every "the [size] [colour] <shape> [horizontal] [vertical]" the grammar forms (1944)."""
    return [Expression(shape, colour, size, horizontal, vertical).text
            for shape, colour, size, horizontal, vertical in itertools.product(
                SHAPES, (None, *COLOURS), (None, *SIZES), (None, *HORIZONTAL_PLACES), (None, *VERTICAL_PLACES))]


def expression_of(sentence: str) -> str:
    """A command ("pick up the small circle") -> its expression without the carrier ("the small circle")."""
    return parse_expression(sentence).text


def jsgf_grammar() -> str:
    """The Spoken Shapes commands (optional carrier phrase + expression) as a JSGF grammar."""
    def choice(words: Sequence[str]) -> str:
        return "(" + " | ".join(words) + ")"
    return (
        "#JSGF V1.0;\ngrammar spoken_shapes;\n"
        f"public <command> = [{choice(CARRIER_PHRASES)}] the [{choice(SIZES)}] [{choice(list(COLOURS))}] "
        f"{choice(SHAPES)} [{choice(list(HORIZONTAL_PLACES.values()))}] [{choice(list(VERTICAL_PLACES.values()))}];\n"
    )


class GrammarRecogniser:
    """pocketsphinx with the JSGF grammar of the commands: waveform -> recognised expression or None."""

    def __init__(self) -> None:
        # Optional dependency (setup.py extra "im2sp"): only Judge 3 needs it.
        from pocketsphinx import Config, Decoder

        config = Config(jsgf=None, lm=None, samprate=SAMPLE_RATE, loglevel="FATAL")
        self.decoder = Decoder(config)
        self.decoder.add_jsgf_string("spoken_shapes", jsgf_grammar().encode())
        self.decoder.activate_search("spoken_shapes")

    def recognise(self, wave: np.ndarray) -> str | None:
        """16 kHz float waveform -> the expression heard (carrier dropped), or None if nothing parsed."""
        pcm = (np.clip(wave, -1.0, 1.0) * 32767).astype(np.int16).tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hypothesis = self.decoder.hyp()
        if hypothesis is None or not hypothesis.hypstr:
            return None
        try:
            return expression_of(hypothesis.hypstr)
        except ValueError:
            return None
