#!/usr/bin/env bash
# Rebuild the embedded default model (server/default_model) from the GLUE SST-2 data:
# minilm-l6, the default strategy (two-stage: chosen from experiment 1, docs/RESULTS.md), full train
# split, fp16 weights, calibrated at 0.99 on dev. Training (two stages of 2 epochs) takes about an hour
# on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${GLUE_DIR:-../shared/data/glue}/SST-2
OUT=${1:-server/default_model}
.venv/bin/exitserve train --backbone minilm-l6 --data "$DATA" --strategy two-stage --epochs 2 \
  --fp16-weights --output "$OUT"
.venv/bin/exitserve calibrate "$OUT" --data "$DATA" --min-relative-score 0.99
rm -rf "$OUT/trainer"
