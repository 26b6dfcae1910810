#!/usr/bin/env bash
# Weak supervision on Spoken Shapes, end to end on CPU (docs/TRAINING.md, "Weak supervision"):
# candidate detector -> CSA -> RefCLIP (no referent box) -> pseudo-labels -> SREC on them, and
# the fully supervised SREC with the same recipe on the same split, both evaluated on the test split.
# Every stage resumes or skips what is done; re-running continues an interrupted run.
#   scripts/train_weak_supervision.sh [key=value ...]   # overrides go to every trainer
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
DATA=${DATA:-data/weak}
RUNS=${RUNS:-runs/weak}
TRAIN=${TRAIN:-4000}

# 1. Grounding data (seed 0) and detector scenes from a disjoint seed (only their object boxes are read).
[ -f "$DATA/shapes/anns/spoken_shapes.json" ] ||
  $PY -m csref_training.spoken_shapes --out "$DATA/shapes" --train "$TRAIN" --val 300 --test 400 --workers 2
[ -f "$DATA/detector/anns/spoken_shapes.json" ] ||
  $PY -m csref_training.spoken_shapes --out "$DATA/detector" --seed 1000 --train 3000 --val 200 --test 0 --workers 2

# 2. The frozen parts: class-agnostic detector (boxes of every object, no expression) and CSA
#    (speech-text pairs, no box).
$PY -m csref_training.detector --config config/train/detector_spoken_shapes.yaml \
  data.root="$DATA/detector" output_dir="$RUNS/detector" epochs=12 "$@"
$PY -m csref_training.csa --config config/train/csa_spoken_shapes.yaml \
  data.root="$DATA/shapes" output_dir="$RUNS/csa" epochs=6 "$@"

# 3. RefCLIP without a single referent box in training (validation Acc@0.5 picks best).
REFCLIP=(--config config/train/refclip_spoken_shapes.yaml data.root="$DATA/shapes" output_dir="$RUNS/refclip"
         task.detector_checkpoint="$RUNS/detector/best" task.speech_checkpoint="$RUNS/csa/best")
$PY -m csref_training.refclip "${REFCLIP[@]}" "$@"
$PY -m csref_training.refclip evaluate "${REFCLIP[@]}" --checkpoint "$RUNS/refclip/best" --split test \
  > "$RUNS/refclip/eval_test.json"

# 4. Pseudo-labels for train and val, then SREC on them and SREC on the true boxes, same recipe.
[ -f "$DATA/pseudo/anns/spoken_shapes.json" ] ||
  $PY -m csref_training.refclip pseudo-label "${REFCLIP[@]}" --checkpoint "$RUNS/refclip/best" --out "$DATA/pseudo" \
    > "$RUNS/refclip/pseudo_labels.json"
SREC=(--config config/train/srec_spoken_shapes.yaml init_speech_encoder="$RUNS/csa/best" epochs=10)
$PY -m csref_training.srec "${SREC[@]}" output_dir="$RUNS/srec_pseudo" data.ann_path="$DATA/pseudo/anns/spoken_shapes.json" \
  data.image_dir="$DATA/shapes/images" data.audio_root="$DATA/shapes/audios/spoken_shapes" "$@"
$PY -m csref_training.srec "${SREC[@]}" output_dir="$RUNS/srec_full" data.root="$DATA/shapes" "$@"

# 5. Both SREC models on the untouched test split.
for run in srec_pseudo srec_full; do
  $PY -m csref_training.evaluate --checkpoint "$RUNS/$run/best" --data-root "$DATA/shapes" --splits test \
    --json "$RUNS/$run/eval_test.json"
done
