"""Ray Serve. End to end, `exitserve serve --ray` inside a network namespace of its own (Ray binds
some ports on every interface, which must not happen in the root namespace): a local Ray instance
(127.0.0.1, 2 CPUs, no dashboard, no usage stats), two replicas, concurrent predictions equal to the
plain server's, the same errors, backpressure 429 in exitserve's format, per-replica metrics, no
process left behind and nothing of it listening in the root namespace. Without Ray running:
deploy/ray-serve.yaml builds, Ray's own errors are reformatted, and a request whose replica died
is sent again."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
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

from exitserve.loadtest import netns
from exitserve.loadtest.cluster import MARKER, RootWatch
from exitserve.server.app import create_app
from exitserve.server.settings import Settings

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install '.[ray]')")
from ray.serve import Application

from exitserve.server.error_format import KINDS
from exitserve.server.ray_proxy import (
    RETRIES_HEADER,
    RETRY_ATTEMPTS,
    RETRY_BODY_LIMIT,
    RayErrorFormat,
    RetryLostReplica,
)
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


@pytest.mark.skipif(netns.available() is not None, reason=netns.available() or "")
def test_two_ray_replicas_answer_like_the_plain_server_and_leave_no_process(tiny_checkpoint):
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, warmup=False))) as plain:
        expected = [plain.post("/predict", json=request_body(i)).json() for i in range(16)]
        expected_errors = [plain.post("/predict", json=body) for body in BAD_BODIES]

    port, metrics_port = 8000, 9100  # a fresh namespace: every port is free
    base = f"http://127.0.0.1:{port}"
    ray_tmp = tempfile.mkdtemp(prefix="exitserve-ray-", dir="/tmp")  # short: Ray's socket paths are long
    log_path = Path(ray_tmp) / "serve.log"
    network = netns.Network(["ray"])
    command = [
        sys.executable, "-m", "exitserve.cli", "serve", str(tiny_checkpoint), "--ray", "--port", str(port),
        "--replicas", "2", "--num-cpus-per-replica", "1", "--max-ongoing-requests", "2",
        "--max-queued-requests", "4", "--metrics-port", str(metrics_port),
    ]
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", MARKER: network.tag}
    with network as hosts, RootWatch(network.tag) as root, log_path.open("w") as log:
        namespace = hosts["ray"].namespace
        proc = subprocess.Popen(netns.command(namespace, command), stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            with netns.entered(namespace):  # this thread's sockets (and its pools' threads') are in there too
                wait_serving(base, proc, log_path)
                check_the_application(base, proc, expected, expected_errors, metrics_port)
            ray_processes = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0, log_path.read_text()[-4000:]
            _, alive = psutil.wait_procs(ray_processes, timeout=20)
            assert not alive, [(p.pid, p.name()) for p in alive]
        finally:  # after a failure: stop it the normal way first; leaving the network kills what is left
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    assert root.samples >= 5 and root.seen == []  # nothing of it ever listened in the root namespace


def check_the_application(base: str, proc: subprocess.Popen, expected: list[dict], expected_errors: list,
                          metrics_port: int) -> None:
    """Answers, errors, backpressure and metrics of the two replicas (called from inside the namespace)."""
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


def test_config_file_args_build_the_application_and_bad_ones_are_refused():
    args = yaml.safe_load((Path(__file__).parents[2] / "deploy" / "ray-serve.yaml").read_text())
    args = args["applications"][0]["args"]
    assert isinstance(app_builder(args), Application)
    deployment = ExitServeReplica.options(**AppArgs.model_validate(args).ray.deployment_options())
    assert (deployment.num_replicas, deployment.max_ongoing_requests, deployment.max_queued_requests) == (2, 16, 64)
    assert deployment.ray_actor_options == {"num_cpus": 1, "num_gpus": 0}
    scaled = ExitServeReplica.options(**AppArgs.model_validate({"ray": {
        "num_replicas": 1, "max_replicas": 3, "max_replicas_per_node": 1, "max_surge_percent": 50,
        "upscale_delay_s": 5, "downscale_delay_s": 20, "look_back_period_s": 15}}).ray.deployment_options())
    config = scaled._deployment_config
    assert (config.max_surge_percent, scaled._replica_config.max_replicas_per_node) == (50, 1)
    autoscaling = config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.upscale_delay_s,
            autoscaling.downscale_delay_s, autoscaling.look_back_period_s) == (1, 3, 5, 20, 15)
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


def replica_that_dies(times: int):
    """A stand-in for Ray's proxy: its first `times` requests end with no response at all (what Ray's
    proxy does when the replica dies holding the request); then it echoes the body it received."""
    bodies: list[bytes] = []

    async def app(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        bodies.append(body)
        if len(bodies) <= times:
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})

    return app, bodies


def test_a_request_whose_replica_died_is_sent_again_with_its_body():
    app, bodies = replica_that_dies(times=1)
    r = TestClient(RetryLostReplica(app)).post("/predict", content=b'{"text": "fine"}')
    assert (r.status_code, r.content, r.headers[RETRIES_HEADER]) == (200, b'{"text": "fine"}', "1")
    assert bodies == [b'{"text": "fine"}'] * 2

    app, bodies = replica_that_dies(times=0)
    r = TestClient(RetryLostReplica(app)).post("/predict", content=b"once")
    assert r.status_code == 200 and RETRIES_HEADER not in r.headers and bodies == [b"once"]


def test_retries_are_bounded_and_large_bodies_and_started_answers_are_never_retried():
    app, bodies = replica_that_dies(times=RETRY_ATTEMPTS)
    r = TestClient(RetryLostReplica(app)).post("/predict", content=b"x")
    assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable" and r.headers["retry-after"] == "1"
    assert len(bodies) == RETRY_ATTEMPTS

    app, bodies = replica_that_dies(times=1)
    large = b"y" * (RETRY_BODY_LIMIT + 10)  # not kept, so sent once: the server's own 500 for a lost replica
    with pytest.raises(AssertionError, match="did not receive any response"):
        TestClient(RetryLostReplica(app)).post("/predict", content=large)
    assert bodies == [large]

    calls = []

    async def answers_500(scope, receive, send):
        calls.append(1)
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"app error"})

    r = TestClient(RetryLostReplica(answers_500)).post("/predict", content=b"z")
    assert (r.status_code, len(calls)) == (500, 1)


def test_a_request_whose_client_left_is_not_sent_again():
    calls = []

    async def proxy_sees_the_client_leave(scope, receive, send):  # Ray's proxy cancels such a request
        calls.append(await receive())
        assert (await receive())["type"] == "http.disconnect"

    messages = [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0) if len(messages) > 1 else messages[0]

    async def send(message):
        raise AssertionError(f"nothing is sent to a client that left: {message}")

    asyncio.run(RetryLostReplica(proxy_sees_the_client_leave)({"type": "http", "method": "POST", "path": "/predict"},
                                                              receive, send))
    assert calls == [{"type": "http.request", "body": b"{}", "more_body": False}]
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
