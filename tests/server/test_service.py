"""The prediction service: start-up warm-up, where tokenisation runs, garbage-collector freezing."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from exitserve.models.encoding import encode
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
    backend = service.scheduler.backend  # the default runtime (onnxruntime on the CPU)
    steps, layer = [], backend.layer

    def logged(index, hidden, attention, need_exit=True):
        steps.append((index, *hidden.shape[:2]))
        return layer(index, hidden, attention, need_exit)

    backend.layer = logged
    asyncio.run(service.start())
    ready = service.ready
    service.stop()
    max_length = service.config.max_length
    assert [s for s in steps if s[2] == max_length] == [(i, rows, max_length) for i in range(TINY_LAYERS)]
    assert max(n * w for _, n, w in steps) == rows * max_length  # nothing bigger than the scheduler can form
    assert ready


def test_small_requests_are_tokenised_on_the_event_loop_and_large_ones_in_a_thread(tiny_checkpoint, monkeypatch):
    from exitserve.server import service as service_module

    threads = []

    def recording_encode(*args, **kwargs):
        threads.append(threading.get_ident())
        return encode(*args, **kwargs)

    monkeypatch.setattr(service_module, "encode", recording_encode)
    service = PredictionService.load(Settings(checkpoint=tiny_checkpoint, warmup=False))
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
    alone = predict(service.backend, service.criterion, encode(service.tokenizer, [small, large]), [1.0] * TINY_LAYERS)
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
