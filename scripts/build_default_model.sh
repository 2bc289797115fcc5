#!/usr/bin/env bash
# Rebuild the embedded default model (server/default_model) from the GLUE SST-2 data:
# minilm-l6, alternating strategy, full train split, fp16 weights; threshold risk-controlled on half of dev
# (quality risk: at most 1 point of accuracy lost vs the final layer, with 90 % confidence), reported on the other half.
# Takes about 40 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${GLUE_DIR:-../shared/data/glue}/SST-2
OUT=${1:-server/default_model}
.venv/bin/exitserve train --backbone minilm-l6 --data "$DATA" --strategy alternating --epochs 2 \
  --fp16-weights --output "$OUT"
.venv/bin/exitserve calibrate "$OUT" --data "$DATA" --method risk --risk quality --max-drop 0.01 --confidence 0.9
rm -rf "$OUT/trainer"
