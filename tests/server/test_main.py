"""A real `exitserve serve` process: start, predict, metrics, SIGTERM under load, bad checkpoints."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from exitserve.loadtest.servers import exitserve_command, free_port, wait_ready
from exitserve.server.app import create_app
from exitserve.server.main import DrainingServer, run
from exitserve.server.service import PredictionService
from exitserve.server.settings import Settings


def serve(checkpoint, port: int, *extra: str) -> subprocess.Popen:
    cmd = exitserve_command(checkpoint, port)
    return subprocess.Popen([*cmd, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_real_process_serves_and_drains_on_sigterm_without_losing_requests(tiny_checkpoint):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = serve(tiny_checkpoint, port, "--set", "drain_timeout=20")
    try:
        wait_ready(base, proc)
        r = httpx.post(f"{base}/predict", json={"text": "a fine film"}, timeout=10)
        assert r.status_code == 200 and r.json()["exit_layer"] >= 1
        assert "exitserve_predictions_total" in httpx.get(f"{base}/metrics").text

        outcomes: list[tuple[float, str]] = []  # (send time, outcome)
        lock = threading.Lock()
        stop = threading.Event()

        def load():
            with httpx.Client(timeout=30, headers={"connection": "close"}) as c:
                for _ in range(400):  # bounded
                    if stop.is_set():
                        return
                    sent = time.monotonic()
                    try:
                        resp = c.post(f"{base}/predict", json={"text": ["good", "bad", "fine"], "threshold": 1.0})
                        result = str(resp.status_code)
                    except httpx.TransportError as exc:
                        result = f"failed:{type(exc).__name__}"
                        stop.set()
                    with lock:
                        outcomes.append((sent, result))

        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        rc = proc.wait(timeout=30)
        stop.set()
        for t in threads:
            t.join(30)
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown
        assert rc in (0, -signal.SIGTERM)
        log = proc.communicate()[1]
        assert "Finished server process" in log and "Traceback" not in log
        # every request sent before the signal was answered; later ones may be refused or reset
        before = [o for sent, o in outcomes if sent < sigterm_at - 0.05]
        assert len(before) > 10
        assert all(o == "200" for o in before), sorted(set(before))
        assert all(o == "200" or o.startswith("failed:") for _, o in outcomes)
        assert time.monotonic() - started < 25
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_draining_turns_ready_to_503(tiny_checkpoint):
    app = create_app(Settings(checkpoint=tiny_checkpoint, warmup=False))
    with TestClient(app) as client:
        assert client.get("/ready").status_code == 200
        server = DrainingServer(uvicorn.Config(app), app.state)
        server.handle_exit(signal.SIGTERM, None)
        assert server.should_exit
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["type"] == "draining"


def test_drain_delay_keeps_serving_while_ready_says_503_then_stops(tiny_checkpoint):
    app = create_app(Settings(checkpoint=tiny_checkpoint, warmup=False))
    with TestClient(app) as client:
        server = DrainingServer(uvicorn.Config(app), app.state, drain_delay=2.0)
        server.handle_exit(signal.SIGTERM, None)
        assert client.get("/ready").status_code == 503
        assert not server.should_exit  # still accepting: the load balancer has time to notice
        assert client.post("/predict", json={"text": "still served"}).status_code == 200
        deadline = time.monotonic() + 10
        while not server.should_exit and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.should_exit


@pytest.mark.parametrize("access_log", [True, False])
def test_settings_reach_uvicorn(tiny_checkpoint, monkeypatch, access_log):
    seen = []
    monkeypatch.setattr(DrainingServer, "run", lambda self, sockets=None: seen.append(self))
    settings = Settings(checkpoint=tiny_checkpoint, warmup=False, access_log=access_log, drain_delay=3, port=8123)
    assert run(settings) == 1  # never started: run() was replaced
    (server,) = seen
    assert (server.config.access_log, server.config.port, server.drain_delay) == (access_log, 8123, 3)


def test_a_second_signal_skips_the_drain_delay(tiny_checkpoint):
    app = create_app(Settings(checkpoint=tiny_checkpoint, warmup=False))
    server = DrainingServer(uvicorn.Config(app), app.state, drain_delay=60)
    server.handle_exit(signal.SIGTERM, None)
    assert app.state.draining and not server.should_exit
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit
    server.delayed.join(2)
    assert not server.delayed.is_alive()  # the timer was cancelled, not left to fire again


@pytest.mark.parametrize("damage", ["missing", "truncated", "schema", "num_layers", "max_length"])
def test_broken_checkpoint_stops_start_up_with_a_one_line_reason(tiny_checkpoint, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    if damage == "missing":
        (broken / "model.safetensors").unlink()
    elif damage == "truncated":
        data = (broken / "model.safetensors").read_bytes()
        (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "schema":
        text = (broken / "exit_config.json").read_text().replace('"schema_version": 1', '"schema_version": 7')
        (broken / "exit_config.json").write_text(text)
    else:  # a wrong JSON type (was a 30-line traceback), a max_length over the positions (a traceback at warm-up)
        raw = json.loads((broken / "exit_config.json").read_text())
        raw.update({"num_layers": "4"} if damage == "num_layers" else {"max_length": 1000})
        (broken / "exit_config.json").write_text(json.dumps(raw))
    proc = serve(broken, free_port())
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("exitserve serve")]
    assert len(lines) == 1 and "cannot start" in lines[0]
    assert "Traceback" not in err


def test_a_busy_port_fails_at_once_before_the_model_loads(tiny_checkpoint, monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(PredictionService, "load", classmethod(lambda cls, settings: loaded.append(settings)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run(Settings(checkpoint=tiny_checkpoint, port=port)) == 2
    assert not loaded  # used to load (and warm up) the model first, then fail in uvicorn
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"exitserve serve: cannot start: cannot listen on 127.0.0.1:{port}: Address already in use"]

