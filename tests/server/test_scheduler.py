"""The layer-level scheduler, driven directly from an event loop."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from exitserve.models.criteria import ExitCriterion
from exitserve.models.encoding import encode
from exitserve.models.inference import predict
from exitserve.server.scheduler import DeadlineExceeded, LayerScheduler, QueueFull, Sample
from tests.conftest import TINY_LAYERS, RecordingBackend, make_model


@pytest.fixture
def slow(backend_name, backend_for):
    """`slow(delay, fail_width)`: the seed-11 tiny model on the runtime under test, sleeping `delay` s in
    every layer and failing on batches `fail_width` tokens wide (a RecordingBackend logs every layer)."""
    return lambda delay=0.0, fail_width=None: RecordingBackend(backend_for(backend_name, make_model(seed=11)),
                                                               delay, fail_width)


def run(coro):
    return asyncio.run(coro)


def make_samples(encoded, thresholds, deadline_s=30.0):
    loop = asyncio.get_running_loop()
    rows = thresholds if isinstance(thresholds, list) else [thresholds] * len(encoded)
    return [
        Sample(e, torch.tensor(t, dtype=torch.float32).expand(TINY_LAYERS).clone(), loop.create_future(), loop,
               time.monotonic() + deadline_s)
        for e, t in zip(encoded, rows, strict=True)
    ]


def scheduler_for(backend, **kw) -> LayerScheduler:
    sched = LayerScheduler(backend, ExitCriterion("max-prob", TINY_LAYERS), **kw)
    sched.start()
    return sched


def test_answers_under_concurrent_load_equal_answers_alone(tokenizer, sst2_texts, slow):
    model = slow()
    crit = ExitCriterion("max-prob", TINY_LAYERS)
    encoded = encode(tokenizer, sst2_texts[:60], max_length=64)
    thresholds = [0.5 + 0.01 * (i % 10) for i in range(len(encoded))]  # per-request thresholds
    backend = model.inner
    alone = [predict(backend, crit, [e], [t] * TINY_LAYERS)[0] for e, t in zip(encoded, thresholds, strict=True)]

    async def main():
        sched = scheduler_for(model, max_batch_size=8)
        samples = make_samples(encoded, thresholds)
        # 12 "requests" of 5 inputs arriving concurrently
        for i in range(0, len(samples), 5):
            sched.submit(samples[i : i + 5])
            await asyncio.sleep(0)
        out = await asyncio.gather(*(s.future for s in samples))
        sched.stop()
        return out

    served = run(main())
    assert len({p.exit_layer for p in alone}) >= 2
    assert [p.exit_layer for p in served] == [p.exit_layer for p in alone]
    assert [p.label_id for p in served] == [p.label_id for p in alone]
    assert max(b for _, b, _, _ in model.log) > 1  # rows from different requests were batched


def test_easy_input_is_answered_before_a_hard_one_submitted_with_it(tokenizer, slow):
    model = slow(delay=0.01)
    encoded = encode(tokenizer, ["easy one", "hard one"], max_length=32)

    async def main():
        sched = scheduler_for(model)
        easy, hard = make_samples(encoded, [0.0, 1.0])  # exits at layer 1 / runs all layers
        sched.submit([hard, easy])
        first = await asyncio.wait({easy.future, hard.future}, return_when=asyncio.FIRST_COMPLETED)
        await hard.future
        sched.stop()
        return first[0], easy, hard

    done_first, easy, hard = run(main())
    assert done_first == {easy.future}
    assert easy.future.result().exit_layer == 1 and hard.future.result().exit_layer == TINY_LAYERS
    assert easy.finished < hard.finished


def test_new_arrivals_start_without_waiting_for_the_deepest_sample(tokenizer, slow):
    model = slow(delay=0.05)
    encoded = encode(tokenizer, ["first arrival", "late arrival"], max_length=32)

    async def main():
        sched = scheduler_for(model)
        deep, late = make_samples(encoded, [1.0, 1.0])
        sched.submit([deep])
        while deep.next_layer < 1:  # deep is past layer 1, with >= 3 x 50 ms of layers still to run
            await asyncio.sleep(0.001)
        sched.submit([late])
        await asyncio.gather(deep.future, late.future)
        sched.stop()
        return deep, late

    deep, late = run(main())
    assert late.started < deep.finished  # late started layer 1 while deep was still running


def test_a_sample_that_exits_at_layer_k_costs_k_layers(tokenizer, sst2_texts, slow):
    model = slow()
    encoded = encode(tokenizer, sst2_texts[:40], max_length=64)

    async def main():
        sched = scheduler_for(model, max_batch_size=16)
        samples = make_samples(encoded, [0.5 + 0.01 * (i % 10) for i in range(len(encoded))])
        sched.submit(samples)
        out = await asyncio.gather(*(s.future for s in samples))
        sched.stop()
        return out

    model.log.clear()
    results = run(main())
    assert sum(rows for _, rows, _, _ in model.log) == sum(r.exit_layer for r in results)
    assert len({r.exit_layer for r in results}) >= 2


def test_a_failing_batch_fails_only_its_requests_and_the_worker_keeps_serving(tokenizer, slow):
    encoded = encode(tokenizer, ["this one breaks the model badly", "fine"], max_length=32)
    model = slow(fail_width=len(encoded[0]))

    async def main():
        sched = scheduler_for(model)
        bad, = make_samples(encoded[:1], 1.0)
        sched.submit([bad])
        with pytest.raises(RuntimeError, match="boom"):
            await bad.future
        good, = make_samples(encoded[1:], 1.0)
        sched.submit([good])
        result = await asyncio.wait_for(good.future, 5)
        sched.stop()
        return result

    assert run(main()).exit_layer == TINY_LAYERS


def test_queue_full_and_deadline(tokenizer, slow):
    model = slow(delay=0.2)  # each layer step far outlasts the 50 ms deadline below
    encoded = encode(tokenizer, ["a", "b", "c"], max_length=16)

    async def main():
        sched = scheduler_for(model, max_queue_size=2)
        with pytest.raises(QueueFull):
            sched.submit(make_samples(encoded, 1.0))  # 3 > 2: all or nothing
        first = make_samples(encoded[:1], 1.0)
        sched.submit(first)
        while first[0].started is None:  # the worker is now busy with `first`'s first layer for 200 ms
            await asyncio.sleep(0.001)
        expired = make_samples(encoded[1:2], 1.0, deadline_s=0.05)
        sched.submit(expired)
        with pytest.raises(DeadlineExceeded):
            await expired[0].future
        await first[0].future
        sched.stop()

    run(main())


def test_a_step_is_recorded_before_its_exited_samples_are_answered(tokenizer, slow):
    seen = []  # per exited sample: was it already answered when on_step ran?
    encoded = encode(tokenizer, ["one", "two words", "three more words"], max_length=32)

    async def main():
        sched = LayerScheduler(slow(), ExitCriterion("max-prob", TINY_LAYERS),
                               on_step=lambda st: seen.extend(s.finished is not None for s in st.exited))
        sched.start()
        samples = make_samples(encoded, [0.0, 1.0, 1.0])  # exits at layer 1, and at the last layer
        sched.submit(samples)
        await asyncio.gather(*(s.future for s in samples))
        sched.stop()

    run(main())
    assert seen == [False, False, False]


def test_the_learned_rules_memory_travels_with_each_sample(tokenizer, sst2_texts, backend_name, backend_for):
    """Samples regroup between steps; each carries its own rule memory, so served = alone."""
    from exitserve.models.inference import record_all_layers
    from exitserve.models.rule_fitting import fit_rule

    model = RecordingBackend(backend_for(backend_name, make_model(seed=3)))  # its layer 2 exits agree half the time
    encoded = encode(tokenizer, sst2_texts[:40], max_length=64)
    rule = fit_rule(record_all_layers(model.inner, encoded), False, None, {})
    crit = ExitCriterion("learned", TINY_LAYERS, rule=rule)
    thresholds = [0.5 + 0.05 * (i % 10) for i in range(len(encoded))]
    alone = [predict(model.inner, crit, [e], [t] * TINY_LAYERS)[0] for e, t in zip(encoded, thresholds, strict=True)]

    async def main():
        sched = LayerScheduler(model, crit, max_batch_size=8)
        sched.start()
        samples = make_samples(encoded, thresholds)
        for i in range(0, len(samples), 4):
            sched.submit(samples[i : i + 4])
            await asyncio.sleep(0)
        out = await asyncio.gather(*(s.future for s in samples))
        sched.stop()
        return out

    served = run(main())
    assert len({p.exit_layer for p in alone}) >= 2
    assert [(p.exit_layer, p.label_id) for p in served] == [(p.exit_layer, p.label_id) for p in alone]
    assert [p.confidence for p in served] == pytest.approx([p.confidence for p in alone], rel=1e-5)
