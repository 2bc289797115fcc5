"""The layer-level continuous-batching scheduler: turns skipped layers into throughput.

Pipeline: the HTTP handler tokenises (off the event loop) and `submit`s one `Sample` per input to a
bounded FIFO admission queue (full: QueueFull, 429); a single worker thread runs the model one layer
at a time; each sample's future is resolved on the event loop the moment it exits.

Every sample in flight waits at a *layer boundary* (its next layer k, 0 = not started). Samples at
the same boundary form a group, whatever request they came from. One scheduler step:

  1. drops samples whose future was cancelled (the client went away), queued or in flight; answers
     queued samples whose deadline has passed (DeadlineExceeded, 503); and admits queued samples,
     oldest first, into group 0 while it holds fewer than two batches (`admit_window`). Admission is
     bounded so the queue, not group 0, holds the backlog under overload: the queue is what the 429
     and deadline checks see, and what keeps in-flight work (and memory) bounded;
  2. picks ONE group to advance -- the one holding the sample that has waited longest since it
     last advanced: least-recently-advanced first (an admitted sample counts from its arrival if
     it arrived during the latest step, else from its admission: time spent in the queue does not
     count, so a backlog cannot starve the samples already in flight). This is starvation-free: an
     admitted sample starts layer 1 after at most one step per occupied group (<= L + 1 steps),
     instead of waiting for the deepest in-flight sample to finish; and because survivors of
     layer k join the samples already waiting at k + 1, groups coalesce into larger batches under
     load;
  3. cuts a batch from that group, length-aware: rows sorted by length, a contiguous window
     around the longest-waiting row, at most `max_batch_size` rows and `max_batch_tokens` padded
     tokens;
  4. has the runtime backend (models/backends) pad the rows' hidden states (real tokens only are
     stored per sample) and run layer k and exit k, and decides exits with the same rule as the
     library (`models.criteria.exits_now`); a step in which no row could exit skips the exit head;
  5. answers exited samples at once; the rest move to group k + 1.

So a sample that exits at layer k has run exactly k layers, and its result depends only on its
own tokens (rows never interact inside a layer; padding is masked), not on what else is in flight.
An exception in a step fails only that batch's samples; the worker keeps serving.

Audited samples (shadow audits, server/audit.py). A sample submitted with an `AuditTrace` records
every layer's exit output. It is answered at its exit exactly as any other sample (same step, same
answer, same timings), and then -- if the audit is kept -- continues to the last layer in a separate
set of audit groups, only to learn what the full model would have answered:

  - lower priority than any unanswered work: an audit step runs only when, after admission, no
    unanswered sample is queued or in flight, and audit rows never share a batch with unanswered
    rows. So an audit never delays an unanswered input, except that one arriving while an audit
    step runs waits for that one step (at most `max_batch_size` rows of one layer), as it would
    wait for any step in progress. Audit batches are cut and picked by the same rules;
  - dropped first under overload: an audit is kept only if, at its exit step, no input is waiting
    in the admission queue (a backlog) and fewer than `audit_capacity` audits are pending; else it
    is dropped (counted). One decision per step for every exit alike, the last layer's included,
    so which audits survive does not depend on where they exited (no bias toward late exits).
    Pending audits hold no queue room, so they never cause a 429, and never run while inputs
    wait, so they never cause a deadline miss; on stop they are dropped, not drained;
  - not counted as served work: `on_step` (layers saved, batch sizes) sees only unanswered work;
    `on_audit` gets an `AuditReport` per step with the audit layers run, the audits completed
    (exit at the last layer: completed at once, no extra layer) and the audits dropped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from exitserve.models.answers import LayerTrace, Prediction, decode
from exitserve.models.backends import Backend
from exitserve.models.backends.base import Row
from exitserve.models.criteria import ExitCriterion, exits_now
from exitserve.models.encoding import Encoded
from exitserve.models.inference import needs_exit
from exitserve.server.audit import AuditReport, AuditTrace

log = logging.getLogger("exitserve")


class QueueFull(Exception):
    """The admission queue has no room for the request's samples (answered 429)."""


class DeadlineExceeded(Exception):
    """The sample waited in the queue past its deadline (answered 503)."""


class SchedulerStopped(Exception):
    """The scheduler is shut down."""


@dataclass(eq=False)
class Sample:
    encoded: Encoded
    thresholds: torch.Tensor  # [L]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic()
    trace: list[LayerTrace] | None = None
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # first layer began
    finished: float | None = None
    waiting_since: float = field(default_factory=time.monotonic)
    next_layer: int = 0
    hidden: Row | None = None  # [len, H] after `next_layer` layers, in the backend's array type
    memory: torch.Tensor | None = None  # criterion memory row
    audit: AuditTrace | None = None  # set: a shadow audit (see the module docstring)

    @property
    def answered(self) -> bool:
        """An audit still running after its answer went out."""
        return self.audit is not None and self.audit.exit_layer > 0

    def resolve(self, result: Prediction | BaseException) -> None:
        if self.finished is not None:
            return  # answered already (an audit's later failure changes nothing)
        self.finished = time.monotonic()

        def _set() -> None:
            if self.future.done():
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(_set)


