"""Where the ONNX graphs live: built once, found again, and a broken, stale or truncated export is
rebuilt (or refused with a one-line reason), never served."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from exitserve.cli import main
from exitserve.models.backends import create_backend, onnx_store
from exitserve.models.backends.onnx_store import MANIFEST, WORK_MARK, OnnxStoreError, ensure_graphs
from exitserve.models.checkpoint import load_checkpoint, save_checkpoint
from exitserve.models.encoding import encode
from exitserve.models.inference import record_all_layers
from tests.conftest import make_exit_config, make_model


def final_logits(directory, tokenizer, sst2_texts):
    ckpt = load_checkpoint(directory)
    samples = encode(tokenizer, sst2_texts[:16], max_length=64)
    return (record_all_layers(create_backend(ckpt, "onnxruntime"), samples).logits,
            record_all_layers(create_backend(ckpt, "torch"), samples).logits)


def ensure(ckpt, quantize="none"):
    return ensure_graphs(ckpt.path, ckpt.exit_config, lambda: ckpt.model, quantize)


def built(caplog) -> bool:
    return "building the ONNX Runtime graphs" in caplog.text


def test_built_once_into_the_checkpoint_then_found(ckpt_dir, caplog):
    with caplog.at_level(logging.INFO, logger="exitserve"):
        assert ensure(load_checkpoint(ckpt_dir)) == ckpt_dir / "onnx" / "fp32"
        assert built(caplog) and "no export" in caplog.text
        caplog.clear()
        ensure(load_checkpoint(ckpt_dir))
    assert not built(caplog)
    manifest = json.loads((ckpt_dir / "onnx" / "fp32" / MANIFEST).read_text())
    assert manifest["variant"] == "fp32" and manifest["exit_config"]["num_layers"] == 4
    assert {"weights_sha256", "config_sha256", "opset", "onnxruntime", "files", "format"} <= set(manifest)


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "missing", "manifest"])
def test_a_broken_export_is_rebuilt_not_served(ckpt_dir, tokenizer, sst2_texts, caplog, damage):
    ensure(load_checkpoint(ckpt_dir))
    graphs = ckpt_dir / "onnx" / "fp32"
    layer = graphs / "layer_01.onnx"
    if damage == "truncated":
        layer.write_bytes(layer.read_bytes()[: layer.stat().st_size // 2])
    elif damage == "corrupt":
        data = bytearray(layer.read_bytes())
        data[-100:] = bytes(100)  # same size, different weights: only the hash can tell
        layer.write_bytes(bytes(data))
    elif damage == "missing":
        layer.unlink()
    else:
        (graphs / MANIFEST).write_text("{not json")
    with caplog.at_level(logging.INFO, logger="exitserve"):
        on_ort, on_torch = final_logits(ckpt_dir, tokenizer, sst2_texts)
    assert built(caplog)
    assert np.abs(on_ort - on_torch).max() < 1e-4


def test_a_stale_export_is_rebuilt_for_the_new_weights(ckpt_dir, tokenizer, sst2_texts, caplog):
    ensure(load_checkpoint(ckpt_dir))
    save_checkpoint(ckpt_dir, make_model(seed=99), tokenizer, make_exit_config(default_threshold=0.55))
    with caplog.at_level(logging.INFO, logger="exitserve"):
        on_ort, on_torch = final_logits(ckpt_dir, tokenizer, sst2_texts)
    assert "stale (weights_sha256 changed)" in caplog.text
    assert np.abs(on_ort - on_torch).max() < 1e-4


def test_an_export_from_another_onnxruntime_is_stale(ckpt_dir):
    ensure(load_checkpoint(ckpt_dir))
    path = ckpt_dir / "onnx" / "fp32" / MANIFEST
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "onnxruntime": "0.0.1"}))
    ckpt = load_checkpoint(ckpt_dir)
    source = onnx_store.Source.of(ckpt.path, ckpt.exit_config)
    assert onnx_store.problem(path.parent, source, "fp32") == "stale (onnxruntime changed)"


def test_a_read_only_checkpoint_uses_the_cache_and_nowhere_writable_is_refused(ckpt_dir, tmp_path, monkeypatch):
    ckpt = load_checkpoint(ckpt_dir)
    monkeypatch.setattr(onnx_store, "_writable", lambda d: not d.is_relative_to(ckpt_dir))  # tests run as root
    directory = ensure(ckpt)
    assert directory.is_relative_to(tmp_path / "cache") and (directory / MANIFEST).is_file()
    assert not (ckpt_dir / "onnx").exists()
    (directory / "exit_00.onnx").write_bytes(b"broken")
    monkeypatch.setattr(onnx_store, "_writable", lambda d: False)
    with pytest.raises(OnnxStoreError, match=r"no valid ONNX export and neither .* is writable") as err:
        ensure(ckpt)
    assert "\n" not in str(err.value)


def test_export_onnx_command(ckpt_dir, capsys):
    assert main(["export-onnx", str(ckpt_dir)]) == 0
    assert f"wrote {ckpt_dir / 'onnx' / 'fp32'}" in capsys.readouterr().out
    assert main(["export-onnx", str(ckpt_dir)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["export-onnx", str(ckpt_dir), "--quantize", "int8"]) == 0
    assert (ckpt_dir / "onnx" / "int8" / MANIFEST).is_file()
    capsys.readouterr()
    assert main(["export-onnx", str(ckpt_dir / "nope")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_work_directories_of_an_interrupted_export_are_removed_at_the_next_start(ckpt_dir):
    # a real export killed half-way leaves its work directory behind
    code = f"from exitserve.cli import main; main(['export-onnx', {str(ckpt_dir)!r}])"
    proc = subprocess.Popen([sys.executable, "-c", code])
    parent, end = ckpt_dir / "onnx", time.monotonic() + 120
    while not (parent.is_dir() and any(WORK_MARK in p.name for p in parent.iterdir())):
        assert proc.poll() is None and time.monotonic() < end, "the export finished before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed,) = [p for p in parent.iterdir() if WORK_MARK in p.name]
    # and work directories of other hosts sharing the checkpoint: an hour-old one is dead, a new one may be alive
    stale, fresh = parent / f".fp32{WORK_MARK}elsewhere-1-aaaa", parent / f".fp32{WORK_MARK}elsewhere-2-bbbb"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    mine = parent / f".fp32{WORK_MARK}{socket.gethostname()}-{os.getpid()}-cccc"  # a live process's: kept
    mine.mkdir()
    ensure(load_checkpoint(ckpt_dir))
    assert not killed.exists() and not stale.exists()
    assert fresh.exists() and mine.exists()
