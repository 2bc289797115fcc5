"""Shadow audits in the scheduler: same answers, lower priority, dropped first under overload."""

from __future__ import annotations

import asyncio
import time

import pytest

from exitserve.models.answers import answers
from exitserve.models.criteria import ExitCriterion
from exitserve.models.encoding import encode
from exitserve.models.inference import predict
from exitserve.server.policy import Limits, make_policy
from exitserve.server.scheduler import AuditReport, QueueFull, Scheduler
from tests.conftest import TINY_LAYERS, RecordingBackend, make_model, torch_backend
from tests.server.test_scheduler import make_samples, run


class LoggedScheduler(Scheduler):
    """Logs every step (start time, audit step or not, rows, unanswered inputs waiting) and collects the
    audit reports."""

    def __init__(self, backend, policy: str = "fcfs", max_batch_size: int = 32, **kw):
        self.steps: list[tuple[float, bool, int, int]] = []
        self.reports: list[AuditReport] = []
        super().__init__(backend, ExitCriterion("max-prob", TINY_LAYERS), make_policy(policy),
                         Limits(max_batch_size), on_audit=self.reports.append, **kw)

    def _execute(self, step, batch) -> None:
        self.steps.append((time.monotonic(), step.audit, len(batch), self.queue_size + self.in_flight))
        super()._execute(step, batch)

    def completed(self):
        return [t for r in self.reports for t in r.completed]

    def dropped(self) -> int:
        return sum(r.dropped for r in self.reports)

    def audit_layers(self) -> int:
        return sum(r.layers for r in self.reports)


def slow_backend(delay: float = 0.0) -> RecordingBackend:
    """The seed-11 tiny model on torch, sleeping `delay` s in every layer, every layer call logged."""
    return RecordingBackend(torch_backend(make_model(seed=11)), delay)


def audited(samples):
    for s in samples:
        s.audit = True
    return samples


