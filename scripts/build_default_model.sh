#!/usr/bin/env bash
# Rebuild the embedded default model (server/default_model) from the GLUE SST-2 data (docs/MODELS.md):
#  1. hold 2,000 whole training sentences (and their sub-phrases) out of training: with dev they form a
#     2,872-sentence pool the model never saw (experiments/holdout_pool.py);
#  2. fine-tune minilm-l6 with exits on the rest, weighted strategy (level with two-stage in experiment 1
#     at half its training time), 2 epochs, fp16 weights (about 40 minutes on 2 CPU cores);
#  3. fit the learned exit rule on a seeded 25 % of the pool, without its labels (exitserve fit-exit-rule);
#  4. risk-control the rule's threshold on a seeded 80 % of the rest of the pool (quality risk: at most
#     1 point of accuracy lost vs the final layer, with 90 % confidence), reported on the other 20 %.
# SKIP_TRAIN=1 keeps the weights in $OUT and redoes steps 3-4 only (the rule and its threshold).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${GLUE_DIR:-../shared/data/glue}/SST-2
OUT=${1:-server/default_model}
WORK=${WORK:-runs/default-model}
.venv/bin/python -m exitserve.experiments.holdout_pool --data "$DATA" --sentences 2000 --seed 0 --out "$WORK/SST-2"
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
  .venv/bin/exitserve train --backbone minilm-l6 --data "$WORK/SST-2" --strategy weighted --epochs 2 \
    --fp16-weights --output "$OUT"
fi
.venv/bin/exitserve fit-exit-rule "$OUT" --data "$WORK/SST-2" --split pool --fit-fraction 0.25 --seed 0
.venv/bin/exitserve calibrate "$OUT" --data "$WORK/SST-2" --split pool --calibration-fraction 0.8 --seed 0 \
  --method risk --risk quality --max-drop 0.01 --confidence 0.9 --criterion learned
rm -rf "$OUT/trainer"
