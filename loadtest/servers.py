"""Start and stop the servers a benchmark compares, as separate processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


class ServerURL(str):
    """A running server's base URL (a str: f"{url}/predict" works) that also knows its process id."""

    pid: int

    def __new__(cls, url: str, pid: int) -> ServerURL:
        out = super().__new__(cls, url)
        out.pid = pid
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exitserve_command(checkpoint: str | Path | list[str | Path] | None, port: int, *settings: str,
                      names: list[str] | None = None) -> list[str]:
    """`exitserve serve` on 127.0.0.1:port; checkpoint None serves the embedded default model, a list
    several models (called `names`, else by their directories)."""
    ckpts = [str(c) for c in (checkpoint if isinstance(checkpoint, list) else [checkpoint] if checkpoint else [])]
    named = [arg for name in names or () for arg in ("--name", name)]
    sets = [arg for item in settings for arg in ("--set", item)]
    return [sys.executable, "-m", "exitserve", "serve", *ckpts, *named, "--host", "127.0.0.1", "--port", str(port),
            *sets]


def peer_command(model_dir: str | Path, port: int) -> tuple[list[str], dict]:
    """The transformers-pipeline peer (loadtest/peer_pipeline.py) serving an exported HF classifier."""
    cmd = [sys.executable, "-m", "uvicorn", "exitserve.loadtest.peer_pipeline:app", "--port", str(port),
           "--host", "127.0.0.1", "--log-level", "warning"]
    return cmd, {"PEER_MODEL": str(model_dir)}


def ort_peer_command(model_dir: str | Path, port: int, threads: int | None = None) -> tuple[list[str], dict]:
    """The ONNX Runtime whole-model peer (loadtest/peer_ort.py; `peer_ort.build(model_dir)` first)."""
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "exitserve.loadtest.peer_ort:create_app", "--port",
           str(port), "--host", "127.0.0.1", "--log-level", "warning"]
    return cmd, {"PEER_MODEL": str(model_dir), **({"PEER_THREADS": str(threads)} if threads else {})}


INFINITY_ENGINES = ("optimum", "torch")


def infinity_command(
    infinity_bin: str | Path, model_dir: str | Path, port: int, engine: str = "optimum"
) -> tuple[list[str], dict, Path]:
    """infinity-emb (its own virtualenv: its pins differ from ours) serving an exported HF classifier:
    (command, environment, working directory).

    `optimum`: `model_dir` holds the exported classifier and ONE raw `model.onnx`; infinity optimises it
    with optimum's ORTOptimizer (level 99) into HF_HOME (set to a folder inside `model_dir`). Run from
    inside `model_dir` as `--model-id .`, because infinity 0.0.78 passes optimum the ONNX file's full
    path, which optimum 1.24 only matches against paths relative to the model id; its warm-up is off,
    because it sends 514 untruncated tokens through optimum's pipeline and the model takes 512.
    `torch`: the same classifier on eager PyTorch."""
    model_dir = Path(model_dir)
    common = ["--served-model-name", "exported", "--port", str(port), "--device", "cpu"]
    env = {"HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    if engine == "optimum":
        cmd = [str(infinity_bin), "v2", "--model-id", ".", *common, "--engine", "optimum", "--no-model-warmup"]
        return cmd, {**env, "HF_HOME": str(model_dir / "hf_home")}, model_dir
    if engine == "torch":
        cmd = [str(infinity_bin), "v2", "--model-id", str(model_dir), *common, "--engine", "torch",
               "--no-bettertransformer"]
        return cmd, env, model_dir
    raise ValueError(f"unknown infinity engine {engine!r}; choose one of {', '.join(INFINITY_ENGINES)}")


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300, ready_path: str = "/ready") -> None:
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
    cwd: str | Path | None = None, ready_timeout: float = 300,
):
    """Run a server process until the block ends; yields its base URL (a `ServerURL`) once `ready_path`
    answers 200 (else TimeoutError after `ready_timeout` seconds)."""
    full_env = {**os.environ, **(env or {})}
    if threads:
        full_env["OMP_NUM_THREADS"] = str(threads)
    # stderr goes to a file, not a pipe: a chatty server would block on a full pipe nobody reads
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=log, text=True, cwd=cwd)
        base = ServerURL(f"http://127.0.0.1:{port}", proc.pid)
        try:
            try:
                wait_ready(base, proc, ready_timeout, ready_path)
            except (RuntimeError, TimeoutError) as exc:
                log.seek(0)
                raise type(exc)(f"{exc}; its stderr ends with:\n{log.read()[-3000:]}") from exc
            yield base
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
