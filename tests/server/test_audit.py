"""The agreement statistics and the autopilot's rules, without a server."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from exitserve.models.answers import ExitRecord
from exitserve.models.criteria import ExitCriterion
from exitserve.server.audit import Z_ONE_SIDED_95, AuditWindow, wilson_lower_bound
from exitserve.server.autopilot import Autopilot


def test_wilson_bound_closed_forms_and_order():
    assert math.isnan(wilson_lower_bound(0, 0))
    assert wilson_lower_bound(0, 50) == 0.0
    for n in (10, 100, 1000):  # all agree: n / (n + z^2)
        assert wilson_lower_bound(n, n) == pytest.approx(n / (n + Z_ONE_SIDED_95**2))
    assert wilson_lower_bound(95, 100) < 0.95 < wilson_lower_bound(950, 1000) + 0.02
    assert wilson_lower_bound(95, 100) < wilson_lower_bound(950, 1000)  # more evidence, tighter bound


def test_wilson_bound_covers_the_true_agreement_95_percent_of_the_time():
    rng = random.Random(0)
    for p, n in ((0.95, 200), (0.99, 500), (0.8, 50)):
        covered = sum(wilson_lower_bound(sum(rng.random() < p for _ in range(n)), n) <= p for _ in range(1000))
        assert 0.92 <= covered / 1000 <= 0.99, (p, n, covered)


def trace(layer_labels: list[int], exit_layer: int, confidences: list[float] | None = None) -> ExitRecord:
    """An audit whose layer k answered `layer_labels[k]` with max-prob `confidences[k]` (2 classes)."""
    confidences = confidences or [0.9] * len(layer_labels)
    logits = []
    for label, conf in zip(layer_labels, confidences, strict=True):
        gap = math.log(conf / (1 - conf))
        logits.append([0.0, gap] if label else [gap, 0.0])
    return ExitRecord(exit_layer, np.array(logits, np.float32))


def test_window_counts_served_agreement_and_replays_other_thresholds():
    window = AuditWindow(3, 3, 2, use_lte=False, regression=False, tolerance=0.0)
    max_prob = ExitCriterion("max-prob", 3)
    # layer 1 disagrees with the last layer at confidence 0.7; layer 2 agrees at 0.95
    assert not window.add(trace([0, 1, 1], exit_layer=1, confidences=[0.7, 0.95, 0.99]))
    assert window.add(trace([0, 1, 1], exit_layer=2, confidences=[0.7, 0.95, 0.99]))
    assert window.served() == (1, 2)
    assert window.at_threshold(max_prob, 0.6) == (0, 2)  # both would leave at layer 1
    assert window.at_threshold(max_prob, 0.8) == (2, 2)  # both at layer 2
    assert window.at_threshold(max_prob, 1.0) == (2, 2)
    for _ in range(3):  # the ring keeps the last `size`
        window.add(trace([1, 1, 1], exit_layer=1))
    assert window.served() == (3, 3) and window.count == 3


def test_regression_agreement_is_within_the_tolerance():
    window = AuditWindow(10, 2, 1, use_lte=True, regression=True, tolerance=0.25)
    lte = np.array([0.5, 0.9], np.float32)
    assert window.add(ExitRecord(1, np.array([[2.0], [2.2]], np.float32), lte))
    assert not window.add(ExitRecord(1, np.array([[2.0], [2.3]], np.float32), lte))
    lte_criterion = ExitCriterion("lte", 2, regression=True)
    assert window.at_threshold(lte_criterion, 0.4) == (1, 2)  # LTE 0.5 >= 0.4: both served at layer 1
    assert window.at_threshold(lte_criterion, 0.6) == (2, 2)


class Driver:
    """An autopilot fed audits one at a time; `counted` collects the metric's move counts."""

    def __init__(self, **kw):
        args = dict(start=0.6, floor=0.6, target=0.9, step=0.2, min_samples=3, margin=0.02, window=5)
        args.update(kw)
        self.counted: list[str] = []
        self.pilot = Autopilot(**args, count_move=self.counted.append)
        self.audits = 0

    def feed(self, bound_at, audits: int) -> list:
        """`audits` more audits finished; the moves they caused."""
        moves = []
        for _ in range(audits):
            self.audits += 1
            moves.append(self.pilot.observe(bound_at, self.audits))
        return [m for m in moves if m is not None]


def test_autopilot_waits_for_a_full_window_then_raises_to_the_lowest_threshold_meeting_the_target():
    d = Driver()
    bound_at = lambda t: 0.95 if t >= 0.68 else 0.5  # noqa: E731
    assert d.feed(bound_at, 4) == []  # min_samples passed, but the window (5) is not full yet
    moves = d.feed(bound_at, 1)
    assert [(m.old, m.new, m.audits) for m in moves] == [(0.6, 0.68, 5)]  # 0.64 fails; 0.68 is the first to pass
    assert moves[0].lower_bound == 0.5 and d.counted == ["up"] and d.pilot.since_move == 0
    assert d.feed(lambda t: 0.5, 2) == [] and len(d.feed(lambda t: 0.5, 1)) == 1  # min_samples apart


def test_autopilot_raises_in_bounded_steps_and_stops_at_one():
    d = Driver()
    moves = d.feed(lambda t: 0.5, 30)  # nothing meets the target
    assert [m.new for m in moves] == [0.8, 1.0]  # full steps, capped at 1.0, then no move
    assert d.pilot.threshold == 1.0 and d.counted == ["up", "up"]


def test_autopilot_lowers_slowly_with_hysteresis_and_never_below_the_floor():
    d = Driver(start=0.9)
    assert d.pilot.threshold == 0.9
    assert d.feed(lambda t: 0.91, 10) == []  # the bound one step down is within the margin band: hold
    moves = d.feed(lambda t: 0.99, 50)
    assert [m.new for m in moves] == pytest.approx([0.86, 0.82, 0.78, 0.74, 0.7, 0.66, 0.62, 0.6])
    assert d.pilot.threshold == 0.6 and d.counted.count("down") == 8  # then held at the floor


def test_autopilot_starts_within_floor_and_one():
    assert Driver(start=0.5, floor=0.7).pilot.threshold == 0.7
    assert Driver(start=0.8, floor=0.3).pilot.threshold == 0.8
