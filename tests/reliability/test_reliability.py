"""Reliability on a real uvicorn server (in a thread, on 127.0.0.1): clients that go away, hostile
input, overload and deadlines, bad checkpoints at start-up, and the security promises."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pickle
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from exitserve.loadtest.reliability.tamper import TOKENIZER_DAMAGE
from exitserve.models.exit_config import CheckpointError
from exitserve.server import guard as guard_module
from exitserve.server.app import create_app
from exitserve.server.main import DrainingServer, run
from exitserve.server.service import PredictionService
from exitserve.server.settings import Settings
from tests.conftest import TINY_LAYERS

TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is a mess", "fine", "an utter delight"]


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < end and thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class Instrumented:
    """A loaded service whose runtime backend logs how many rows enter layer 1 (`rows`), every layer step
    (`steps`: layer index, rows, padded width) and the inputs in flight at each step (`in_flight`),
    sleeps `delay` per layer and can be held before any layer (the `gate`), so queueing is
    observable."""

    def __init__(self, checkpoint: Path, delay: float = 0.0, policy: str = "fcfs", **settings):
        self.service = PredictionService.load(Settings(checkpoint=checkpoint, warmup=False, policy=policy, **settings))
        self.app = create_app(self.service.settings, self.service)
        self.rows: list[int] = []  # rows of each step that starts inputs (a run step, or a layer-1 step)
        self.steps: list[tuple[int, int, int]] = []  # layer steps: (layer, rows, width)
        self.in_flight: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        backend = self.service.scheduler.backend  # whichever runtime serves: instrument the seam
        embed, layer, run = backend.embed, backend.layer, backend.run

        def logged_embed(samples):
            self.rows.append(len(samples))
            return embed(samples)

        def slow_layer(index, hidden, attention, need_exit=True):
            self.gate.wait(30)
            time.sleep(delay)
            self.steps.append((index, hidden.shape[0], hidden.shape[1]))
            self.in_flight.append(self.service.scheduler.in_flight + hidden.shape[0])
            return layer(index, hidden, attention, need_exit)

        def slow_run(samples, thresholds, criterion, trace=False):
            self.rows.append(len(samples))
            self.gate.wait(30)
            time.sleep(delay)
            return run(samples, thresholds, criterion, trace)

        if policy in ("layered", "oldest"):
            backend.embed, backend.layer = logged_embed, slow_layer
        else:
            backend.run = slow_run

    @contextmanager
    def serving(self) -> Iterator[str]:
        with live_server(self.app) as base:
            try:
                yield base
            finally:
                self.gate.set()  # never leave the worker held: the server could not stop

    def failures(self, reason: str) -> float:
        registry = self.app.state.models.metrics.registry
        return registry.get_sample_value("exitserve_request_failures_total", {"reason": reason}) or 0.0


def same_answer(a: dict, b: dict) -> bool:
    """Equal up to float noise (a row's numbers may differ in the last bits with the batch it ran in)."""
    return (a["prediction"], a["exit_layer"]) == (b["prediction"], b["exit_layer"]) and a["confidence"] == (
        pytest.approx(b["confidence"], abs=1e-5))


def wait_for(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def raw_request(body: bytes) -> bytes:
    return (b"POST /predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


# ---- clients that go away -------------------------------------------------------------------------

def test_a_request_whose_client_disconnects_while_queued_is_not_computed(tiny_checkpoint):
    inst = Instrumented(tiny_checkpoint)
    with inst.serving() as base:
        inst.gate.clear()  # the worker will hold the first request at layer 1
        first: dict = {}
        holder = threading.Thread(target=lambda: first.update(r=httpx.post(f"{base}/predict", json={"text": "x"},
                                                                           timeout=30)))
        holder.start()
        wait_for(lambda: inst.rows == [1])
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as gone:
            gone.sendall(raw_request(json.dumps({"text": TEXTS[:3]}).encode()))
            wait_for(lambda: inst.service.scheduler.queue_size == 3)
        wait_for(lambda: inst.failures("disconnected") == 1)
        inst.gate.set()
        holder.join(30)
        assert first["r"].status_code == 200
        after = httpx.post(f"{base}/predict", json={"text": "y"}, timeout=30)
        assert after.status_code == 200
    assert inst.rows == [1, 1]  # the three disconnected inputs never entered the model
    assert inst.service.scheduler.queue_size == 0


def test_in_flight_inputs_of_a_cancelled_request_stop_at_the_next_layer(tiny_checkpoint):
    inst = Instrumented(tiny_checkpoint, policy="layered")  # layer steps: a sample waits between its layers

    async def main() -> None:
        await inst.service.start()
        inst.gate.clear()
        task = asyncio.create_task(inst.service.predict(TEXTS[:2], threshold=1.0))  # all layers
        await asyncio.to_thread(wait_for, lambda: inst.rows == [2])
        task.cancel()
        await asyncio.sleep(0.05)  # the cancellation reaches the samples' futures
        inst.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await inst.service.predict(["next"], threshold=1.0)
        inst.service.stop()

    asyncio.run(main())
    steps = [(index, rows) for index, rows, _ in inst.steps]
    assert steps[0] == (0, 2)  # in layer 1 when cancelled; layers 2.. never ran for them
    assert steps[1:] == [(k, 1) for k in range(TINY_LAYERS)]  # then only "next" ran


# ---- hostile input ----------------------------------------------------------------------------------

def raw(body: bytes | list[bytes], content_type: str = "application/json") -> dict:
    return {"content": body, "headers": {"content-type": content_type}}


HOSTILE = [  # (name, request kwargs, status, error type); the body limit is the default 1 MB
    ("invalid UTF-8", raw(b'{"text": "\xff\xfe"}'), 400, "invalid_body"),
    ("lone surrogate", raw(b'{"text": "\\ud800"}'), 422, "validation_error"),
    ("text/plain", raw(b'{"text": "ok"}', "text/plain"), 415, "unsupported_media_type"),
    ("no content type", raw(b'{"text": "ok"}', ""), 415, "unsupported_media_type"),
    ("form data", {"data": {"text": "ok"}}, 415, "unsupported_media_type"),
    ("multipart", {"files": {"text": ("a.txt", b"ok")}}, 415, "unsupported_media_type"),
    ("deeply nested JSON", raw(b'{"text": ' + b"[" * 400_000 + b"]" * 400_000 + b"}"), 400, "invalid_body"),
    ("nested but parseable", raw(b'{"text": ' + b"[" * 500 + b"]" * 500 + b"}"), 422, "validation_error"),
    ("a 5000-digit number", raw(b'{"text": "ok", "threshold": ' + b"9" * 5000 + b"}"), 400, "invalid_body"),
    ("JSON over the body limit", {"json": {"text": ["word " * 100] * 2500}}, 413, "payload_too_large"),
    ("chunked body over the limit", raw([b" " * 10_000] * 120), 413, "payload_too_large"),  # no content-length
    ("a text over max_chars", {"json": {"text": "x" * 2001}}, 422, "validation_error"),
    ("too many inputs", {"json": {"text": ["x"] * 17}}, 422, "validation_error"),
    ("150k tiny inputs", {"json": {"text": ["x"] * 150_000}}, 422, "validation_error"),
    ("not an object", {"json": [1, 2]}, 422, "validation_error"),
    ("a boolean threshold", {"json": {"text": "ok", "threshold": False}}, 422, "validation_error"),  # no coercion
    ("a string flag", {"json": {"text": "ok", "return_trace": "yes"}}, 422, "validation_error"),
]


def test_hostile_input_gets_a_clear_4xx_and_does_not_disturb_other_requests(tiny_checkpoint):
    inst = Instrumented(tiny_checkpoint, max_chars=2000, max_inputs_per_request=16)
    with inst.serving() as base, httpx.Client(base_url=base, timeout=30) as client:
        expected = {t: client.post("/predict", json={"text": t}).json() for t in TEXTS}
        stop, others = threading.Event(), []

        def bystander() -> None:
            with httpx.Client(base_url=base, timeout=30) as c:
                while not stop.is_set():
                    text = TEXTS[len(others) % len(TEXTS)]
                    r = c.post("/predict", json={"text": text})
                    others.append(r.status_code == 200 and same_answer(r.json(), expected[text]))

        thread = threading.Thread(target=bystander)
        thread.start()
        try:
            for name, kwargs, status, type_ in HOSTILE * 2:
                r = client.post("/predict", **kwargs)
                assert r.status_code == status, (name, r.text)
                error = r.json()["error"]
                assert error["type"] == type_ and error["message"] and "\n" not in error["message"], name
            long_ok = client.post("/predict", json={"text": "word " * 399})  # truncated to 128 tokens
            assert long_ok.status_code == 200
            deadline = time.monotonic() + 20
            while len(others) < 3 and time.monotonic() < deadline:  # let the bystander finish a few
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join(30)
    assert len(others) >= 3 and all(others)


# ---- overload and deadlines -------------------------------------------------------------------------

async def burst(base: str, n: int, text: str = "a fine film") -> list[tuple[int, float, dict]]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        async def one() -> tuple[int, float, dict]:
            start = time.monotonic()
            r = await client.post("/predict", json={"text": text})
            return r.status_code, time.monotonic() - start, r.json()

        return await asyncio.gather(*(one() for _ in range(n)))


def test_overload_is_answered_with_fast_429s_and_accepted_requests_are_correct(tiny_checkpoint):
    inst = Instrumented(tiny_checkpoint, delay=0.02, max_queue_size=4, max_batch_size=2)
    with inst.serving() as base:
        alone = httpx.post(f"{base}/predict", json={"text": "a fine film"}, timeout=30).json()
        results = asyncio.run(burst(base, 40))
        ok = [(t, body) for status, t, body in results if status == 200]
        refused = [(t, body) for status, t, body in results if status == 429]
        assert len(ok) + len(refused) == len(results), sorted({s for s, _, _ in results})
        assert ok and len(refused) >= 20
        assert all(same_answer(body, alone) for _, body in ok)
        assert all(body["error"]["type"] == "overloaded" for _, body in refused)
        assert max(t for t, _ in refused) < max(t for t, _ in ok)
        # and once the burst is over the server answers as before
        assert [s for s, _, _ in asyncio.run(burst(base, 2))] == [200, 200]
    assert inst.failures("overloaded") == len(refused)


def test_a_queue_smaller_than_the_warm_up_batch_still_starts(tiny_checkpoint):
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, max_queue_size=1))) as client:
        assert client.get("/ready").status_code == 200
        assert client.post("/predict", json={"text": "ok"}).status_code == 200
        assert client.post("/predict", json={"text": ["a", "b"]}).json()["error"]["type"] == "overloaded"


