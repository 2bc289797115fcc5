#!/usr/bin/env bash
# Set up (with dev tools) and run the lint and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
