"""The scheduler's worker, driven directly from an event loop, under a run-step policy (fcfs) and a
layer-step one (layered): answers as alone, exits cost their layers, failures stay in their step,
queue limits and deadlines, metrics before answers."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from exitserve.models.criteria import ExitCriterion
from exitserve.models.encoding import encode
from exitserve.models.inference import predict
from exitserve.server.policy import Limits, make_policy
from exitserve.server.scheduler import DeadlineExceeded, QueueFull, Scheduler
from exitserve.server.steps import Sample
from tests.conftest import TINY_LAYERS, RecordingBackend, make_model

POLICIES = ("fcfs", "layered")


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
    return [Sample(e, np.full(TINY_LAYERS, t, np.float32), loop.create_future(), loop, time.monotonic() + deadline_s)
            for e, t in zip(encoded, rows, strict=True)]


def scheduler_for(backend, policy: str = "fcfs", max_batch_size: int = 32, start: bool = True,
                  criterion: ExitCriterion | None = None, **kw) -> Scheduler:
    sched = Scheduler(backend, criterion or ExitCriterion("max-prob", TINY_LAYERS), make_policy(policy),
                      Limits(max_batch_size), **kw)
    if start:
        sched.start()
    return sched


async def answered(sched: Scheduler, samples: list[Sample], per_request: int | None = None) -> list:
    """Submit `samples` as requests of `per_request` inputs (None: one request), letting the loop run
    between them; their answers once all are in. Stops the scheduler."""
    size = per_request or len(samples)
    for i in range(0, len(samples), size):
        sched.submit(samples[i : i + size])
        await asyncio.sleep(0)
    out = await asyncio.gather(*(s.future for s in samples))
    sched.stop()
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_answers_under_concurrent_load_equal_answers_alone(tokenizer, sst2_texts, slow, policy):
    model = slow()
    crit = ExitCriterion("max-prob", TINY_LAYERS)
    encoded = encode(tokenizer, sst2_texts[:60], max_length=64)
    thresholds = [0.5 + 0.01 * (i % 10) for i in range(len(encoded))]  # per-request thresholds
    alone = [predict(model.inner, crit, [e], [t] * TINY_LAYERS)[0] for e, t in zip(encoded, thresholds, strict=True)]

    async def main():  # 12 "requests" of 5 inputs arriving concurrently
        return await answered(scheduler_for(model, policy, max_batch_size=8), make_samples(encoded, thresholds), 5)

    served = run(main())
    assert len({p.exit_layer for p in alone}) >= 2
    assert [p.exit_layer for p in served] == [p.exit_layer for p in alone]
    assert [p.label_id for p in served] == [p.label_id for p in alone]
    assert max(rows for _, rows, _, _ in model.log) > 1  # rows from different requests were batched


def test_layer_steps_answer_an_easy_input_before_a_hard_one_submitted_with_it(tokenizer, slow):
    model = slow(delay=0.01)
    encoded = encode(tokenizer, ["easy one", "hard one"], max_length=32)

    async def main():
        sched = scheduler_for(model, "layered")
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


def test_layer_steps_start_new_arrivals_without_waiting_for_the_deepest_sample(tokenizer, slow):
    model = slow(delay=0.05)
    encoded = encode(tokenizer, ["first arrival", "late arrival"], max_length=32)

    async def main():
        sched = scheduler_for(model, "layered")
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


def test_a_run_step_answers_each_row_at_its_own_exit_and_the_next_step_waits_for_it(tokenizer, slow):
    model = slow(delay=0.02)
    encoded = encode(tokenizer, ["easy one", "hard one", "a late arrival"], max_length=32)

    async def main():
        sched = scheduler_for(model, "fcfs", start=False)
        easy, hard, late = make_samples(encoded, [0.0, 1.0, 1.0])
        sched.submit([hard, easy])
        sched.start()
        while hard.started is None:
            await asyncio.sleep(0.001)
        sched.submit([late])
        await asyncio.gather(easy.future, hard.future, late.future)
        sched.stop()
        return easy, hard, late

    easy, hard, late = run(main())
    assert easy.future.result().exit_layer == 1 and hard.future.result().exit_layer == TINY_LAYERS
    assert easy.finished == pytest.approx(hard.finished, abs=0.01)  # one step answers both
    assert late.started >= hard.finished  # run steps do not interleave
    assert [rows for index, rows, _, _ in model.log][:2] == [2, 1]  # layer 1 on both, then the hard one alone


@pytest.mark.parametrize("policy", POLICIES)
def test_a_sample_that_exits_at_layer_k_costs_k_layers(tokenizer, sst2_texts, slow, policy):
    model = slow()
    encoded = encode(tokenizer, sst2_texts[:40], max_length=64)

    async def main():
        samples = make_samples(encoded, [0.5 + 0.01 * (i % 10) for i in range(len(encoded))])
        return await answered(scheduler_for(model, policy, max_batch_size=16), samples)

    model.log.clear()
    results = run(main())
    assert sum(rows for _, rows, _, _ in model.log) == sum(r.exit_layer for r in results)
    assert len({r.exit_layer for r in results}) >= 2


@pytest.mark.parametrize("policy", POLICIES)
def test_a_failing_step_fails_only_its_requests_and_the_worker_keeps_serving(tokenizer, slow, policy):
    encoded = encode(tokenizer, ["this one breaks the model badly", "fine"], max_length=32)
    model = slow(fail_width=len(encoded[0]))

    async def main():
        sched = scheduler_for(model, policy)
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


@pytest.mark.parametrize("policy", POLICIES)
def test_queue_full_and_deadline(tokenizer, slow, policy):
    model = slow(delay=0.2)  # each layer far outlasts the 50 ms deadline below
    encoded = encode(tokenizer, ["a", "b", "c"], max_length=16)

    async def main():
        sched = scheduler_for(model, policy, max_queue_size=2)
        with pytest.raises(QueueFull):
            sched.submit(make_samples(encoded, 1.0))  # 3 > 2: all or nothing
        first = make_samples(encoded[:1], 1.0)
        sched.submit(first)
        while first[0].started is None:  # the worker is now busy with `first` for >= 200 ms
            await asyncio.sleep(0.001)
        expired = make_samples(encoded[1:2], 1.0, deadline_s=0.05)
        sched.submit(expired)
        with pytest.raises(DeadlineExceeded):
            await expired[0].future
        await first[0].future
        sched.stop()

    run(main())


@pytest.mark.parametrize("policy", POLICIES)
def test_a_step_is_recorded_before_its_samples_are_answered(tokenizer, slow, policy):
    seen = []  # per step: were none of its answers out yet when on_step ran?
    encoded = encode(tokenizer, ["one", "two words", "three more words"], max_length=32)

    async def main():
        samples = make_samples(encoded, [0.0, 1.0, 1.0])  # exits at layer 1, and at the last layer
        counted = [0]

        def on_step(stats):
            seen.append(sum(s.finished is not None for s in samples) == counted[0])
            counted[0] += len(stats.answered)

        await answered(scheduler_for(slow(), policy, on_step=on_step), samples)
        return counted[0]

    assert run(main()) == 3
    assert seen and all(seen)


def test_slo_admission_sheds_what_the_cost_model_says_cannot_make_it(tokenizer, slow):
    from exitserve.server.cost import StepCost
    from exitserve.server.scheduler import SloUnreachable

    encoded = encode(tokenizer, ["a few words"] * 40, max_length=16)

    async def main():
        cost = StepCost(overhead=0.01, rate=0.001, mean_layers=TINY_LAYERS, min_steps=10**9)  # a fixed model
        sched = scheduler_for(slow(), "fcfs", max_batch_size=4, start=False, slo=0.05, cost=cost)
        sched.check_slo([len(encoded[0])])  # alone: 10 ms + 5 tokens x 4 layers x 1 ms = 30 ms < 50 ms
        sched.submit(make_samples(encoded[:8], 1.0))  # two steps of work queued ahead
        with pytest.raises(SloUnreachable) as refused:
            sched.check_slo([len(encoded[0])])
        return refused.value

    refused = run(main())
    assert "over the 50 ms SLO" in str(refused) and refused.retry_after > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_the_learned_rules_memory_travels_with_each_sample(tokenizer, sst2_texts, backend_name, backend_for, policy):
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
        return await answered(scheduler_for(model, policy, max_batch_size=8, criterion=crit),
                              make_samples(encoded, thresholds), 4)

    served = run(main())
    assert len({p.exit_layer for p in alone}) >= 2
    assert [(p.exit_layer, p.label_id) for p in served] == [(p.exit_layer, p.label_id) for p in alone]
    assert [p.confidence for p in served] == pytest.approx([p.confidence for p in alone], rel=1e-5)
