from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def ckpt_dir(tiny_checkpoint, tmp_path, monkeypatch):
    """A writable copy of the tiny checkpoint without its ONNX graphs, and a cache of its own."""
    monkeypatch.setenv("EXITSERVE_CACHE", str(tmp_path / "cache"))
    directory = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, directory, ignore=shutil.ignore_patterns("onnx"))
    return directory
