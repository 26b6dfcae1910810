"""Acc@0.5 of several SREC training runs on several test sets, as a markdown matrix.

    .venv/bin/python scripts/cross_engine_matrix.py \\
        --run "espeak=runs/srec_spoken_shapes/best" \\
        --run "espeak+flite, augmented=runs/srec_spoken_shapes_augmented/best" \\
        --test "espeak held-out voices=data/shapes_espeak_heldout" \\
        --test "festival:kal, babble 5-20 dB=data/shapes_festival_kal" \\
        --split test --json matrix.json --markdown matrix.md

Rows are training runs, labelled with the engines (and voices, augmentation) they were trained
on; columns are test sets (Spoken Shapes layout data roots), labelled with their engine, voices
and noise; each cell is Acc@0.5 of the run's checkpoint directory on the set's split. Every cell
is one `csref_training.evaluate` run (`--checkpoint DIR --data-root ROOT`), the evaluation the
README's numbers come from. `--json` keeps every metric of every cell.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from csref_training import evaluate


def labelled_path(text: str) -> tuple[str, Path]:
    """"LABEL=PATH" -> (label, path); the label is everything before the first '='."""
    label, sep, path = text.partition("=")
    if not sep or not label.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, e.g. 'espeak=runs/srec_spoken_shapes/best', got {text!r}")
    return label.strip(), Path(path.strip())


def evaluate_cell(checkpoint: Path, data_root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The metrics of `checkpoint` on `data_root`'s split, from csref_training.evaluate."""
    argv = ["--checkpoint", str(checkpoint), "--data-root", str(data_root), "--dataset", args.dataset,
            "--splits", args.split, "--num-workers", str(args.num_workers), "--device", args.device]
    if args.batch_size:
        argv += ["--batch-size", str(args.batch_size)]
    results = evaluate.main(argv)
    if results["model"] != "srec":
        raise SystemExit(f"{checkpoint} is a {results['model'].upper()} checkpoint; the matrix needs SREC checkpoints "
                         "(Acc@0.5 of boxes)")
    return results["splits"][args.split]


def markdown_matrix(runs: list[str], tests: list[str], cells: dict[tuple[str, str], dict[str, Any]]) -> str:
    """Rows = training runs, columns = test sets, cells = Acc@0.5; the sample counts below."""
    lines = ["| training \\ test | " + " | ".join(tests) + " |", "| --- |" + " --- |" * len(tests)]
    for run in runs:
        lines.append(f"| {run} | " + " | ".join(f"{cells[run, test]['acc_50']:.3f}" for test in tests) + " |")
    counts = ", ".join(f"{test}: {cells[runs[0], test]['count']}" for test in tests)
    return "\n".join(lines) + f"\n\nAcc@0.5 (IoU > 0.5); samples per test set: {counts}.\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", type=labelled_path, required=True, metavar="LABEL=CHECKPOINT_DIR",
                        help="a training run: its training engines as label, its checkpoint directory (repeat)")
    parser.add_argument("--test", action="append", type=labelled_path, required=True, metavar="LABEL=DATA_ROOT",
                        help="a test set: its engine/voices/noise as label, its data root (repeat)")
    parser.add_argument("--split", default="test", help="split of every test set (default: test)")
    parser.add_argument("--dataset", default="spoken_shapes", help="dataset name inside each data root")
    parser.add_argument("--batch-size", type=int, default=None, help="default: each checkpoint's eval_batch_size")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="write every cell's metrics here")
    parser.add_argument("--markdown", type=Path, help="write the matrix here too")
    args = parser.parse_args(argv)
    for kind, entries in (("--run", args.run), ("--test", args.test)):
        labels = [label for label, _ in entries]
        if len(set(labels)) != len(labels):
            parser.error(f"{kind} labels must be distinct, got {labels}")

    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for run, checkpoint in args.run:
        for test, data_root in args.test:
            print(f"== {run} on {test}", flush=True)
            cells[run, test] = evaluate_cell(checkpoint, data_root, args)
    runs, tests = [label for label, _ in args.run], [label for label, _ in args.test]
    table = markdown_matrix(runs, tests, cells)
    print("\n" + table, end="")
    result = {
        "split": args.split,
        "runs": {label: str(path) for label, path in args.run},
        "tests": {label: str(path) for label, path in args.test},
        "cells": [{"run": run, "test": test, **cells[run, test]} for run in runs for test in tests],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
