"""The one error table, the order of the request guard (API key first), and the validation gaps a
hostile user found: blank texts, NaN thresholds, huge numbers, non-finite model output."""

from __future__ import annotations

import json

import pytest
import torch

from exitserve.models.encoding import InputTooLong
from exitserve.server.error_format import KINDS, error_bytes
from exitserve.server.errors import (
    ERRORS,
    BodyTimeout,
    ClientGone,
    ClientGoneMidBody,
    api_error,
)
from exitserve.server.scheduler import DeadlineExceeded, QueueFull, SchedulerStopped
from exitserve.server.service import NonFiniteOutput
from tests.server.conftest import make_client
from tests.server.test_api import error_of

KEY = {"Authorization": "Bearer s3cret"}


def failures(client, reason: str) -> float:
    value = client.app.state.models.metrics.registry.get_sample_value(
        "exitserve_request_failures_total", {"reason": reason})
    return value or 0.0


@pytest.mark.parametrize(
    ("exc", "status", "type_", "retry", "failure"),
    [
        (QueueFull("full"), 429, "overloaded", "1", "overloaded"),
        (DeadlineExceeded("late"), 503, "deadline_exceeded", None, "deadline"),
        (SchedulerStopped("stop"), 503, "shutting_down", None, None),
        (InputTooLong("long"), 422, "input_too_long", None, None),
        (NonFiniteOutput("nan"), 500, "inference_error", None, "inference"),
        (ClientGone("gone"), 499, "client_closed_request", None, "disconnected"),
        (ClientGoneMidBody("gone"), 499, "client_closed_request", None, "disconnected_mid_body"),
        (BodyTimeout("slow"), 408, "request_timeout", None, "body_timeout"),
        (RuntimeError("boom"), 500, "inference_error", None, "inference"),  # not in the table: the model failed
    ],
)
def test_the_table_answers_every_failure(exc, status, type_, retry, failure):
    error = api_error(exc)
    assert (error.kind.status, error.kind.type, error.kind.failure) == (status, type_, failure)
    assert (error.kind.headers() or {}).get("Retry-After") == retry
    assert error.message == ("RuntimeError: boom" if type(exc) not in ERRORS else str(exc.args[0]))


def test_a_body_timeout_closes_the_connection():
    assert api_error(BodyTimeout("slow")).kind.headers() == {"Connection": "close"}


def test_every_exception_maps_onto_the_one_table():
    assert all(kind in KINDS.values() for kind in ERRORS.values())


@pytest.mark.parametrize("name", ["header_timeout", "header_too_large", "too_many_connections"])
def test_the_connection_guard_s_raw_answers_come_from_the_table(name):
    kind = KINDS[name]
    head, _, body = error_bytes(kind, "why").partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {kind.status} ")
    assert json.loads(body) == {"error": {"type": kind.type, "message": "why"}}
    assert "connection: close" in lines and f"content-length: {len(body)}" in lines
    assert (f"retry-after: {kind.retry_after}" in lines) == bool(kind.retry_after)


def test_the_routes_answers_come_from_the_table(tiny_checkpoint):
    with make_client(tiny_checkpoint, warmup=False, api_key="s3cret") as c:
        answers = {
            "unauthorized": c.post("/predict", json={"text": "x"}),
            "unsupported_media_type": c.post("/predict", content=b"x", headers={**KEY, "content-type": "text/plain"}),
            "validation_error": c.post("/predict", json={"text": []}, headers=KEY),
        }
        c.app.state.models.sole().ready = False
        answers["not_ready"] = c.post("/predict", json={"text": "x"}, headers=KEY)
        c.app.state.models.sole().ready = True
    for name, r in answers.items():
        kind = KINDS[name]
        assert (r.status_code, r.json()["error"]["type"]) == (kind.status, kind.type), name
        for header, value in (kind.headers() or {}).items():
            assert r.headers[header] == value, (name, header)


# ---- the API key comes first ------------------------------------------------------------------------

