#!/usr/bin/env bash
# The Spoken Shapes demo model, end to end on CPU: data, CSA, SREC, evaluation.
# Every stage resumes or skips what is already done, so re-running continues an interrupted run.
# About 7 h 40 min on an idle 2-core CPU (data 11 min, CSA 4 epochs 35 min, SREC 20 epochs of 8 min,
# CSA epochs 5-10 46 min, SREC fine-tune 8 epochs of 7.5 min, then 3 min of data and 4 epochs of
# 6 min; then the second engine: data 7 min, CSA 6 epochs 21 min, SREC 6 epochs 19 min; then
# about 15 min of evaluation).
# Engines and voices heard in training: espeak-ng's `train` list and festival's `festival-train`
# (kal, ked). Never heard: flite (every voice), festival:slt_hts, espeak-ng's `heldout` list.
#   scripts/train_spoken_shapes.sh            # from the repository root, .venv built (make setup)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1

# 1. Data: training voices (espeak-ng English voices x 40 variants), and a held-out set with 12
#    unseen variants and noise on every utterance (10-30 dB SNR).
[ -f data/spoken_shapes/anns/spoken_shapes.json ] ||
  $PY -m csref_training.spoken_shapes --out data/spoken_shapes --train 12000 --val 400 --test 600 --workers 2
[ -f data/spoken_shapes_heldout/anns/spoken_shapes.json ] ||
  $PY -m csref_training.spoken_shapes --out data/spoken_shapes_heldout --seed 1 --train 0 --val 0 --test 600 \
    --voice-set heldout --noise-prob 1 --snr-db-range 10,30 --workers 2

# 2. CSA: speech encoder aligned to the frozen all-MiniLM-L6-v2 sentence space, 4 epochs.
$PY -m csref_training.csa --config config/train/csa_spoken_shapes.yaml "$@"

# 3. SREC, 20 epochs, speech encoder initialised from CSA's best checkpoint and frozen.
$PY -m csref_training.srec --config config/train/srec_spoken_shapes.yaml "$@"

# 4. CSA continued to 10 epochs in a copy of its run (the learning rate moves onto the 10-epoch
#    cosine at step 1500); the 4-epoch run stays as stage 3 used it.
[ -d runs/csa_spoken_shapes_long ] || cp -r runs/csa_spoken_shapes runs/csa_spoken_shapes_long
$PY -m csref_training.csa --config config/train/csa_spoken_shapes.yaml \
  output_dir=runs/csa_spoken_shapes_long epochs=10 "$@"

# 5. SREC fine-tuned for 8 epochs from stage 3's best with stage 4's speech encoder swapped in.
$PY -m csref_training.srec --config config/train/srec_spoken_shapes.yaml \
  init_checkpoint=runs/srec_spoken_shapes/best init_speech_encoder=runs/csa_spoken_shapes_long/best \
  output_dir=runs/srec_spoken_shapes_finetune epochs=8 optim.lr=2.0e-4 optim.min_lr=1.0e-5 "$@"

# 6. Four more SREC epochs on scenes whose object sizes vary per scene, from stage 5's best.
[ -f data/spoken_shapes_sizes/anns/spoken_shapes.json ] ||
  $PY -m csref_training.spoken_shapes --out data/spoken_shapes_sizes --train 9000 --val 400 --test 600 \
    --scene-scale 0.05,0.13 --workers 2
$PY -m csref_training.srec --config config/train/srec_spoken_shapes.yaml \
  init_checkpoint=runs/srec_spoken_shapes_finetune/best init_speech_encoder=null \
  data.root=data/spoken_shapes_sizes output_dir=runs/srec_spoken_shapes_sizes epochs=4 \
  optim.lr=1.0e-4 optim.min_lr=1.0e-5 "$@"

# 7. The second TTS engine, with augmentation: CSA goes on aligning stage 6's speech encoder on
#    scenes spoken half by espeak-ng training voices and half by festival's training voices
#    (--balance-engines), with the waveform augmentation of the *_augmented configs.
[ -f data/spoken_shapes_engines/anns/spoken_shapes.json ] ||
  $PY -m csref_training.spoken_shapes --out data/spoken_shapes_engines --seed 131 --train 4000 --val 300 --test 0 \
    --voice-set train,festival-train --balance-engines --workers 2
$PY -m csref_training.csa --config config/train/csa_spoken_shapes_augmented.yaml \
  init_speech_encoder=runs/srec_spoken_shapes_sizes/best data.root=data/spoken_shapes_engines \
  output_dir=runs/csa_spoken_shapes_engines epochs=6 optim.lr=2.0e-4 optim.min_lr=1.0e-5 "$@"

# 8. SREC fine-tuned from stage 6 with stage 7's speech encoder swapped in, on the same scenes with
#    the same augmentation: the demo model.
$PY -m csref_training.srec --config config/train/srec_spoken_shapes_augmented.yaml \
  init_checkpoint=runs/srec_spoken_shapes_sizes/best init_speech_encoder=runs/csa_spoken_shapes_engines/best \
  data.root=data/spoken_shapes_engines output_dir=runs/srec_spoken_shapes_engines epochs=6 \
  optim.lr=1.0e-4 optim.min_lr=1.0e-5 "$@"

# 9. Evaluation of its best checkpoint: the generator's own test split and held-out voices, then
#    the cross-engine matrix (docs/TRAINING.md "Cross-engine matrix") on test sets of voices and
#    engines it never heard, clean and with babble.
MODEL=runs/srec_spoken_shapes_engines/best
$PY -m csref_training.evaluate --checkpoint $MODEL --data-root data/spoken_shapes --dataset spoken_shapes --splits val,test \
  --json runs/srec_spoken_shapes_engines/eval_test.json
$PY -m csref_training.evaluate --checkpoint $MODEL --data-root data/spoken_shapes_heldout --dataset spoken_shapes --splits test \
  --json runs/srec_spoken_shapes_engines/eval_heldout.json
scripts/cross_engine_tests.sh "$MODEL"
