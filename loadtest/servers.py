"""Start and stop the servers a benchmark compares, as separate processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exitserve_command(checkpoint: str | Path | None, port: int, *settings: str) -> list[str]:
    """`exitserve serve` on 127.0.0.1:port; checkpoint None serves the embedded default model."""
    ckpt = [str(checkpoint)] if checkpoint else []
    sets = [arg for item in settings for arg in ("--set", item)]
    return [sys.executable, "-m", "exitserve", "serve", *ckpt, "--host", "127.0.0.1", "--port", str(port), *sets]


def peer_command(model_dir: str | Path, port: int) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "uvicorn", "exitserve.loadtest.peer_pipeline:app", "--port", str(port),
           "--host", "127.0.0.1", "--log-level", "warning"]
    return cmd, {"PEER_MODEL": str(model_dir)}


def infinity_command(infinity_bin: str | Path, model_dir: str | Path, port: int) -> list[str]:
    """infinity-emb (its own virtualenv: its pins differ from ours) serving an exported HF classifier."""
    return [str(infinity_bin), "v2", "--model-id", str(model_dir), "--served-model-name", "exported",
            "--port", str(port), "--engine", "torch", "--device", "cpu", "--no-bettertransformer"]


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120, ready_path: str = "/ready") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{base}{ready_path}", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base} never became ready")


@contextmanager
def running(
    cmd: list[str], port: int, env: dict | None = None, threads: int | None = None, ready_path: str = "/ready",
    ready_timeout: float = 120,
):
    """Run a server process until the block ends; yields its base URL once /ready answers 200 (else
    TimeoutError after `ready_timeout` seconds)."""
    full_env = {**os.environ, **(env or {})}
    if threads:
        full_env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, ready_timeout, ready_path)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
