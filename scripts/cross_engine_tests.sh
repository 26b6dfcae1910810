#!/usr/bin/env bash
# The cross-engine test sets and matrix of docs/TRAINING.md ("Cross-engine matrix"): test sets of
# voices and engines the demo recipe never trains on (generator seed 77, 200 scenes each; the
# independent generator's 300), clean and with babble, then Acc@0.5 of each run on each set.
#   scripts/cross_engine_tests.sh LABEL=CHECKPOINT_DIR [LABEL=CHECKPOINT_DIR ...]
#   scripts/cross_engine_tests.sh "demo=models/spoken_shapes_tiny"
# A bare CHECKPOINT_DIR is labelled with itself. Sets go to $TESTS (default data/engines), the
# matrix to $TESTS/matrix.{md,json}. Existing sets are reused. The own-test column is
# $OWN_TEST (default data/spoken_shapes, the training data's test split).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TESTS=${TESTS:-data/engines}
OWN_TEST=${OWN_TEST:-data/spoken_shapes}
export HF_HUB_OFFLINE=1
[ $# -gt 0 ] || { echo "usage: $0 LABEL=CHECKPOINT_DIR [...]" >&2; exit 2; }

generate() {  # generate OUT ARGS...: 200 test scenes of seed 77
  local out=$1; shift
  [ -f "$out/anns/spoken_shapes.json" ] ||
    $PY -m csref_training.spoken_shapes --out "$out" --train 0 --val 0 --test 200 --seed 77 --workers 2 "$@"
}
with_babble() {  # with_babble CLEAN: its copy with babble of other voices at 5-20 dB
  [ -d "$1_babble" ] || $PY -m csref_training.corrupt --data-root "$1" --out "$1_babble" --noise babble \
    --snr-db-range 5,20 --seed 0
}
generate "$TESTS/espeak_heldout_clean" --voice-set heldout --no-noise
generate "$TESTS/festival_heldout" --voice-set festival-heldout --no-noise
generate "$TESTS/flite" --voice-set flite-train,flite-heldout --no-noise
for clean in espeak_heldout_clean festival_heldout flite; do with_babble "$TESTS/$clean"; done
[ -f "$TESTS/independent/anns/spoken_shapes.json" ] || $PY scripts/independent_shapes.py --out "$TESTS/independent" --count 300

runs=()
for run in "$@"; do
  case $run in *=*) runs+=(--run "$run") ;; *) runs+=(--run "$run=$run") ;; esac
done
$PY scripts/cross_engine_matrix.py "${runs[@]}" --split test \
  --test "own test split (espeak-ng training voices)=$OWN_TEST" \
  --test "espeak-ng held-out voices=$TESTS/espeak_heldout_clean" \
  --test "espeak-ng held-out voices, babble 5-20 dB=$TESTS/espeak_heldout_clean_babble" \
  --test "festival:slt_hts (unheard voice)=$TESTS/festival_heldout" \
  --test "festival:slt_hts, babble 5-20 dB=$TESTS/festival_heldout_babble" \
  --test "flite, all 5 voices (unheard engine)=$TESTS/flite" \
  --test "flite, babble 5-20 dB=$TESTS/flite_babble" \
  --test "independent generator (unheard variants, babble + pink 5-20 dB)=$TESTS/independent" \
  --json "$TESTS/matrix.json" --markdown "$TESTS/matrix.md"
