"""Shadow audits: do the served early answers still agree with the full model? Measured live.

A fraction `audit_rate` of inputs is audited: answered at its exit as usual, then run again to the last
layer in the scheduler's idle time (the rules are in server/scheduler.py). The scheduler reports each
finished audit as an `ExitRecord` (models/answers.py): every layer's exit output and the layer that
answered.
`AuditMonitor` turns those into the agreement metrics and drives the optional `Autopilot`:

  agreement   classification: the served label equals the last layer's label; regression:
              |served value - last layer's value| <= `audit_tolerance` (in the model's output units).
              An input answered at the last layer agrees by definition (and costs no extra layer).
  window      the last `audit_window` finished audits; the agreement of the answers actually served
              (whatever threshold each request used) and its lower confidence bound.
  bound       the one-sided 95 % Wilson score lower bound. Why Wilson: a closed form that keeps
              close to its nominal coverage even with agreement near 1 and few audits, where the
              normal (Wald) interval collapses to zero width when every audit agrees; Clopper-Pearson
              guarantees at least the nominal coverage but is conservative (a lower bound), which
              would make the autopilot raise the threshold more often than the data justify.
  replay      every audit recorded every layer's exit, so the agreement that ANY threshold would
              have given on the same inputs follows without running the model again: the library's
              `simulate_exits` replays the exit rule over the window (`bound_at`). The autopilot
              judges candidate thresholds this way, so a move is judged on the same recent
              traffic, not after waiting for new audits at the new threshold.
"""

from __future__ import annotations

import math
import random
import threading

import numpy as np

from exitserve.models.answers import AllExits, ExitRecord, answers
from exitserve.models.criteria import ExitCriterion
from exitserve.models.exit_config import ExitConfig
from exitserve.models.inference import simulate_exits
from exitserve.server.autopilot import Autopilot
from exitserve.server.metrics import AuditMetrics
from exitserve.server.scheduler import AuditReport
from exitserve.server.settings import Settings

Z_ONE_SIDED_95 = 1.6448536269514722  # the standard normal's 95th percentile


def wilson_lower_bound(agreed: int, n: int, z: float = Z_ONE_SIDED_95) -> float:
    """One-sided Wilson score lower bound of a proportion (NaN with no observation)."""
    if n == 0:
        return math.nan
    p, z2 = agreed / n, z * z
    centre = p + z2 / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - margin) / (1 + z2 / n))


class AuditWindow:
    """The last `size` finished audits (a ring buffer): every layer's exit logits (and LTE
    confidence), and the layer each was answered at."""

    def __init__(self, size: int, num_layers: int, num_outputs: int, use_lte: bool, regression: bool,
                 tolerance: float):
        self.size, self.regression, self.tolerance = size, regression, tolerance
        self.logits = np.zeros((size, num_layers, num_outputs), np.float32)
        self.lte = np.zeros((size, num_layers), np.float32) if use_lte else None
        self.exit_layer = np.zeros(size, np.int64)
        self.agreed = np.zeros(size, bool)
        self.count = self._next = 0

    def agree(self, served: np.ndarray, final: np.ndarray) -> np.ndarray:
        """Elementwise: does the served answer agree with the last layer's?"""
        if self.regression:
            return np.abs(served - final) <= self.tolerance
        return served == final

    def add(self, record: ExitRecord) -> bool:
        """Store one finished audit; returns whether its served answer agreed."""
        layer_answers = answers(record.logits, self.regression)  # [L]
        agreed = bool(self.agree(layer_answers[record.exit_layer - 1], layer_answers[-1]))
        i = self._next
        self.logits[i] = record.logits
        if self.lte is not None:
            self.lte[i] = record.lte
        self.exit_layer[i], self.agreed[i] = record.exit_layer, agreed
        self._next, self.count = (i + 1) % self.size, min(self.count + 1, self.size)
        return agreed

    def served(self) -> tuple[int, int]:
        """(agreeing audits, audits) in the window, for the answers as served."""
        return int(self.agreed[: self.count].sum()), self.count

    def at_threshold(self, criterion: ExitCriterion, threshold: float) -> tuple[int, int]:
        """(agreeing, audits) had every input in the window been answered at `threshold`."""
        n = self.count
        if n == 0:
            return 0, 0
        logits = self.logits[:n].transpose(1, 0, 2)  # [L, N, C]
        lte = self.lte[:n].T if self.lte is not None else None
        exits = simulate_exits(AllExits(logits, lte), criterion, [threshold] * logits.shape[0])
        final = answers(logits[-1], self.regression)
        return int(self.agree(answers(exits.logits, self.regression), final).sum()), n


