"""Ray Serve. End to end, `exitserve serve --ray`: a local Ray instance (127.0.0.1, 2 CPUs, no
dashboard, no usage stats), two replicas, concurrent predictions equal to the plain server's, the
same errors, backpressure 429 in exitserve's format, per-replica metrics, no process left behind.
Without Ray running: deploy/ray-serve.yaml builds, and Ray's own errors are reformatted."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from fastapi.testclient import TestClient

from exitserve.loadtest.servers import free_port
from exitserve.server.app import create_app
from exitserve.server.settings import Settings

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install '.[ray]')")
from ray.serve import Application

from exitserve.server.error_format import KINDS
from exitserve.server.ray_proxy import RayErrorFormat
from exitserve.server.ray_serve import AppArgs, ExitServeReplica, app_builder

TEXTS = ["a gorgeous, witty, seductive movie.", "the acting is wooden and the plot is a mess", "fine",
         "an utter delight"]
THRESHOLDS = [None, 0.0, 0.9, 1.0]
BAD_BODIES = [{"text": ""}, {"text": "ok", "threshold": 2}, {"txt": "typo"}, {"text": ["a"] * 65}]
BURST = 24
LONG_TEXT = " ".join(["an uneven but often gripping and very long-winded drama"] * 12)


def request_body(i: int) -> dict:
    return {"text": TEXTS[i % len(TEXTS)], "threshold": THRESHOLDS[i // len(TEXTS) % len(THRESHOLDS)],
            "return_trace": True}


def close(got, want) -> bool:
    """Equal, floats up to rounding (rows are batched differently by the two servers)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(close(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(close, got, want))
    if isinstance(want, float):
        return got == pytest.approx(want, rel=1e-5, abs=1e-6)
    return got == want


def free_port_pair() -> int:
    """A free port whose successor is free too (the two replicas' metrics ports)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def wait_serving(base: str, proc: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, log_path.read_text()[-4000:]
        if "serving on http" in log_path.read_text():
            assert httpx.get(f"{base}/ready", timeout=5).status_code == 200
            return
        time.sleep(0.5)
    raise AssertionError("the Ray application never became ready:\n" + log_path.read_text()[-4000:])


def predict_total(metrics_text: str) -> float:
    match = re.search(r'exitserve_requests_total\{route="/predict",status="200"\} (\S+)', metrics_text)
    return float(match.group(1)) if match else 0.0


def test_two_ray_replicas_answer_like_the_plain_server_and_leave_no_process(tiny_checkpoint):
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, warmup=False))) as plain:
        expected = [plain.post("/predict", json=request_body(i)).json() for i in range(16)]
        expected_errors = [plain.post("/predict", json=body) for body in BAD_BODIES]

    port, metrics_port = free_port(), free_port_pair()
    base = f"http://127.0.0.1:{port}"
    ray_tmp = tempfile.mkdtemp(prefix="exitserve-ray-", dir="/tmp")  # short: Ray's socket paths are long
    log_path = Path(ray_tmp) / "serve.log"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [
        sys.executable, "-m", "exitserve.cli", "serve", str(tiny_checkpoint), "--ray", "--port", str(port),
        "--replicas", "2", "--num-cpus-per-replica", "1", "--max-ongoing-requests", "2",
        "--max-queued-requests", "4", "--metrics-port", str(metrics_port),
    ]
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    ray_processes: list[psutil.Process] = []
    try:
        wait_serving(base, proc, log_path)
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        assert any(p.name() == "raylet" for p in ray_processes)

        with httpx.Client(timeout=30) as client:
            # 4 concurrent clients (within the queue limit): both replicas answer, as the plain server does
            with ThreadPoolExecutor(4) as pool:
                responses = list(pool.map(lambda i: client.post(f"{base}/predict", json=request_body(i)), range(48)))
            assert [r.status_code for r in responses] == [200] * 48
            assert len({r.headers["x-exitserve-replica"] for r in responses}) == 2
            for i, r in enumerate(responses):
                assert close(r.json(), expected[i % 16]), (i, r.json(), expected[i % 16])

            # bad input: the same status and body as the plain server
            for body, want in zip(BAD_BODIES, expected_errors, strict=True):
                r = client.post(f"{base}/predict", json=body)
                assert (r.status_code, r.json()) == (want.status_code, want.json())

            # backpressure: 2 replicas x 2 ongoing + 4 queued at the proxy; the rest is refused at once
            heavy = json.dumps({"text": [LONG_TEXT] * 64, "threshold": 1.0}).encode()  # encoded once: a tight burst
            barrier = threading.Barrier(BURST)

            def send_heavy(_: int) -> httpx.Response:
                barrier.wait(10)
                return client.post(f"{base}/predict", content=heavy, headers={"content-type": "application/json"})

            with ThreadPoolExecutor(BURST) as pool:
                burst = list(pool.map(send_heavy, range(BURST)))
            refused = [r for r in burst if r.status_code == 429]
            assert {r.status_code for r in burst} == {200, 429} and len(refused) >= BURST // 4, [
                r.status_code for r in burst]
            for r in refused:
                assert r.json()["error"]["type"] == "overloaded" and r.headers["retry-after"] == "1"
                assert r.elapsed.total_seconds() < 5  # refused at once, not after waiting in a queue
            assert any("backpressure" in r.json()["error"]["message"] for r in refused)  # Ray's proxy refused it

            # each replica keeps its own metrics; together they counted every answered prediction
            per_replica = [predict_total(client.get(f"http://127.0.0.1:{metrics_port + k}/metrics").text)
                           for k in range(2)]
            answered = 48 + sum(r.status_code == 200 for r in burst)
            assert all(n > 0 for n in per_replica) and sum(per_replica) == answered, (per_replica, answered)
            assert "exitserve_predictions_total" in client.get(f"{base}/metrics").text

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-4000:]
        _, alive = psutil.wait_procs(ray_processes, timeout=20)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:  # after a failure: stop it the normal way first, then kill whatever Ray left
        if proc.poll() is None:
            ray_processes = ray_processes or psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for p in ray_processes:
            if p.is_running():
                p.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_config_file_args_build_the_application_and_bad_ones_are_refused():
    args = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "ray-serve.yaml").read_text())
    args = args["applications"][0]["args"]
    assert isinstance(app_builder(args), Application)
    deployment = ExitServeReplica.options(**AppArgs.model_validate(args).ray.deployment_options())
    assert (deployment.num_replicas, deployment.max_ongoing_requests, deployment.max_queued_requests) == (2, 16, 64)
    assert deployment.ray_actor_options == {"num_cpus": 1, "num_gpus": 0}
    for bad in ({"ray": {"replicas": 2}}, {"ray": {"num_replicas": 3, "max_replicas": 2}}, {"settings": {"port": "x"}}):
        with pytest.raises(ValueError):
            app_builder(bad)


def test_ray_plain_text_errors_become_exitserve_errors_and_json_ones_pass():
    async def ray_like(scope, receive, send):
        text = scope["path"] == "/ray"
        await send({"type": "http.response.start", "status": 429 if text else 503, "headers": [
            (b"content-type", b"text/plain; charset=utf-8" if text else b"application/json"), (b"retry-after", b"1")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure" if text
                    else b'{"error":{"type":"deadline_exceeded","message":"m"}}'})

    client = TestClient(RayErrorFormat(ray_like))
    r = client.get("/ray")
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json() == {"error": {"type": "overloaded", "message": "Request dropped due to backpressure"}}
    r = client.get("/app")
    assert r.status_code == 503 and r.json()["error"]["type"] == "deadline_exceeded"


@pytest.mark.parametrize(("ray_status", "kind"), [(408, "deadline_exceeded"), (429, "overloaded"), (503, "not_ready")])
def test_ray_s_own_errors_are_answered_from_the_one_error_table(ray_status, kind):
    async def ray_like(scope, receive, send):
        await send({"type": "http.response.start", "status": ray_status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b"said by Ray"})

    r = TestClient(RayErrorFormat(ray_like)).get("/predict")
    expected = KINDS[kind]  # the same status, type and Retry-After the plain server answers with this meaning
    assert (r.status_code, r.json()["error"]["type"]) == (expected.status, expected.type)
    assert r.headers.get("retry-after") == (str(expected.retry_after) if expected.retry_after else None)