async def until(condition, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("policy", ["fcfs", "layered"])
def test_audits_change_no_answer_and_record_what_the_last_layer_says(tokenizer, sst2_texts, policy):
    backend = slow_backend()
    encoded = encode(tokenizer, sst2_texts[:40], max_length=64)
    thresholds = [0.5 + 0.01 * (i % 10) for i in range(len(encoded))]

    async def serve(audit: bool):
        sched = LoggedScheduler(backend, policy, max_batch_size=64)  # one step for all 40: no backlog, no drop
        samples = make_samples(encoded, thresholds)
        if audit:
            audited(samples)
        for i in range(0, len(samples), 5):  # all queued before the worker starts: a request arriving while
            sched.submit(samples[i : i + 5])  # a step runs would be a backlog, and audits are dropped then
        sched.start()
        out = await asyncio.gather(*(s.future for s in samples))
        await until(lambda: len(sched.completed()) == (len(samples) if audit else 0))
        sched.stop()
        return out, sched

    backend.log.clear()
    plain, _ = run(serve(False))
    plain_rows = sum(call[1] for call in backend.log)
    backend.log.clear()
    with_audits, sched = run(serve(True))
    audited_rows = sum(call[1] for call in backend.log)
    assert [(p.exit_layer, p.label_id) for p in plain] == [(p.exit_layer, p.label_id) for p in with_audits]
    assert [p.confidence for p in plain] == pytest.approx([p.confidence for p in with_audits], abs=1e-5)
    assert len({p.exit_layer for p in plain}) >= 2 and sched.dropped() == 0

    full = predict(backend.inner, sched.criterion, encoded, [1.0] * TINY_LAYERS)
    served = {(p.exit_layer, p.label_id) for p in with_audits}
    finals = sorted(p.label_id for p in full)
    records = sched.completed()
    assert sorted(int(answers(r.logits[-1], False)) for r in records) == finals  # what the full model answers
    for r in records:
        assert r.logits.shape == (TINY_LAYERS, 2)
        assert (r.exit_layer, int(answers(r.logits[r.exit_layer - 1], False))) in served  # what was served
    rerun = sum(TINY_LAYERS for p in with_audits if p.exit_layer < TINY_LAYERS)  # early exits run again in full
    assert sched.audit_layers() == rerun  # counted apart from the answers' layers
    assert audited_rows == plain_rows + rerun


def test_an_audit_never_delays_an_unanswered_input(tokenizer, sst2_texts):
    backend = slow_backend(0.02)
    encoded = encode(tokenizer, sst2_texts[:17], max_length=64)

    async def main():
        sched = LoggedScheduler(backend, max_batch_size=16)  # one step answers all 16: no backlog, none dropped
        early = audited(make_samples(encoded[:16], 0.0))  # all answered at layer 1, then a full run each
        sched.submit(early)
        sched.start()
        await asyncio.gather(*(s.future for s in early))
        await until(lambda: any(audit for _, audit, *_ in sched.steps))  # audits are running
        newcomer, = make_samples(encoded[16:], 1.0)  # 4 layers, not audited
        sched.submit([newcomer])
        await newcomer.future
        await until(lambda: len(sched.completed()) == 16)
        sched.stop()
        return sched, newcomer

    sched, newcomer = run(main())
    # an audit step never starts while an unanswered input waits, and never mixes with one
    assert all(waiting == 0 for _, audit, _, waiting in sched.steps if audit)
    during = [audit for started, audit, *_ in sched.steps if newcomer.submitted <= started < newcomer.finished]
    assert during == [False]  # at most the audit step running when it arrived, then its own
    assert sched.audit_layers() == 16 * TINY_LAYERS


def test_overload_drops_audits_first_and_audits_never_take_queue_room(tokenizer, sst2_texts):
    backend = slow_backend(0.02)
    encoded = encode(tokenizer, sst2_texts[:8], max_length=64)

    async def main():
        sched = LoggedScheduler(backend, max_batch_size=2, max_queue_size=8)  # 4 steps of 2
        sched.start()
        burst = audited(make_samples(encoded, 0.0))
        sched.submit(burst)
        answers_ = await asyncio.gather(*(s.future for s in burst))
        await until(lambda: sched.audits_pending > 0 or len(sched.completed()) + sched.dropped() == 8)
        room = sched.room  # audits pending or done: the queue's room is whole again
        more = make_samples(encoded, 1.0)
        sched.submit(more)  # 8 more inputs fit (QueueFull would fail the test)
        await asyncio.gather(*(s.future for s in more))
        await until(lambda: len(sched.completed()) + sched.dropped() == 8)
        with pytest.raises(QueueFull):
            sched.check_room(9)
        sched.stop()
        return sched, answers_, room

    sched, answers_, room = run(main())
    assert [a.exit_layer for a in answers_] == [1] * 8  # every input answered as usual
    assert room == 8
    assert sched.dropped() >= 2  # answered while inputs waited in the queue: those audits were dropped
    assert len(sched.completed()) >= 1 and len(sched.completed()) + sched.dropped() == 8


def test_stopping_drops_pending_audits_instead_of_draining_them(tokenizer, sst2_texts):
    backend = slow_backend(0.05)
    encoded = encode(tokenizer, sst2_texts[:4], max_length=64)

    async def main():
        sched = LoggedScheduler(backend, max_batch_size=1)
        samples = audited(make_samples(encoded, 0.0))
        sched.submit(samples)
        sched.start()
        await asyncio.gather(*(s.future for s in samples))
        started = time.monotonic()
        sched.stop()
        return sched, time.monotonic() - started

    sched, stop_s = run(main())
    assert len(sched.completed()) + sched.dropped() == 4 and sched.dropped() >= 1
    assert stop_s < TINY_LAYERS * 0.05 + 0.5  # at most the audit step running, not the rest


def test_an_input_answered_at_the_last_layer_completes_its_audit_at_once(tokenizer, sst2_texts):
    async def main():
        sched = LoggedScheduler(slow_backend())
        samples = audited(make_samples(encode(tokenizer, sst2_texts[:3], max_length=64), 1.0))
        sched.submit(samples)
        sched.start()
        await asyncio.gather(*(s.future for s in samples))
        sched.stop()
        return sched

    sched = run(main())
    assert len(sched.completed()) == 3 and sched.audit_layers() == 0 and all(not a for _, a, *_ in sched.steps)

