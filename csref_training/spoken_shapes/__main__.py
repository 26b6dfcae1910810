"""python -m csref_training.spoken_shapes --out DIR [...]: generate a Spoken Shapes dataset
(usage in the package docstring, flags in --help)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from csref_training.spoken_shapes.generate import CAPTION_ORDERS, SynthConfig, generate_dataset
from csref_training.spoken_shapes.render import BACKGROUNDS
from csref_training.spoken_shapes.scene import (
    BIG_EXTENT,
    BIG_EXTENT_FACTOR,
    MAX_EXTENT,
    SMALL_EXTENT,
    SMALL_EXTENT_FACTOR,
)
from csref_training.cli_args import number_range
from csref_training.spoken_shapes.speech import VOICE_SETS, engine_version, parse_voice

PROG = "python -m csref_training.spoken_shapes"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate the Spoken Shapes task in the RefCOCO-speech on-disk layout.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output root directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000, help="number of train samples")
    parser.add_argument("--val", type=int, default=200, help="number of val samples")
    parser.add_argument("--test", type=int, default=200, help="number of test samples")
    voices = parser.add_mutually_exclusive_group()
    voices.add_argument("--voices", help="comma-separated voices, `engine:name` or a bare espeak-ng name, "
                                          "e.g. en-us+m3,flite:slt,festival:kal")
    voices.add_argument("--voice-set", default="train",
                        help=f"comma-separated documented voice lists, e.g. train,flite-train: {', '.join(VOICE_SETS)} "
                             "(default: train, the espeak-ng training voices)")
    parser.add_argument("--balance-engines", action="store_true",
                        help="draw each utterance's engine uniformly among the voices' engines, then one of its "
                             "voices (default: a voice uniformly, so espeak-ng's hundreds of voices outweigh the rest)")
    parser.add_argument("--rate-range", type=number_range(int), default=(130, 210),
                        help="speaking rate range in words per minute (default 130,210)")
    parser.add_argument("--pitch-range", type=number_range(int), default=(20, 80),
                        help="espeak-ng pitch range 0-99 (default 20,80)")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("--snr-db-range", type=number_range(float), default=(10.0, 40.0),
                       help="SNR range of the additive noise in dB (default 10,40)")
    noise.add_argument("--no-noise", action="store_true", help="no additive noise at all")
    parser.add_argument("--noise-prob", type=float, default=0.5,
                        help="fraction of utterances that get noise (default 0.5)")
    parser.add_argument("--carrier-prob", type=float, default=0.5,
                        help='fraction of utterances with a carrier phrase such as "pick up" (default 0.5)')
    parser.add_argument("--backgrounds", default=",".join(BACKGROUNDS),
                        help="comma-separated subset of plain,gradient,photo")
    parser.add_argument("--scene-scale", type=number_range(float), default=None,
                        help="per-scene object scale range, e.g. 0.05,0.13: small objects get "
                             f"{SMALL_EXTENT_FACTOR[0]}-{SMALL_EXTENT_FACTOR[1]}x and big ones "
                             f"{BIG_EXTENT_FACTOR[0]}-{BIG_EXTENT_FACTOR[1]}x a scale drawn per scene, as a "
                             f"fraction of the shorter image side (default: fixed ranges, small {SMALL_EXTENT[0]}-{SMALL_EXTENT[1]}, "
                             f"big {BIG_EXTENT[0]}-{BIG_EXTENT[1]})")
    parser.add_argument("--captions", action="store_true",
                        help="also speak a whole-scene caption per image (\"a big red circle, a small blue star and "
                             "...\"), word by word with exact word alignments, to "
                             "audios/<dataset>_captions/<speaker>/<iid>.wav (image<->speech retrieval)")
    parser.add_argument("--caption-order", choices=CAPTION_ORDERS, default="left-to-right",
                        help="the order in which a caption names the objects; random (drawn per caption) "
                             "keeps the order from telling the layout (default left-to-right)")
    parser.add_argument("--masks", action="store_true",
                        help="write every object's mask for val and test (masks/<iid>.png, pixel = object "
                             "index + 1; for evaluating referring masks)")
    parser.add_argument("--train-masks", action="store_true",
                        help="with --masks, also write the train scenes' masks (only for a fully supervised "
                             "upper bound; python -m csref_training.ssc select --method truth)")
    parser.add_argument("--referents-per-scene", type=int, default=1,
                        help="up to this many referents per scene, each an entry with the same iid (default 1)")
    parser.add_argument("--overspecify-prob", type=float, default=0.0,
                        help="name each attribute a train command leaves out anyway with this probability, as "
                             "speakers often do; val and test commands stay the shortest (default 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dataset-name", default="spoken_shapes")
    args = parser.parse_args(argv)

    backgrounds = tuple(b for b in args.backgrounds.split(",") if b)
    unknown = [b for b in backgrounds if b not in BACKGROUNDS]
    if unknown or not backgrounds:
        parser.error(f"--backgrounds: unknown {unknown}; choose from {','.join(BACKGROUNDS)}")
    if min(args.train, args.val, args.test) < 0:
        parser.error("sample counts must be >= 0")
    if not 0.0 <= args.noise_prob <= 1.0 or not 0.0 <= args.carrier_prob <= 1.0:
        parser.error("--noise-prob and --carrier-prob must lie in [0, 1]")
    if args.train_masks and not args.masks:
        parser.error("--train-masks needs --masks")
    if args.referents_per_scene < 1:
        parser.error("--referents-per-scene must be >= 1")
    if args.scene_scale is not None and not 0.0 < args.scene_scale[0] <= args.scene_scale[1] <= MAX_EXTENT / 2:
        parser.error(f"--scene-scale must be two increasing numbers in (0, {MAX_EXTENT / 2}]")
    if args.voices:
        voice_list = tuple(v for v in args.voices.split(",") if v)
    else:
        set_names = [name for name in args.voice_set.split(",") if name]
        unknown_sets = [name for name in set_names if name not in VOICE_SETS]
        if unknown_sets or not set_names:
            parser.error(f"--voice-set: unknown {unknown_sets}; choose from {','.join(VOICE_SETS)}")
        voice_list = tuple(voice for name in set_names for voice in VOICE_SETS[name])
    try:
        engines = sorted({parse_voice(voice).engine for voice in voice_list})
    except ValueError as err:
        parser.error(f"--voices: {err}")
    cfg = SynthConfig(
        out=args.out,
        dataset_name=args.dataset_name,
        seed=args.seed,
        voices=voice_list,
        rate_range=args.rate_range,
        pitch_range=args.pitch_range,
        snr_db_range=args.snr_db_range,
        noise_prob=0.0 if args.no_noise else args.noise_prob,
        carrier_prob=args.carrier_prob,
        backgrounds=backgrounds,
        scene_scale=args.scene_scale,
        captions=args.captions,
        caption_order=args.caption_order,
        masks=args.masks,
        train_masks=args.train_masks,
        referents_per_scene=args.referents_per_scene,
        balance_engines=args.balance_engines,
        overspecify_prob=args.overspecify_prob,
    )
    counts = {"train": args.train, "val": args.val, "test": args.test}
    start = time.perf_counter()
    try:
        generate_dataset(cfg, counts, workers=args.workers, progress=True)
    except (ValueError, FileExistsError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    elapsed = time.perf_counter() - start
    total = sum(counts.values())
    info = {
        "argv": sys.argv if argv is None else [*PROG.split(), *argv],
        "counts": counts,
        "seed": cfg.seed,
        "voices": list(cfg.voices),
        "balance_engines": cfg.balance_engines,
        "rate_range": list(cfg.rate_range),
        "pitch_range": list(cfg.pitch_range),
        "snr_db_range": list(cfg.snr_db_range),
        "noise_prob": cfg.noise_prob,
        "carrier_prob": cfg.carrier_prob,
        "backgrounds": list(backgrounds),
        "scene_scale": None if cfg.scene_scale is None else list(cfg.scene_scale),
        "tts_engines": {engine: engine_version(engine) for engine in engines},
        "captions": cfg.captions,
        "caption_order": cfg.caption_order,
        "masks": cfg.masks,
        "train_masks": cfg.train_masks,
        "referents_per_scene": cfg.referents_per_scene,
        "wall_time_s": round(elapsed, 1),
    }
    (cfg.out / f"{cfg.dataset_name}_generator.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {total} samples to {cfg.out} in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.1f} samples/s)")


if __name__ == "__main__":
    main()
