"""Spoken Shapes: the project's synthetic speech-grounding task (docs/SPOKEN_SHAPES.md) in the
official RefCOCO-speech layout.

RGB images (sides 320-640 px) of 3-6 anti-aliased, non-overlapping shapes (circle, square,
triangle, star, diamond, cross; 8 colours; small or big) on a plain, gradient or photo
background; one target object per sample, described by the SHORTEST unique referring
expression, optionally after a carrier phrase ("pick up ..."), spoken by espeak-ng, flite or
festival (voices `en-us+m3`, `flite:slt`, `festival:kal`; lists in speech.py).

Modules, each importing only those above it:
    grammar   the words, the objects they refer to, `referents`, `describe` and its inverse
              `parse_expression`
    scene     shape geometry and layout: `place_objects`, `sample_layout`, `layout_for_expression`
    render    backgrounds and anti-aliased drawing
    speech    TTS engines and voice lists, `synthesize`, `render_speech` (silence padding, noise)
    generate  `SynthConfig`, `generate_sample`, `generate_dataset`
    __main__  the command line

Usage::

    python -m csref_training.spoken_shapes --out data/spoken_shapes --train 12000 --val 400 --test 600
    python -m csref_training.spoken_shapes --out data/spoken_shapes_heldout --seed 1 \\
        --train 0 --val 0 --test 600 --voice-set heldout --noise-prob 1 --snr-db-range 10,30
    python -m csref_training.spoken_shapes --out data/shapes_mixed --voice-set train,festival-train --balance-engines

A voice is drawn uniformly from the list, so espeak-ng's 328 training voices would drown festival's
two; `--balance-engines` draws the engine uniformly first, then one of its voices.

On-disk layout (``--dataset-name`` defaults to ``spoken_shapes``)::

    <out>/anns/<dataset>.json            {"train": [...], "val": [...], "test": [...]}
    <out>/images/<iid:012d>.jpg          e.g. images/000000000042.jpg
    <out>/audios/<dataset>/<speaker>/<sent_id>.wav   16 kHz mono 16-bit PCM
    <out>/masks/<iid:012d>.png           with --masks, val and test (train too with --train-masks):
                                         pixel = object index + 1
    <out>/<dataset>_generator.json       the generator settings, for provenance
    <out>/audios/<dataset>_captions/<speaker>/<iid>.wav   with --captions: the scene caption

Each annotation entry is ``{"iid", "bbox": [x, y, w, h] (floats, original pixels), "objects":
[{"bbox", "shape", "colour", "size"}, ...] (every object of the scene, the target at
"target_index"), "sent_ids": [sent_id], "refs": [{"sent_id", "sent", "speaker", "rate", "pitch",
"snr_db"}]}`` with one image,
one target and one sentence per entry (``sent_id == iid``). With ``--referents-per-scene N``
a scene has up to N entries (same ``iid``, different targets, ``sent_id = iid * N + r``); with
``--masks`` its val/test entries name the scene's object masks in ``"mask_file"`` (for
evaluating referring masks, never for weakly supervised training; ``--train-masks`` adds the
train entries' for a fully supervised upper bound). Every sentence is rendered with ONE
voice; its speaker directory is the voice string made file-system safe (``en-us+m3``,
``flite_slt``, ``festival_slt_hts``), also recorded in the ref. Loaders
look a sentence up as ``<speaker>/<sent_id>.wav`` in whichever selected speaker directory has it
(see ``csref_training.datasets``), which reads the real RefCOCO-speech layout, where every
speaker directory holds every sentence, the same way.

With ``--captions`` each entry also has ``"caption": {"sent_id", "sent", "speaker", "rate",
"pitch", "snr_db", "words": [{"word", "start", "end"}, ...]}``: every object of the scene, left
to right or, with ``--caption-order random``, in an order drawn per caption ("a big red circle,
a small blue star and a big green cross"), spoken word by word with
its own voice so that the word times (seconds in the WAV) are exact (``speech.render_word_sequence``).

Expressions name the shape, and optionally a colour, a size ("small"/"big"), a horizontal place
("on the left"/"on the right"/"in the middle") and a vertical place ("at the top"/"at the
bottom"); their meaning is in grammar.py. The generator picks, among all combinations whose
referents are exactly the target, one with the fewest optional attributes (ties: fewer place
words first, then at random), so place words are used only when they single the target out
with the margin. Noise (white, pink or brown) is added to a ``--noise-prob`` fraction of
utterances at an SNR drawn from ``--snr-db-range``. Rate and pitch are drawn per utterance, in
espeak-ng's units (words per minute, 0-99), which speech.py maps onto the other engines.
"""
