"""Where exitserve caches what it builds or assembles (ONNX graphs, the mpnet-base backbone)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$EXITSERVE_CACHE`, else ~/.cache/exitserve."""
    return Path(os.environ.get("EXITSERVE_CACHE", Path.home() / ".cache" / "exitserve"))