def test_the_api_key_is_checked_before_the_body_is_parsed_and_before_the_429_shortcut(tiny_checkpoint):
    with make_client(tiny_checkpoint, warmup=False, api_key="s3cret", max_body_bytes=1000) as c:
        error_of(c.post("/predict", content=b"{not json", headers={"content-type": "application/json"}), 401,
                 "unauthorized")  # was 422
        error_of(c.post("/predict", json={"colour": "red"}), 401, "unauthorized")  # was 422
        error_of(c.post("/predict", content=b"x", headers={"content-type": "text/plain"}), 401)  # was 415
        error_of(c.post("/predict", json={"text": "x" * 2000}), 401)  # was 413
        json_type = {"content-type": "application/json"}
        assert c.post("/predict", content=b"{not json", headers={**json_type, **KEY}).status_code == 422

        c.app.state.models.sole().scheduler.max_queue_size = 0  # the queue is full from now on
        r = c.post("/predict", json={"text": "hi"})
        assert error_of(r, 401, "unauthorized") and r.headers["www-authenticate"] == "Bearer"  # was 429
        r = c.post("/predict", json={"text": "hi"}, headers=KEY)
        assert error_of(r, 429, "overloaded") and r.headers["retry-after"] == "1"
        assert failures(c, "overloaded") == 1  # the refused unauthenticated request is not an overload


def test_overload_is_counted_once_whichever_path_refuses(tiny_checkpoint):
    with make_client(tiny_checkpoint, warmup=False, max_queue_size=2) as c:
        error_of(c.post("/predict", json={"text": ["a", "b", "c"]}), 429, "overloaded")  # the route: 3 > 2
        c.app.state.models.sole().scheduler.max_queue_size = 0
        error_of(c.post("/predict", json={"text": "a"}), 429, "overloaded")  # the middleware's shortcut
        assert failures(c, "overloaded") == 2
        metrics = c.get("/metrics").text
    assert 'exitserve_requests_total{route="/predict",status="429"} 2.0' in metrics


# ---- validation gaps --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "where"),
    [("\u200b\u200b\u200b", "text"), ("\x00\x00", "text"), ("\ufeff \u2060\t", "text"),
     (["fine", "\u200b\x00 \u200d"], "text[1]"),
     # found by a hostile tester: each used to be answered 200, for an input the model saw as empty
     ("\u0301\u0308\u0301", "text"), ("\ufe0f\ufe0f", "text"), ("\ue000", "text"), ("\ufffd\ufffd", "text"),
     ("\u2800 \u2800", "text"), ("\u3164", "text")],
)
def test_a_text_of_only_invisible_characters_is_empty(client, text, where):
    assert error_of(client.post("/predict", json={"text": text}), 422, "validation_error").startswith(
        f"{where}: empty text")


def test_invisible_characters_around_words_are_fine(client):
    assert client.post("/predict", json={"text": "\u200bgreat\x00 film\ufeff"}).status_code == 200


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity"])
def test_a_non_finite_threshold_is_refused_as_such(client, number):
    body = b'{"text": "ok", "threshold": ' + number + b"}"
    message = error_of(client.post("/predict", content=body, headers={"content-type": "application/json"}), 422)
    assert message == "threshold: Input should be a finite number"


def test_a_number_with_too_many_digits_says_so_without_python_internals(client):
    body = b'{"text": "ok", "threshold": ' + b"9" * 5000 + b"}"
    message = error_of(client.post("/predict", content=body, headers={"content-type": "application/json"}), 400,
                       "invalid_body")
    assert message == "a number in the body has more than 4300 digits"


# ---- non-finite model output ------------------------------------------------------------------------

def test_non_finite_model_output_is_a_500_in_the_error_format_never_a_200(tiny_checkpoint):
    # on torch, whose weights the test can damage after loading (the load check refuses them on disk)
    with make_client(tiny_checkpoint, warmup=False, backend="torch") as c:
        assert c.post("/predict", json={"text": "fine"}).status_code == 200
        with torch.no_grad():
            for head in c.app.state.models.sole().scheduler.backend.model.heads:
                head.classifier.bias.fill_(float("nan"))
        for body in ({"text": "a"}, {"text": ["a", "b"], "return_trace": True}, {"text": "a", "threshold": 0.0}):
            message = error_of(c.post("/predict", json=body), 500, "inference_error")
            assert "not a finite number" in message
        assert failures(c, "inference") == 3
        assert c.get("/ready").status_code == 200  # the server itself is fine