@dataclass
class StepStats:
    layer: int  # 1-based layer just run
    batch_size: int
    exited: list[Sample]


class LayerScheduler:
    """The policy (which group runs next, which rows form its batch) and the step that runs it on a
    runtime `Backend`; see the module docstring. `submit` is called from the event loop, everything
    else runs on the scheduler's one worker thread."""

    def __init__(
        self,
        backend: Backend,
        criterion: ExitCriterion,
        max_batch_size: int = 32,
        max_batch_tokens: int = 8192,
        max_queue_size: int = 512,
        on_step: Callable[[StepStats], None] | None = None,
        on_audit: Callable[[AuditReport], None] | None = None,
    ):
        self.backend, self.criterion = backend, criterion
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.max_queue_size = max_queue_size
        self.admit_window = 2 * max_batch_size  # group 0 candidates: room for length-aware batching
        self.audit_capacity = self.admit_window  # audits pending beyond this are dropped
        self.on_step, self.on_audit = on_step, on_audit
        self.num_layers = backend.num_layers
        self._queue: deque[Sample] = deque()
        self._groups: list[list[Sample]] = [[] for _ in range(self.num_layers)]
        self._audits: list[list[Sample]] = [[] for _ in range(self.num_layers)]  # answered, by next layer
        self._audits_stepping = 0  # audit rows taken out of `_audits` by the step running now
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._step_started = 0.0  # time.monotonic() when the latest step began

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
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return sum(len(g) for g in self._groups)

    @property
    def audits_pending(self) -> int:
        """Audits not yet completed or dropped: waiting for a layer, or in the step running now."""
        return sum(len(g) for g in self._audits) + self._audits_stepping

    @property
    def room(self) -> int:
        """Samples the queue can still take."""
        return self.max_queue_size - len(self._queue)

    def check_room(self, count: int, reserved: int = 0) -> None:
        """Raise SchedulerStopped, or QueueFull if `count` more samples (besides `reserved` ones
        promised elsewhere) would not fit now."""
        if self._stopping:
            raise SchedulerStopped("the server is shutting down")
        if count + reserved > self.room:
            raise QueueFull(f"queue full ({self.max_queue_size} inputs waiting)")

    def submit(self, samples: list[Sample]) -> None:
        """Queue all of a request's samples, or none (QueueFull)."""
        with self._cv:
            self.check_room(len(samples))
            now = time.monotonic()
            for sample in samples:
                sample.submitted = now
            self._queue.extend(samples)
            self._cv.notify()

    # ---- the worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stopping and not self._queue and not self.in_flight and not self.audits_pending:
                    self._cv.wait()
                if self._stopping and not self._queue and not self.in_flight:
                    pending = [s for g in self._audits for s in g]
                    for g in self._audits:
                        g.clear()
                    self._drop_audits(pending)  # shutdown does not wait for audits
                    return
                self._admit()
            groups = self._groups if self.in_flight else self._audits  # audits only when nothing unanswered waits
            group = self._pick_group(groups)
            if group is None:
                continue
            batch = self._cut_batch(groups[group])
            for sample in batch:
                groups[group].remove(sample)
            self._audits_stepping = len(batch) if groups is self._audits else 0
            self._step_started = time.monotonic()
            try:
                self._step(group, batch)
            except Exception as exc:  # fail this batch only; keep serving
                for sample in batch:
                    sample.resolve(exc)
                self._drop_audits([s for s in batch if s.next_layer == group])  # those not moved on
            finally:
                self._audits_stepping = 0

    def _drop_audits(self, samples: list[Sample]) -> None:
        """Forget the audits of `samples` (shutdown, or a failed step), counted as dropped."""
        dropped = [s for s in samples if s.audit is not None]
        for sample in dropped:
            sample.audit = sample.hidden = sample.memory = None
        self._report_audits(AuditReport(dropped=len(dropped)))

    def _report_audits(self, report: AuditReport) -> None:
        if self.on_audit is None or not (report.layers or report.completed or report.dropped):
            return
        try:
            self.on_audit(report)
        except Exception:  # audits are a side measurement: they never fail an answer or the worker
            log.exception("recording an audit report failed")

    def _admit(self) -> None:
        now = time.monotonic()
        if any(s.future.cancelled() or now > s.deadline for s in self._queue):
            kept: deque[Sample] = deque()
            for sample in self._queue:
                if sample.future.cancelled():
                    continue  # the client went away while queued: nothing to compute
                if now > sample.deadline:
                    sample.resolve(DeadlineExceeded("request deadline passed while queued"))
                    continue
                kept.append(sample)
            self._queue = kept
        for group in self._groups:
            if any(s.future.cancelled() for s in group):
                group[:] = [s for s in group if not s.future.cancelled()]
        while self._queue and len(self._groups[0]) < self.admit_window:
            sample = self._queue.popleft()
            sample.waiting_since = sample.submitted if sample.submitted >= self._step_started else now
            self._groups[0].append(sample)

    @staticmethod
    def _pick_group(groups: list[list[Sample]]) -> int | None:
        waiting = [(min(s.waiting_since for s in g), k) for k, g in enumerate(groups) if g]
        return min(waiting)[1] if waiting else None

    def _cut_batch(self, group: list[Sample]) -> list[Sample]:
        rows = sorted(group, key=lambda s: len(s.encoded))
        anchor = min(range(len(rows)), key=lambda i: rows[i].waiting_since)
        lo = hi = anchor  # the window is rows[lo : hi + 1]
        while hi - lo + 1 < self.max_batch_size:
            left = rows[lo - 1] if lo > 0 else None
            right = rows[hi + 1] if hi + 1 < len(rows) else None
            if left is None and right is None:
                break
            # grow towards the neighbour closer in length (less padding)
            grow_right = left is None or (
                right is not None and len(right.encoded) - len(rows[hi].encoded)
                <= len(rows[lo].encoded) - len(left.encoded)
            )
            width = len(rows[hi + 1].encoded) if grow_right else len(rows[hi].encoded)
            if (hi - lo + 2) * width > self.max_batch_tokens:
                break
            lo, hi = (lo, hi + 1) if grow_right else (lo - 1, hi)
        return rows[lo : hi + 1]

    def _step(self, layer: int, batch: list[Sample]) -> None:
        """Run layer `layer` on a batch of unanswered samples, or (idle time) of answered audits only."""
        now = time.monotonic()
        lengths = np.array([len(s.encoded) for s in batch])
        if layer == 0:
            for s in batch:
                s.started = now
            hidden = self.backend.embed([s.encoded for s in batch])
            memory = self.criterion.initial_memory(len(batch))
        else:
            hidden = self.backend.stack([s.hidden for s in batch])
            memory = torch.stack([s.memory for s in batch]) if batch[0].memory is not None else None
        last = layer == self.num_layers - 1
        thresholds = torch.stack([s.thresholds[layer] for s in batch])
        traced = any(s.trace is not None or s.audit is not None for s in batch)  # audits record every exit
        attention = self.backend.attention(lengths)
        hidden, out = self.backend.layer(layer, hidden, attention, needs_exit(self.criterion, thresholds, last, traced))
        if out is None:
            leave, conf = [False] * len(batch), None
        else:
            conf, memory = self.criterion.confidence(out.logits, out.lte, memory)
            leave = exits_now(conf, thresholds, last).tolist()

        auditing = batch[0].answered  # an audit step: every row was answered before
        audits = AuditReport(layers=len(batch) if auditing else 0)
        keep = not self._queue and self.audits_pending < self.audit_capacity  # for this step's audited exits
        goes_on = not last and any(s.answered or not leave[i] or (s.audit is not None and keep)
                                   for i, s in enumerate(batch))
        rows = self.backend.rows(hidden, lengths.tolist()) if goes_on else []
        exited, answers = [], []
        for i, s in enumerate(batch):
            if s.trace is not None:
                value, _, _ = decode(out.logits[i], self.criterion.regression)
                s.trace.append(LayerTrace(layer + 1, float(conf[i]), value))
            if s.audit is not None:
                s.audit.record(out, i)
            if leave[i] and not s.answered:
                value, label, probs = decode(out.logits[i], self.criterion.regression)
                answers.append(Prediction(layer + 1, float(conf[i]), value, label, probs, s.trace))
                exited.append(s)
                if s.audit is not None and keep:
                    s.audit.exit_layer = layer + 1
                elif s.audit is not None:
                    s.audit, audits.dropped = None, audits.dropped + 1
            if s.answered and last:
                audits.completed.append(s.audit)
            if last or (leave[i] and not s.answered):
                s.hidden = s.memory = None  # done: answered, and audited to the end or not audited
            else:
                s.hidden = rows[i]
                s.memory = memory[i] if memory is not None else None
                s.next_layer = layer + 1
                s.waiting_since = time.monotonic()
                (self._audits if s.answered else self._groups)[layer + 1].append(s)
        # the step is recorded before anyone is answered: a client holding its answer finds it in the metrics
        try:
            if self.on_step is not None and not auditing:
                self.on_step(StepStats(layer + 1, len(batch), exited))
            self._report_audits(audits)
        finally:
            for s, answer in zip(exited, answers, strict=True):
                s.resolve(answer)
