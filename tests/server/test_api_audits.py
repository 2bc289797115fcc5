"""Shadow audits and the autopilot through the HTTP API: /info, /metrics and the answers."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from exitserve.models.checkpoint import save_checkpoint
from exitserve.server.audit import wilson_lower_bound
from exitserve.server.service import PredictionService
from exitserve.server.settings import Settings
from tests.conftest import TINY_LAYERS, make_exit_config, make_model
from tests.server.conftest import make_client


def metric(client, name: str, **labels: str) -> float:
    """One sample of /metrics (the model label is implied)."""
    service = client.app.state.models.sole()
    value = service.metrics.registry.get_sample_value(name, {"model": service.name, **labels})
    assert value is not None, name
    return value


def wait_for_audits(client, count: int, timeout: float = 30.0) -> dict:
    end = time.monotonic() + timeout
    while (audits := client.get("/info").json()["audits"])["audited"] + audits["dropped"] < count:
        assert time.monotonic() < end, audits
        time.sleep(0.02)
    return audits


def post_all(client, texts: list[str], thresholds: list[float | None] = (None,)) -> list[dict]:
    """Requests of 8 texts; request j asks `thresholds[j % len(thresholds)]` (None: the default)."""
    results = []
    for j, i in enumerate(range(0, len(texts), 8)):
        threshold = thresholds[j % len(thresholds)]
        body = {} if threshold is None else {"threshold": threshold}
        r = client.post("/predict", json={"text": texts[i : i + 8], **body})
        assert r.status_code == 200, r.text
        results += r.json()["results"]
    return results


def test_agreement_metric_equals_the_agreement_measured_offline_at_threshold_one(tiny_checkpoint, sst2_texts):
    texts = sst2_texts[:48]
    with make_client(tiny_checkpoint, audit_rate=1.0, audit_window=100, warmup=False) as c:
        served = post_all(c, texts, [None, 0.5])  # the default (0.55) and a request's own threshold
        audits = wait_for_audits(c, len(texts))
        assert audits["dropped"] == 0 and audits["audited"] == len(texts) == audits["in_window"]
        extra_layers = metric(c, "exitserve_audit_layers_total")
        saved = metric(c, "exitserve_layers_saved_total")
        disagreements = {k: metric(c, "exitserve_audit_disagreements_total", layer=str(k)) for k in range(1, 4)}
        gauges = metric(c, "exitserve_exit_agreement"), metric(c, "exitserve_exit_agreement_lower_bound")
        full = post_all(c, texts, [1.0])  # offline: the same inputs through every layer
    agree = [s["prediction"] == f["prediction"] for s, f in zip(served, full, strict=True)]
    assert 0 < sum(agree) < len(texts)  # the tiny model's early exits disagree sometimes
    assert {s["exit_layer"] for s in served} == {1, 2}
    assert audits["agreement"] == sum(agree) / len(texts) == gauges[0]
    assert audits["lower_bound"] == pytest.approx(wilson_lower_bound(sum(agree), len(texts))) == gauges[1]
    for layer, count in disagreements.items():
        assert count == sum(not a and s["exit_layer"] == layer for a, s in zip(agree, served, strict=True))
    early_saved = sum(TINY_LAYERS - s["exit_layer"] for s in served)
    early = sum(s["exit_layer"] < TINY_LAYERS for s in served)
    assert extra_layers == TINY_LAYERS * early  # every audit of an early answer ran the model again in full...
    assert saved == early_saved  # ...and "layers saved" still counts only the answers


def test_audits_change_no_answer(tiny_checkpoint, sst2_texts):
    texts = sst2_texts[:24]
    answers = {}
    for rate in (0.0, 1.0):
        with make_client(tiny_checkpoint, audit_rate=rate, warmup=False) as c:
            results = post_all(c, texts, [None, 0.5])
        answers[rate] = [(r["prediction"], r["exit_layer"], r["threshold"], r["confidence"]) for r in results]
    assert answers[0.0] == answers[1.0]


def test_autopilot_raises_a_threshold_that_disagrees_and_stops_at_one(tiny_checkpoint, sst2_texts):
    settings = dict(audit_rate=1.0, target_agreement=0.99, autopilot_min_samples=8, autopilot_step=0.25,
                    audit_window=40, warmup=False)
    with make_client(tiny_checkpoint, **settings) as c:
        assert c.get("/info").json()["audits"]["autopilot"]["threshold"] == 0.55  # the checkpoint's
        thresholds = []
        for i in range(12):
            results = post_all(c, sst2_texts[8 * i : 8 * i + 8])
            thresholds += [r["threshold"] for r in results]
            wait_for_audits(c, 8 * (i + 1))
        override = c.post("/predict", json={"text": "a request's own threshold", "threshold": 0.3}).json()
        info = c.get("/info").json()
        moves_up = metric(c, "exitserve_autopilot_moves_total", direction="up")
        gauge = metric(c, "exitserve_default_threshold")
    pilot = info["audits"]["autopilot"]
    assert thresholds == sorted(thresholds) and thresholds[0] == 0.55 and thresholds[-1] == 1.0  # raised, never lowered
    assert pilot["threshold"] == info["default_threshold"] == gauge == 1.0
    assert pilot["moves"] == {"up": moves_up, "down": 0} and moves_up >= 2
    assert [m["new"] for m in pilot["recent_moves"]][-1] == 1.0 and all(m["new"] <= 1.0 for m in pilot["recent_moves"])
    assert all(m["lower_bound"] < 0.99 for m in pilot["recent_moves"])  # each raise had its reason
    assert pilot["audits_since_move"] >= settings["autopilot_min_samples"]  # then it stayed at 1.0
    assert override["threshold"] == 0.3  # a request's own threshold is never moved
    with make_client(tiny_checkpoint, **settings) as c:  # a restart starts from the checkpoint again
        assert c.get("/info").json()["default_threshold"] == 0.55


def test_regression_agreement_uses_the_tolerance(tiny_pair_checkpoint):
    pairs = [(f"a man plays guitar number {i}", f"someone plays a guitar {i}") for i in range(16)]
    body = {"text": [a for a, _ in pairs], "text_pair": [b for _, b in pairs]}
    for tolerance, check in ((1e6, lambda a, served: a == 1.0),
                             (0.0, lambda a, served: a == sum(r["exit_layer"] == TINY_LAYERS for r in served) / 16)):
        with make_client(tiny_pair_checkpoint, audit_rate=1.0, audit_tolerance=tolerance, warmup=False) as c:
            served = c.post("/predict", json=body).json()["results"]
            audits = wait_for_audits(c, 16)
        assert audits["tolerance"] == tolerance and check(audits["agreement"], served)


def test_defaults_and_bad_audit_settings(tiny_checkpoint, tmp_path, tokenizer):
    with make_client(tiny_checkpoint, warmup=False) as c:
        audits = c.get("/info").json()["audits"]
    assert (audits["rate"], audits["window"], audits["autopilot"], audits["agreement"]) == (0.02, 1000, None, None)
    with pytest.raises(ValidationError, match="audit_rate above 0"):
        Settings(checkpoint=tiny_checkpoint, target_agreement=0.9, audit_rate=0)
    per_layer = save_checkpoint(tmp_path / "per-layer", make_model(seed=7), tokenizer,
                                make_exit_config(default_threshold=[0.6, 0.7, 0.8, 0.9]))
    with pytest.raises(ValueError, match="per-layer"):
        PredictionService.load(Settings(checkpoint=per_layer, target_agreement=0.9))
