"""The prediction service: start-up warm-up."""

from __future__ import annotations

import asyncio

import pytest

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
