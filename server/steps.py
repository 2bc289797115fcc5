"""The step: run what the policy chose (server/policy.py) on the runtime backend, and say what it answered.

  run    `Backend.run` over the rows' token ids, each row's own thresholds: every row leaves at its
         exit (inside one ONNX Runtime graph on the CPU); traced rows (asked for, or audited) get every
         layer's output. An audit step runs answered rows to the last layer (thresholds 1.0).
  layer  the rows' hidden states (padded into a batch; embedded first at layer 0) run layer k and exit
         k; the exit rule is the library's (models.criteria.decide); rows that leave are answered, the
         others keep their state (real tokens only) and their criterion memory for layer k + 1. A step
         in which no row could leave skips the exit head.

So a sample that exits at layer k has run exactly k layers, and its answer depends only on its own
tokens (rows never interact inside a layer; padding is masked), not on what else ran with it.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import numpy as np

from exitserve.models.answers import ExitRecord, LayerTrace, Prediction, decode
from exitserve.models.backends import Backend
from exitserve.models.backends.base import Row, needs_exit
from exitserve.models.criteria import ExitCriterion, decide
from exitserve.models.encoding import Encoded
from exitserve.models.inference import predictions
from exitserve.server.policy import LAYER, Step


@dataclass(eq=False)
class Sample:
    """One input in flight: its tokens, thresholds and the future its answer resolves."""

    encoded: Encoded
    thresholds: np.ndarray  # [L] float32
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic(): answered DeadlineExceeded if still queued then
    slo_deadline: float = math.inf  # arrival + slo_ms: what deadline-aware policies order by
    trace: bool = False  # return every layer it ran
    audit: bool = False  # a shadow audit: after its answer, run again to the last layer
    submitted: float = field(default_factory=time.monotonic)
    since: float = 0.0  # when it last advanced (policy.Waiting.since)
    windowed: bool = False  # has entered the queue's admission window (what policies see)
    started: float | None = None  # its first step began
    finished: float | None = None
    # a sample stopped between layers (layer steps)
    next_layer: int = 0
    hidden: Row | None = None  # [len, H] after `next_layer` layers, in the backend's array type
    memory: np.ndarray | None = None  # criterion memory row
    said: list[tuple[float, np.ndarray, float | None]] = field(default_factory=list)  # traced: per layer
    exit_layer: int = 0  # where it was answered (an audit waiting for its run)

    @property
    def tokens(self) -> int:
        return len(self.encoded)

    @property
    def due(self) -> float:
        """What deadline-aware policies order by: the SLO's deadline, or the request timeout."""
        return min(self.slo_deadline, self.deadline)

    def resolve(self, result: Prediction | BaseException) -> None:
        if self.finished is not None:
            return  # answered already
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
class Answer:
    sample: Sample
    prediction: Prediction
    record: ExitRecord | None  # every layer's exit, when the run was traced to the last layer


@dataclass
class StepOutcome:
    answered: list[Answer] = field(default_factory=list)
    waiting: list[Sample] = field(default_factory=list)  # moved on to their next layer (layer steps)
    work: float = 0.0  # token-layers computed
    layers: int = 0  # rows x layers run


def run_step(backend: Backend, criterion: ExitCriterion, step: Step, batch: list[Sample]) -> StepOutcome:
    """Run `step` over `batch` (the samples of `step.keys`)."""
    if step.mode == LAYER:
        return _layer_step(backend, criterion, step.layer, batch)
    return _run_step(backend, criterion, batch, step.audit)


def _run_step(backend: Backend, criterion: ExitCriterion, batch: list[Sample], audit: bool) -> StepOutcome:
    num_layers = backend.num_layers
    thresholds = np.ones((len(batch), num_layers), np.float32) if audit else np.stack([s.thresholds for s in batch])
    traced = audit or any(s.trace or s.audit for s in batch)
    result = backend.run([s.encoded for s in batch], thresholds, criterion, traced)
    outcome = StepOutcome()
    for i, (s, p) in enumerate(zip(batch, predictions(result, criterion.regression, traced), strict=True)):
        layers = int(result.exit_layer[i])
        record = None
        if traced and layers == num_layers:
            lte = result.trace_lte[i] if result.trace_lte is not None else None
            record = ExitRecord(s.exit_layer if audit else layers, result.trace_logits[i], lte)
        if not s.trace:
            p.trace = None
        outcome.answered.append(Answer(s, p, record))
        outcome.work += len(s.encoded) * layers
        outcome.layers += layers
    return outcome


def _layer_step(backend: Backend, criterion: ExitCriterion, layer: int, batch: list[Sample]) -> StepOutcome:
    lengths = np.array([len(s.encoded) for s in batch])
    if layer == 0:
        hidden = backend.embed([s.encoded for s in batch])
        memory = criterion.initial_memory(len(batch))
    else:
        hidden = backend.stack([s.hidden for s in batch])
        memory = np.stack([s.memory for s in batch]) if batch[0].memory is not None else None
    last = layer == backend.num_layers - 1
    thresholds = np.array([s.thresholds[layer] for s in batch], np.float32)
    traced = any(s.trace or s.audit for s in batch)
    need = needs_exit(criterion, thresholds, last, traced)
    hidden, out = backend.layer(layer, hidden, backend.attention(lengths), need)
    if out is None:
        leave, conf = np.zeros(len(batch), bool), None
    else:
        decision = decide(criterion, out.logits, out.lte, memory, thresholds, last)
        leave, conf, memory = decision.leave, decision.confidence, decision.memory
    rows = backend.rows(hidden, lengths.tolist()) if not leave.all() else []
    outcome = StepOutcome(work=float(lengths.sum()), layers=len(batch))
    for i, s in enumerate(batch):
        if out is not None and (s.trace or s.audit):
            s.said.append((float(conf[i]), out.logits[i], float(out.lte[i]) if out.lte is not None else None))
        if leave[i]:
            value, label, probs = decode(out.logits[i], criterion.regression)
            trace = None
            if s.trace:
                trace = [LayerTrace(k + 1, c, decode(logits, criterion.regression)[0])
                         for k, (c, logits, _) in enumerate(s.said)]
            outcome.answered.append(Answer(s, Prediction(layer + 1, float(conf[i]), value, label, probs, trace),
                                           _record(s, layer + 1) if last and s.audit else None))
            s.hidden = s.memory = None
        else:
            s.hidden, s.next_layer = rows[i], layer + 1
            s.memory = memory[i] if memory is not None else None
            outcome.waiting.append(s)
    return outcome


def _record(sample: Sample, exit_layer: int) -> ExitRecord:
    """The audit record of a sample traced through every layer."""
    logits = np.stack([logits for _, logits, _ in sample.said])
    lte = np.array([v for _, _, v in sample.said], np.float32) if sample.said[0][2] is not None else None
    return ExitRecord(exit_layer, logits, lte)
