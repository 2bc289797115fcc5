"""The prediction service: start-up warm-up, where tokenisation runs, garbage-collector freezing."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from exitserve.models.inference import predict
from exitserve.server.metrics import ServerMetrics
from exitserve.server.service import PredictionService
from exitserve.server.settings import Settings
from tests.conftest import TINY_LAYERS


@pytest.mark.parametrize(
    ("limits", "rows"),
    [({}, 32), ({"max_batch_tokens": 1000}, 7), ({"max_queue_size": 3}, 3), ({"truncate": False}, 32)],
)
def test_warm_up_runs_the_largest_step_through_every_layer(tiny_checkpoint, limits, rows):
    service = PredictionService.load(Settings(checkpoint=tiny_checkpoint, **limits))
    backend = service.scheduler.backend  # the default runtime (onnxruntime on the CPU), run steps (fcfs)
    steps, run = [], backend.run

    def logged(samples, thresholds, criterion, trace=False):
        result = run(samples, thresholds, criterion, trace)
        steps.append((len(samples), max(len(s) for s in samples), set(result.exit_layer.tolist())))
        return result

    backend.run = logged
    asyncio.run(service.start())
    ready = service.ready
    service.stop()
    max_length = service.config.max_length
    widest = [s for s in steps if s[1] == max_length]  # a ladder up to the largest step, through every layer
    assert widest[-1] == (rows, max_length, {TINY_LAYERS}) and all(layers == {TINY_LAYERS} for *_, layers in widest)
    assert max(n * w for n, w, _ in steps) == rows * max_length  # nothing bigger than the scheduler can form
    assert ready


def test_small_requests_are_tokenised_on_the_event_loop_and_large_ones_in_a_thread(tiny_checkpoint, monkeypatch):
    from exitserve.server import service as service_module

    threads = []
    service = PredictionService.load(Settings(checkpoint=tiny_checkpoint, warmup=False))
    encode_ = service.encoder.encode

    def recording_encode(*args, **kwargs):
        threads.append(threading.get_ident())
        return encode_(*args, **kwargs)

    monkeypatch.setattr(service.encoder, "encode", recording_encode)
    small = "a short review"
    large = " ".join(["word"] * (service_module.INLINE_TOKENIZE_CHARS // 5 + 1))

    async def main():
        await service.start()
        try:
            loop_thread = threading.get_ident()
            short = await service.predict([small], threshold=1.0)
            long = await service.predict([large], threshold=1.0)
            return loop_thread, short, long
        finally:
            service.stop()

    loop_thread, short, long = asyncio.run(main())
    assert len(large) > service_module.INLINE_TOKENIZE_CHARS >= len(small)
    assert threads[0] == loop_thread and threads[1] != loop_thread
    assert service.tokenizing == 0
    alone = predict(service.backend, service.criterion, encode_([small, large]), [1.0] * TINY_LAYERS)
    assert [short.predictions[0].label_id, long.predictions[0].label_id] == [p.label_id for p in alone]


@pytest.mark.parametrize("freeze", [True, False])
def test_objects_alive_after_warm_up_are_frozen_until_stop_and_gc_pauses_are_measured(tiny_checkpoint, freeze):
    service = PredictionService.load(Settings(checkpoint=tiny_checkpoint, gc_freeze=freeze))
    server = ServerMetrics(lambda: [service.metrics])  # the process's metrics time the collector
    asyncio.run(service.start())
    frozen = gc.get_freeze_count()
    gc.collect()
    service.stop()
    assert (frozen > 10_000) == freeze  # the model, the tokenizer and the libraries
    assert gc.get_freeze_count() == 0
    pauses = server.registry.get_sample_value("exitserve_gc_pause_seconds_count", {"generation": "2"})
    assert pauses >= 1


def test_slo_admission_sheds_with_429_and_counts_each_outcome(tiny_checkpoint):
    from fastapi.testclient import TestClient

    from exitserve.server.app import create_app
    from exitserve.server.cost import StepCost

    settings = Settings(checkpoint=tiny_checkpoint, warmup=False, slo_ms=50)
    service = PredictionService.load(settings)
    with TestClient(create_app(settings, service)) as client:
        sample = lambda outcome: service.metrics.registry.get_sample_value(  # noqa: E731
            "exitserve_slo_requests_total", {"model": service.name, "outcome": outcome})
        service.scheduler.cost = StepCost(overhead=0.001, rate=1e-6, min_steps=10**9)  # fast: within the SLO
        assert client.post("/predict", json={"text": "a fine film"}).status_code == 200
        assert sample("met") == 1 and sample("shed") == 0
        service.scheduler.cost = StepCost(overhead=1.0, rate=1e-6, min_steps=10**9)  # a second per step: over it
        r = client.post("/predict", json={"text": "a fine film"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "slo_unreachable"
        assert "over the 50 ms SLO" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1
        assert sample("shed") == 1
        failures = client.app.state.models.metrics.registry.get_sample_value("exitserve_request_failures_total",
                                                                             {"reason": "slo_shed"})
        assert failures == 1
        assert service.metrics.registry.get_sample_value("exitserve_predicted_wait_seconds_count",
                                                         {"model": service.name}) == 1
        assert client.get("/info").json()["scheduler"] == {"policy": "fcfs", "slo_ms": 50.0}
