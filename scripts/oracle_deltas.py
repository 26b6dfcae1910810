"""Prints max |ours - reference| / tolerance for every entry of the CSRef parity oracles.

    .venv/bin/python scripts/oracle_deltas.py [--oracle-dir DIR]

Builds our SREC and CSA (config "base") with the `csref-seeded-v1` recipe weights, runs the
stored inputs and compares every output, intermediate and summary in upstream-to-downstream order.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from oracle_weights import csa_entries, deltas, load_oracle, oracle_state_dict, srec_entries  # noqa: E402

from csref_model.config import load_model_config  # noqa: E402
from csref_model.csa import CSA  # noqa: E402
from csref_model.srec import SREC  # noqa: E402

# BERT's position_ids is a buffer of transformers 4.30 that newer versions no longer save.
CSA_DROPPED_KEYS = ("text_encoder.model.embeddings.position_ids",)


def build(name: str) -> tuple[torch.nn.Module, dict, float]:
    oracle = load_oracle(name)
    state_dict, fingerprint_ratio = oracle_state_dict(oracle)
    cfg = load_model_config("base")
    model = SREC(cfg, load_pretrained=False) if name == "srec" else CSA(cfg, load_pretrained=False)
    own_keys = set(model.state_dict())
    state_dict = {k: v for k, v in state_dict.items() if k in own_keys or k not in CSA_DROPPED_KEYS}
    model.load_state_dict(state_dict, strict=True)
    return model.eval(), oracle, fingerprint_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oracle-dir", help="directory with srec_seeded.pt / csa_seeded.pt")
    args = parser.parse_args()
    if args.oracle_dir:
        os.environ["CSREF_ORACLE_DIR"] = args.oracle_dir
    worst = 0.0
    for name, entries_of in (("srec", srec_entries), ("csa", csa_entries)):
        model, oracle, fingerprint_ratio = build(name)
        print(f"{name}: weight fingerprints worst deviation / bound = {fingerprint_ratio:.3g}")
        print(f"  {'entry':40s} {'max|delta|':>12s} {'tolerance':>10s} {'ratio':>8s}")
        for entry, delta, tolerance in deltas(entries_of(model, oracle), oracle):
            worst = max(worst, delta / tolerance)
            flag = "" if delta <= tolerance else "  FAIL"
            print(f"  {entry:40s} {delta:12.3g} {tolerance:10.3g} {delta / tolerance:8.4f}{flag}")
    print(f"worst ratio over both oracles: {worst:.4f}")


if __name__ == "__main__":
    main()
