"""The scheduler: the admission queue, the worker thread that runs one step at a time, the answers.

    submit (event loop)      one `Sample` per input into a bounded FIFO queue: all of a request's
                             samples or none (QueueFull: 429); with `slo` set, a request the cost model
                             predicts cannot be answered within it is refused at once (SloUnreachable:
                             429 with Retry-After) instead of being served late
    worker (one thread)      before every step: drops samples whose client went away, answers queued
                             samples past their deadline (DeadlineExceeded: 503), asks the POLICY for
                             the next step (server/policy.py: a pure function of what waits), and runs
                             it (server/steps.py) on the runtime backend
    answers                  every sample a step answers resolves its future on the event loop at once;
                             the step is recorded first (`on_step`), so a client holding its answer
                             finds it in the metrics

An exception in a step fails only that step's samples; the worker keeps serving.

Shadow audits (server/audit.py). A sample submitted with `audit=True` is answered at its exit like any
other, then -- if the audit is kept -- waits with the answered audits and runs again to the last layer
(a run step with every threshold at 1.0, traced), only to learn what the full model would have said:

  - lower priority than any unanswered work: policies give audits a step only when nothing
    unanswered waits, and audit rows never share a step with unanswered rows. An input arriving while
    an audit step runs waits for that one step, as it would for any step in progress;
  - dropped first under overload: an audit is kept only if, when its sample is answered, no input
    waits in the queue and fewer than `audit_capacity` audits are pending; else it is dropped (counted).
    Pending audits hold no queue room, so they never cause a 429 or a deadline miss; on stop they are
    dropped, not drained. A sample answered at the last layer needs no audit run (it ran every layer);
  - not counted as served work: `on_step` (layers saved, batch sizes) sees only answers; `on_audit`
    gets an `AuditReport` per step: the layers audit steps ran, the audits completed and dropped.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from exitserve.models.answers import ExitRecord, Prediction
from exitserve.models.backends import Backend
from exitserve.models.criteria import ExitCriterion
from exitserve.server.cost import StepCost
from exitserve.server.policy import LAYER, Limits, Policy, Step
from exitserve.server.steps import Answer, Sample, StepOutcome, run_step
from exitserve.server.waitlist import Waitlist

log = logging.getLogger("exitserve")


class QueueFull(Exception):
    """The admission queue has no room for the request's samples (answered 429)."""