def test_a_request_that_waits_past_its_deadline_gets_503(tiny_checkpoint):
    inst = Instrumented(tiny_checkpoint, request_timeout=0.2)
    results: list = []

    def send(n: int) -> threading.Thread:
        thread = threading.Thread(target=lambda: results.extend(asyncio.run(burst(base, n))))
        thread.start()
        return thread

    with inst.serving() as base:
        inst.gate.clear()
        first = send(1)
        wait_for(lambda: inst.rows == [1])  # held at layer 1
        rest = send(2)
        wait_for(lambda: inst.service.scheduler.queue_size == 2)
        time.sleep(0.3)  # the queued two are now past their deadline
        inst.gate.set()
        first.join(30)
        rest.join(30)
    assert sorted(s for s, _, _ in results) == [200, 503, 503]
    assert {body["error"]["type"] for s, _, body in results if s == 503} == {"deadline_exceeded"}
    assert inst.rows == [1]  # expired inputs were not computed
    assert inst.failures("deadline") == 2


def test_a_long_queue_neither_grows_the_work_in_flight_nor_starves_it(tiny_checkpoint):
    inst = Instrumented(tiny_checkpoint, policy="layered", max_batch_size=1)  # admits 2 inputs at a time
    long_text = "a long and winding review of a film that goes on " * 3

    async def main() -> None:
        await inst.service.start()
        inst.gate.clear()
        first = asyncio.create_task(inst.service.predict([long_text], threshold=1.0))  # all layers
        await asyncio.to_thread(wait_for, lambda: inst.rows == [1])
        rest = [asyncio.create_task(inst.service.predict([t], threshold=1.0)) for t in TEXTS * 8]
        await asyncio.to_thread(wait_for, lambda: inst.service.scheduler.queue_size == len(rest))
        inst.gate.set()
        await asyncio.gather(first, *rest)
        inst.service.stop()

    asyncio.run(main())
    width = max(w for _, _, w in inst.steps)  # the long text's steps are the widest
    at = [i for i, (_, _, w) in enumerate(inst.steps) if w == width]
    assert len(at) == TINY_LAYERS
    # the work in flight, and the wait of an input in flight between two of its layers, are bounded
    # by the admission window (2) and the layers, not by the backlog (32 queued inputs)
    assert max(inst.in_flight) <= 3 * TINY_LAYERS
    assert max(b - a for a, b in itertools.pairwise(at)) <= 3 * TINY_LAYERS


