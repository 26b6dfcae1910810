#!/usr/bin/env bash
# Weak supervision on Spoken Shapes, end to end on CPU (docs/TRAINING.md, "Weak supervision"):
# candidate detector -> CSA -> RefCLIP (no referent box) -> pseudo-labels -> SREC on them, and
# the fully supervised SREC with the same recipe on the same split, all evaluated on one test split.
# Every stage resumes or skips what is done; re-running continues an interrupted run.
#   scripts/train_weak_supervision.sh [key=value ...]   # overrides go to every trainer
# Environment (defaults in brackets):
#   SHAPES  grounding data with train/val splits [data/weak/shapes, generated here, seed 0]
#   TEST    data root whose test split every model is evaluated on [$SHAPES]
#   CSA     a trained CSA checkpoint to use instead of training one here (CSA never reads a box)
#   OVERSPECIFY  --overspecify-prob of the generated grounding data [0.5]: training commands that name
#           more than they need, without which pairs cannot teach size words (docs/TRAINING.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
DATA=${DATA:-data/weak}
RUNS=${RUNS:-runs/weak}
TRAIN=${TRAIN:-8000}
SHAPES=${SHAPES:-$DATA/shapes}
TEST=${TEST:-$SHAPES}

# 1. Grounding data (seed 0) and detector scenes from a disjoint seed (only their object boxes are read).
[ -f "$SHAPES/anns/spoken_shapes.json" ] ||
  $PY -m csref_training.spoken_shapes --out "$SHAPES" --train "$TRAIN" --val 300 --test 600 --workers 2 \
    --overspecify-prob "${OVERSPECIFY:-0.5}"
[ -f "$DATA/detector/anns/spoken_shapes.json" ] ||
  $PY -m csref_training.spoken_shapes --out "$DATA/detector" --seed 1000 --train 3000 --val 200 --test 0 --workers 2

# 2. The frozen parts. The class-agnostic detector (boxes of every object, no expression): 12 epochs
#    at 256 px, then one at RefCLIP's 416 px from there (small shapes need the finer 13x13 grid:
#    candidate recall 0.879 at 256, 0.984 at 416), then two more with the appearance loss, which
#    brings colour back to the stride-32 map (linear probe 0.18 -> 0.82). No EMA there: at 0.999
#    over 374 steps it would keep 69 % of the start, whose appearance head is random.
#    CSA (speech-text pairs, no box), unless given.
DETECTOR=(--config config/train/detector_spoken_shapes.yaml data.root="$DATA/detector")
$PY -m csref_training.detector "${DETECTOR[@]}" output_dir="$RUNS/detector256" epochs=12 "$@"
$PY -m csref_training.detector "${DETECTOR[@]}" output_dir="$RUNS/detector416" init_checkpoint="$RUNS/detector256/best" \
  model_overrides.image_size=416 epochs=1 optim.lr=5.0e-4 optim.warmup_epochs=0.3 "$@"
$PY -m csref_training.detector "${DETECTOR[@]}" output_dir="$RUNS/detector" init_checkpoint="$RUNS/detector416/best" \
  model_overrides.image_size=416 model_overrides.appearance_loss_weight=100 ema.enabled=false \
  epochs=2 optim.lr=5.0e-4 optim.warmup_epochs=0.2 "$@"
if [ -z "${CSA:-}" ]; then
  $PY -m csref_training.csa --config config/train/csa_spoken_shapes.yaml \
    data.root="$SHAPES" output_dir="$RUNS/csa" epochs=10 "$@"
  CSA="$RUNS/csa/best"
fi

# 3. RefCLIP without a single referent box in training (validation Acc@0.5 picks best).
REFCLIP=(--config config/train/refclip_spoken_shapes.yaml data.root="$SHAPES" output_dir="$RUNS/refclip"
         task.detector_checkpoint="$RUNS/detector/best" task.speech_checkpoint="$CSA")
$PY -m csref_training.refclip "${REFCLIP[@]}" "$@"
$PY -m csref_training.refclip evaluate --checkpoint "$RUNS/refclip/best" --split test "${REFCLIP[@]}" \
  data.root="$TEST" > "$RUNS/refclip/eval_test.json"

# 4. Pseudo-labels for train and val, then SREC on them and SREC on the true boxes, same recipe:
#    the CSA speech encoder frozen, the backbone initialised from the detector's (as SimREC starts
#    from a COCO detector's), 8 epochs.
[ -f "$DATA/pseudo/anns/spoken_shapes.json" ] ||
  $PY -m csref_training.refclip pseudo-label "${REFCLIP[@]}" --checkpoint "$RUNS/refclip/best" --out "$DATA/pseudo" \
    > "$RUNS/refclip/pseudo_labels.json"
SREC=(--config config/train/srec_spoken_shapes.yaml init_speech_encoder="$CSA" epochs=8
      model_overrides.visual_backbone.pretrained_path="$RUNS/detector/best")
$PY -m csref_training.srec "${SREC[@]}" output_dir="$RUNS/srec_pseudo" data.ann_path="$DATA/pseudo/anns/spoken_shapes.json" \
  data.image_dir="$SHAPES/images" data.audio_root="$SHAPES/audios/spoken_shapes" "$@"
$PY -m csref_training.srec "${SREC[@]}" output_dir="$RUNS/srec_full" data.root="$SHAPES" "$@"

# 5. Both SREC models on the untouched test split.
for run in srec_pseudo srec_full; do
  $PY -m csref_training.evaluate --config config/train/srec_spoken_shapes.yaml --checkpoint "$RUNS/$run/best" \
    --data-root "$TEST" --splits test \
    --json "$RUNS/$run/eval_test.json"
done