class SloUnreachable(Exception):
    """The request is predicted to miss `slo_ms` (answered 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """The sample waited in the queue past its deadline (answered 503)."""


class SchedulerStopped(Exception):
    """The scheduler is shut down."""


@dataclass
class StepStats:
    mode: str  # the step's kind (policy.RUN / policy.LAYER)
    batch_size: int
    answered: list[Prediction]
    seconds: float


@dataclass
class AuditReport:
    """What one step did for audits."""

    layers: int = 0  # layers audit steps ran: work beyond the answers
    completed: list[ExitRecord] = field(default_factory=list)  # audits whose every layer is known
    dropped: int = 0


class Scheduler:
    """See the module docstring. `submit` and the properties are called from the event loop; the
    policy and the steps run on the scheduler's one worker thread."""

    def __init__(
        self, backend: Backend, criterion: ExitCriterion, policy: Policy, limits: Limits | None = None,
        max_queue_size: int = 512, slo: float | None = None, cost: StepCost | None = None,
        on_step: Callable[[StepStats], None] | None = None, on_audit: Callable[[AuditReport], None] | None = None,
    ):
        self.backend, self.criterion, self.policy = backend, criterion, policy
        self.limits = limits = limits or Limits()
        self.max_queue_size, self.slo = max_queue_size, slo
        self.cost = cost or StepCost()
        self.on_step, self.on_audit = on_step, on_audit
        self.admit_window = 2 * limits.max_batch_size  # what a policy sees of the queue
        self.audit_capacity = self.admit_window  # audits pending beyond this are dropped
        self.waiting: Waitlist[Sample] = Waitlist(backend.num_layers, self.admit_window)
        self._stepping: list[Sample] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._step_started = 0.0
        self._step_predicted = 0.0  # predicted seconds of the step running now

    # ---- the event-loop side --------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker (again, after `stop`: test harnesses run an app's lifespan more than once)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the scheduler is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="exitserve-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queue_size(self) -> int:
        return len(self.waiting.queue)

    @property
    def in_flight(self) -> int:
        """Unanswered samples stopped between layers or in the step running now."""
        return self.waiting.started() + sum(1 for s in self._stepping if s.finished is None)

    @property
    def audits_pending(self) -> int:
        """Audits not yet completed or dropped: waiting for their run, or in the step running now."""
        return len(self.waiting.audits) + sum(1 for s in self._stepping if s.finished is not None)

    @property
    def room(self) -> int:
        """Samples the queue can still take."""
        return self.max_queue_size - len(self.waiting.queue)

    def check_room(self, count: int, reserved: int = 0) -> None:
        """Raise SchedulerStopped, or QueueFull if `count` more samples (besides `reserved` ones
        promised elsewhere) would not fit now."""
        if self._stopping:
            raise SchedulerStopped("the server is shutting down")
        if count + reserved > self.room:
            raise QueueFull(f"queue full ({self.max_queue_size} inputs waiting)")

    def predicted_wait(self, tokens: list[int]) -> float:
        """Seconds until inputs of these lengths, queued now, would be answered: the step running now,
        the work queued ahead of them, and their own (the cost model's prediction)."""
        cost = self.cost
        ahead = [s.tokens for s in self.waiting.queue] + [s.tokens for g in self.waiting.groups for s in g]
        running = max(self._step_predicted - (time.monotonic() - self._step_started), 0.0) if self._stepping else 0.0
        rows = len(ahead) + len(tokens)
        steps = max(1, math.ceil(rows / self.limits.max_batch_size))
        return running + cost.seconds(cost.work(ahead) + cost.work(tokens), steps)

    def check_slo(self, tokens: list[int]) -> float:
        """The predicted wait of inputs of these lengths (predicted_wait); SloUnreachable when it is over
        `slo` (which must be set)."""
        assert self.slo is not None
        wait = self.predicted_wait(tokens)
        if wait > self.slo:
            ahead = wait - self.cost.run_seconds(tokens)
            raise SloUnreachable(f"predicted to be answered in {wait * 1000:.0f} ms, over the "
                                 f"{self.slo * 1000:.0f} ms SLO", max(ahead, 0.001))
        return wait

    def submit(self, samples: list[Sample]) -> None:
        """Queue all of a request's samples, or none (QueueFull)."""
        with self._cv:
            self.check_room(len(samples))
            now = time.monotonic()
            for sample in samples:
                sample.submitted = now
                if self.slo is not None:
                    sample.slo_deadline = now + self.slo
            self.waiting.queue.extend(samples)
            self._cv.notify()

    # ---- the worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        waiting = self.waiting
        while True:
            with self._cv:
                while not self._stopping and waiting.idle():
                    self._cv.wait()
                if self._stopping and not waiting.queue and not waiting.started():
                    self._drop_audits(waiting.audits)  # shutdown does not wait for audits
                    waiting.audits.clear()
                    return
                now = time.monotonic()
                self._expire(now)
                step = self.policy.choose(waiting.view(now, self._step_started), self.limits)
                if step is None:
                    continue
                batch = waiting.take(step)
            self._execute(step, batch)

    def _expire(self, now: float) -> None:
        """Forget samples whose client went away; answer queued ones past their deadline."""
        waiting = self.waiting
        if any(s.future.cancelled() or now > s.deadline for s in waiting.queue):
            kept: deque[Sample] = deque()
            for sample in waiting.queue:
                if sample.future.cancelled():
                    continue  # the client went away while queued: nothing to compute
                if now > sample.deadline:
                    sample.resolve(DeadlineExceeded("request deadline passed while queued"))
                    continue
                kept.append(sample)
            waiting.queue = kept
        for group in waiting.groups:
            if any(s.future.cancelled() for s in group):
                group[:] = [s for s in group if not s.future.cancelled()]

    def _execute(self, step: Step, batch: list[Sample]) -> None:
        self._stepping = batch
        self._step_started = started = time.monotonic()
        layers = 1 if step.mode == LAYER else self.cost.mean_layers
        self._step_predicted = self.cost.seconds(sum(s.tokens for s in batch) * layers)
        for s in batch:
            if s.started is None:
                s.started = started
        try:
            outcome = run_step(self.backend, self.criterion, step, batch)
        except Exception as exc:  # fail this step only; keep serving
            for sample in batch:
                sample.resolve(exc)
            self._drop_audits([s for s in batch if s.audit])
            return
        finally:
            self._stepping = []
        seconds = time.monotonic() - started
        self.cost.observe(outcome.work, seconds, len(outcome.answered), outcome.layers)
        now = time.monotonic()
        for s in outcome.waiting:
            self.waiting.park(s, now)
        self._finish(step, outcome, seconds)

    def _finish(self, step: Step, outcome: StepOutcome, seconds: float) -> None:
        """Record the step, keep or drop its audits, then answer (in that order: see the module docstring)."""
        report = AuditReport(layers=outcome.layers if step.audit else 0)
        answers: list[Answer] = []
        if step.audit:
            report.completed = [a.record for a in outcome.answered if a.record is not None]
        else:
            keep = not self.waiting.queue and self.audits_pending < self.audit_capacity
            for a in outcome.answered:
                answers.append(a)
                if not a.sample.audit:
                    continue
                if a.record is not None:
                    report.completed.append(a.record)  # answered at the last layer: nothing more to run
                elif keep:
                    a.sample.exit_layer = a.prediction.exit_layer
                    self.waiting.audits.append(a.sample)
                else:
                    report.dropped += 1
        try:
            if self.on_step is not None and not step.audit:
                self.on_step(StepStats(step.mode, len(outcome.answered) + len(outcome.waiting),
                                       [a.prediction for a in answers], seconds))
            self._report_audits(report)
        finally:
            for a in answers:
                a.sample.resolve(a.prediction)

    def _drop_audits(self, samples: list[Sample]) -> None:
        """Forget the audits of `samples` (shutdown, or a failed step), counted as dropped."""
        self._report_audits(AuditReport(dropped=len(samples)))

    def _report_audits(self, report: AuditReport) -> None:
        if self.on_audit is None or not (report.layers or report.completed or report.dropped):
            return
        try:
            self.on_audit(report)
        except Exception:  # audits are a side measurement: they never fail an answer or the worker
            log.exception("recording an audit report failed")