# ---- bad checkpoints ----------------------------------------------------------------------------------

class Pwned:
    """Unpickling this would create a file: proof that a pickle was executed."""

    marker: Path

    def __reduce__(self):
        return Path.touch, (self.marker,)


def damage(checkpoint: Path, how: str, tmp_path: Path, tokenizer) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = broken / "model.safetensors"
    if how == "missing exit config":
        (broken / "exit_config.json").unlink()
    elif how == "missing tokenizer":
        for path in broken.glob("*"):
            if path.name.startswith(("tokenizer", "vocab", "special_tokens")):
                path.unlink()
    elif how == "corrupt safetensors":
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\x00garbage, not a JSON header \x00\x00\x00"
        weights.write_bytes(bytes(data))
    elif how == "head shapes":
        state = load_file(str(weights))
        state["heads.0.classifier.weight"] = torch.zeros(3, state["heads.0.classifier.weight"].shape[1])
        save_file(state, str(weights))
    elif how == "tokenizer":
        bigger = type(tokenizer).from_pretrained(checkpoint)
        bigger.add_tokens([f"extra{i}" for i in range(10)])
        bigger.save_pretrained(broken)
    elif how == "pickle":
        Pwned.marker = tmp_path / "pwned"
        weights.write_bytes(pickle.dumps({"weights": Pwned()}))
    elif how == "5-token vocab":  # every word would be [UNK]
        (broken / "tokenizer.json").unlink()
        (broken / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    elif how == "config.json nested 100,000 deep":  # was a RecursionError traceback
        (broken / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    elif how == "exit_config.json a FIFO":  # its read used to wait for a writer for ever
        (broken / "exit_config.json").unlink()
        os.mkfifo(broken / "exit_config.json")
    elif how == "exit_config.json -> /dev/zero":  # used to be read until memory ran out
        (broken / "exit_config.json").unlink()
        (broken / "exit_config.json").symlink_to("/dev/zero")
    elif how == "exit_config.json of 8 MB":
        edit_exit_config(broken, training={"notes": "x" * 8_000_000})
    elif how == "canaries.json damaged":
        (broken / "canaries.json").write_text('{"format": 1, "texts": []}')
    elif how in TOKENIZER_DAMAGE:  # the right size, another mapping: used to serve confident wrong answers
        TOKENIZER_DAMAGE[how](broken)
    elif how in ("NaN weights", "inf weights"):
        state = load_file(str(weights))
        state["encoder.embeddings.word_embeddings.weight"][100] = float("nan" if how == "NaN weights" else "inf")
        save_file(state, str(weights))
    else:  # a bad exit-config value
        edit_exit_config(broken, **EXIT_CONFIG_DAMAGE[how])
    return broken


def edit_exit_config(checkpoint: Path, **changes) -> None:
    path = checkpoint / "exit_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


EXIT_CONFIG_DAMAGE = {
    "label names not strings": {"label_names": [1, {"x": 2}]},
    "max_length over the positions": {"max_length": 1000},  # the tiny backbone has 128
    "max_length 0": {"max_length": 0},
    "num_layers a string": {"num_layers": "4"},
    "int8 variant's threshold not a number": {"calibration": {"variants": {"onnxruntime-int8": {"threshold": "high"}}}},
    "int8 variant's threshold out of range": {"calibration": {"variants": {"onnxruntime-int8": {"threshold": 1.5}}}},
}
BAD = ["missing exit config", "missing tokenizer", "corrupt safetensors", "head shapes", "tokenizer", "pickle",
       "5-token vocab", "NaN weights", "inf weights", *EXIT_CONFIG_DAMAGE, "config.json nested 100,000 deep",
       "exit_config.json a FIFO", "exit_config.json -> /dev/zero", "exit_config.json of 8 MB", "canaries.json damaged",
       *TOKENIZER_DAMAGE]


@pytest.mark.parametrize("how", BAD)
def test_a_bad_checkpoint_stops_start_up_with_one_line_and_never_serves(tiny_checkpoint, tmp_path, tokenizer,
                                                                         capsys, monkeypatch, how):
    broken = damage(tiny_checkpoint, how, tmp_path, tokenizer)
    served = []  # if the checkpoint were accepted, uvicorn would be started: recorded here instead
    monkeypatch.setattr(DrainingServer, "run", lambda self, sockets=None: served.append(self))
    assert run(Settings(checkpoint=broken, port=0)) == 2
    assert not served
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("exitserve serve: cannot start: "), lines
    with pytest.raises(CheckpointError), TestClient(create_app(Settings(checkpoint=broken))) as client:
        client.get("/ready")  # the lifespan path fails too: never reached
    assert not (tmp_path / "pwned").exists()  # the pickle was never executed


# ---- security ---------------------------------------------------------------------------------------

def test_api_key_is_compared_in_constant_time(tiny_checkpoint, monkeypatch):
    compared = []

    def spy(a, b):
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(guard_module.secrets, "compare_digest", spy)
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, warmup=False, api_key="s3cret"))) as c:
        assert c.get("/info", headers={"Authorization": "Bearer guess"}).status_code == 401
        assert c.get("/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert compared == [(b"guess", b"s3cret"), (b"s3cret", b"s3cret")]


def test_no_route_takes_a_path_or_reads_files_named_by_the_request_but_the_keyed_admin_reload(tiny_checkpoint):
    def paths(routes) -> set[str]:  # FastAPI keeps an included router as one entry
        found: set[str] = set()
        for route in routes:
            router = getattr(route, "original_router", None)
            found |= paths(router.routes) if router is not None else {route.path}
        return found

    app = create_app(Settings(checkpoint=tiny_checkpoint))
    v2 = "/v2/models/{name}"
    assert paths(app.routes) == {
        "/predict", "/health", "/ready", "/info", "/models", "/metrics", "/openapi.json", "/docs",
        "/docs/oauth2-redirect", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/docs/favicon.png",
        "/", "/invocations", "/models/{name}", "/v2", "/v2/health/live", "/v2/health/ready", v2, v2 + "/ready",
        v2 + "/infer", v2 + "/versions/{version}", v2 + "/versions/{version}/ready", v2 + "/versions/{version}/infer",
        "/admin/models/{name}/reload"}
    spec = app.openapi()
    # parameters name a served model (looked up by name, never opened) or its version; nothing else
    params = {p["name"] for ops in spec["paths"].values() for op in ops.values() for p in op.get("parameters", [])}
    assert params == {"name", "version", "model"}
    fields = spec["components"]["schemas"]["PredictRequest"]["properties"]
    assert set(fields) == {"text", "text_pair", "threshold", "return_trace", "model"}
    # the one body naming a directory: the admin reload, off without admin_key and keyed with it
    assert set(spec["components"]["schemas"]["ReloadRequest"]["properties"]) == {"checkpoint"}
    with TestClient(app) as c:
        r = c.post("/admin/models/tiny-sst2/reload", json={"checkpoint": "/etc"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "admin_off"
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, warmup=False, admin_key="adm"))) as c:
        assert c.post("/admin/models/tiny-sst2/reload", json={"checkpoint": "/etc"}).status_code == 401