class AuditMonitor:
    """Samples which inputs to audit, records finished audits (the window, the metrics) and, when
    `target_agreement` is set, lets the autopilot move the default threshold after each one.
    `record` runs on the scheduler's thread and `info` on the event loop: a lock keeps them apart."""

    def __init__(self, rate: float, window: AuditWindow, criterion: ExitCriterion, metrics: AuditMetrics,
                 autopilot: Autopilot | None = None, seed: int | None = None):
        self.rate, self.window, self.criterion = rate, window, criterion
        self.metrics, self.autopilot = metrics, autopilot
        self.audited = self.dropped = self.extra_layers = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        metrics.agreement.set_function(lambda: self.agreement()[0])
        metrics.agreement_lower_bound.set_function(lambda: self.agreement()[1])

    def should_audit(self) -> bool:
        return self.rate > 0 and self._rng.random() < self.rate

    def agreement(self) -> tuple[float, float, int]:
        """The window's served agreement, its lower bound and its audits (NaN, NaN, 0 when empty)."""
        with self._lock:
            agreed, n = self.window.served()
        return (agreed / n if n else math.nan), wilson_lower_bound(agreed, n), n

    def bound_at(self, threshold: float) -> float:
        """The lower bound of the agreement `threshold` would have given on the window's inputs."""
        return wilson_lower_bound(*self.window.at_threshold(self.criterion, threshold))

    def record(self, report: AuditReport) -> None:
        m = self.metrics
        m.audit_layers.inc(report.layers)
        m.dropped.inc(report.dropped)
        with self._lock:
            self.extra_layers += report.layers
            self.dropped += report.dropped
            for record in report.completed:
                self.audited += 1
                m.audited.inc()
                if not self.window.add(record):
                    m.disagreement(record.exit_layer)
                if self.autopilot is not None:
                    self.autopilot.observe(self.bound_at, self.audited)

    def info(self) -> dict:
        agreement, bound, n = self.agreement()
        with self._lock:
            autopilot = self.autopilot.info(self.bound_at) if self.autopilot is not None else None
        return {
            "rate": self.rate, "window": self.window.size, "in_window": n,
            "agreement": None if n == 0 else agreement, "lower_bound": None if n == 0 else bound,
            "bound": "Wilson score, one-sided 95 %",
            "tolerance": self.window.tolerance if self.window.regression else None,
            "audited": self.audited, "dropped": self.dropped, "extra_layers": self.extra_layers,
            "autopilot": autopilot,
        }


def create_monitor(settings: Settings, config: ExitConfig, start: float | list[float], criterion: ExitCriterion,
                   num_outputs: int, metrics: AuditMetrics) -> AuditMonitor:
    """The monitor for a served model, with its autopilot when `target_agreement` is set, starting from
    `start` (the checkpoint's threshold for the backend; a ValueError if it is per-layer: the autopilot
    moves a single threshold)."""
    autopilot = None
    if settings.target_agreement is not None:
        if not isinstance(start, (int, float)):
            raise ValueError("target_agreement needs a single default threshold; this checkpoint has per-layer ones")
        floor = start if settings.autopilot_floor is None else settings.autopilot_floor
        autopilot = Autopilot(start, floor, settings.target_agreement, settings.autopilot_step,
                              settings.autopilot_min_samples, settings.autopilot_margin, settings.audit_window,
                              metrics.autopilot_moved)
    window = AuditWindow(settings.audit_window, config.num_layers, num_outputs, config.use_lte, config.regression,
                         settings.audit_tolerance)
    return AuditMonitor(settings.audit_rate, window, criterion, metrics, autopilot)
