#!/usr/bin/env bash
# The Spoken Shapes demo model, end to end on CPU: data, CSA, SREC, evaluation.
# Every stage resumes or skips what is already done, so re-running continues an interrupted run.
# About 4.5 hours on an idle 2-core CPU (data 11 min, CSA 45 min, SREC 20 epochs of 8-11 min).
#   scripts/train_spoken_shapes.sh            # from the repository root, .venv built (make setup)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1

# 1. Data: training voices (espeak-ng English voices x 40 variants), and a held-out set with 12
#    unseen variants and noise on every utterance (10-30 dB SNR).
[ -f data/spoken_shapes/anns/spoken_shapes.json ] ||
  $PY -m csref_training.synth --out data/spoken_shapes --train 12000 --val 400 --test 600 --workers 2
[ -f data/spoken_shapes_heldout/anns/spoken_shapes.json ] ||
  $PY -m csref_training.synth --out data/spoken_shapes_heldout --seed 1 --train 0 --val 0 --test 600 \
    --voice-set heldout --noise-prob 1 --snr-db-range 10,30 --workers 2

# 2. CSA: speech encoder aligned to the frozen all-MiniLM-L6-v2 sentence space.
$PY -m csref_training.csa --config config/train/csa_spoken_shapes.yaml "$@"

# 3. SREC, speech encoder initialised from CSA's best checkpoint.
$PY -m csref_training.srec --config config/train/srec_spoken_shapes.yaml "$@"

# 4. Evaluation of the best SREC checkpoint.
$PY -m csref_training.evaluate --config config/train/srec_spoken_shapes.yaml \
  --checkpoint runs/srec_spoken_shapes/best --splits val,test --json runs/srec_spoken_shapes/eval_test.json
$PY -m csref_training.evaluate --config config/train/srec_spoken_shapes.yaml \
  --checkpoint runs/srec_spoken_shapes/best --data-root data/spoken_shapes_heldout --splits test \
  --json runs/srec_spoken_shapes/eval_heldout.json
