"""Scheduling policies: what the scheduler runs next, as a pure function of what waits and the clock.

The scheduler (server/scheduler.py) owns the samples and the worker thread; before every step it
gives its policy a `View` (the admission window of the queue, the samples that stopped between two
layers, the answered samples waiting for their audit) and runs the `Step` the policy returns. Nothing
here touches threads, futures or a model, so the policies are unit-tested and simulated
(loadtest/simulate.py) exactly as the server runs them. Two kinds of step exist:

  run    rows that have not started, each run from layer 1 to its own exit in one `Backend.run` (on
         ONNX Runtime one graph call: onnx_compose.py); every row is answered when the step ends;
  layer  rows waiting at the same layer boundary k run layer k and exit k only; rows that exit are
         answered, the others wait at k + 1 (layer-level continuous batching: a new input can start
         while deeper ones wait, batches re-form at every layer).

The policies (`POLICIES`; loadtest/simulate.py compares them, docs/RESULTS.md has the numbers):

  fcfs        run steps, oldest request first: a length-aware batch cut around the oldest queued
              input (the DEFAULT: the simplest, and on the real server as good as `layered` --
              capacity 218 vs 214 req/s, p99 365 vs 334 ms at 70 % load, one run each -- while the
              simulator, which favours it by far, was found 37-88 % off the server: docs/RESULTS.md
              "Scheduling, measured");
  edf         run steps, earliest deadline first (the deadline is arrival + `slo_ms`, else the
              request timeout): the same as fcfs while every request has the same SLO;
  slo         run steps, EDF order, and a batch grows only while the cost model predicts that every
              row in it still finishes before its deadline (DREX-style: is a bigger batch worth it?);
  layered     layer steps, least-recently-advanced group first (the scheduler before issue 18): fair
              between the L + 1 groups, so under load a sample waits for up to ~L x (L + 1) steps;
  oldest      layer steps, the group holding the oldest request first ("finish what started").

Audits (server/audit.py) are answered samples that run again to the last layer to measure agreement:
every policy gives them a run step only when nothing unanswered waits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

RUN, LAYER = "run", "layer"


@dataclass(frozen=True)
class Waiting:
    """What a policy knows of one waiting sample."""

    key: int  # the scheduler's handle for the sample
    tokens: int
    arrival: float  # when its request arrived (time.monotonic())
    deadline: float  # when it should be answered by: arrival + SLO (or the request timeout)
    since: float  # when it last advanced (a queued sample: when it entered the admission window)
    layer: int = 0  # the next layer it runs (0: not started)


@dataclass(frozen=True)
class View:
    now: float
    queue: Sequence[Waiting]  # not started, oldest first: the admission window of the queue
    groups: Sequence[Sequence[Waiting]] = ()  # started samples by the next layer they run (k >= 1)
    audits: Sequence[Waiting] = ()  # answered samples waiting for their audit run


@dataclass(frozen=True)
class Step:
    mode: str  # RUN or LAYER
    layer: int  # the layer the rows run next (0 for a run step)
    keys: tuple[int, ...]
    audit: bool = False  # an audit step: rows already answered, run to the last layer


@dataclass(frozen=True)
class Limits:
    max_batch_size: int = 32
    max_batch_tokens: int = 8192


# a policy's cost model: predicted seconds of a run step over rows of these token counts
RunCost = Callable[[Sequence[int]], float]


def cut_batch(rows: Sequence[Waiting], anchor: Waiting, limits: Limits,
              fits: Callable[[list[Waiting]], bool] | None = None) -> list[Waiting]:
    """A batch around `anchor`, length-aware: rows sorted by length, a contiguous window grown towards
    the neighbour closer in length (less padding), at most `max_batch_size` rows and `max_batch_tokens`
    padded tokens, and (when given) only while `fits(batch)` holds."""
    ordered = sorted(rows, key=lambda w: (w.tokens, w.arrival))
    lo = hi = ordered.index(anchor)  # the window is ordered[lo : hi + 1]
    while hi - lo + 1 < limits.max_batch_size:
        left = ordered[lo - 1] if lo > 0 else None
        right = ordered[hi + 1] if hi + 1 < len(ordered) else None
        if left is None and right is None:
            break
        grow_right = left is None or (
            right is not None and right.tokens - ordered[hi].tokens <= ordered[lo].tokens - left.tokens
        )
        width = right.tokens if grow_right else ordered[hi].tokens
        if (hi - lo + 2) * width > limits.max_batch_tokens:
            break
        candidate = ordered[lo:hi + 2] if grow_right else ordered[lo - 1:hi + 1]
        if fits is not None and not fits(candidate):
            break
        lo, hi = (lo, hi + 1) if grow_right else (lo - 1, hi)
    return ordered[lo:hi + 1]


def _step(mode: str, layer: int, batch: Sequence[Waiting], audit: bool = False) -> Step:
    return Step(mode, layer, tuple(w.key for w in batch), audit)


class Policy(ABC):
    """Chooses the next step; `None` when nothing waits."""

    name: str

    @abstractmethod
    def choose(self, view: View, limits: Limits) -> Step | None:
        """The next step for `view` (pure: the same view gives the same step)."""

    @staticmethod
    def audit_step(view: View, limits: Limits) -> Step | None:
        """Audits run only when nothing unanswered waits: the oldest first, as a run step."""
        if view.queue or any(view.groups) or not view.audits:
            return None
        return _step(RUN, 0, cut_batch(view.audits, view.audits[0], limits), audit=True)


@dataclass
class RunToExit(Policy):
    """Run steps: a batch of queued inputs, each to its own exit, anchored on the first in `order`
    (arrival: fcfs; deadline: edf). With `cost`, a batch grows only while every row's predicted finish
    stays before its deadline (slo), the anchor always included."""

    name: str = "fcfs"
    order: str = "arrival"
    cost: RunCost | None = field(default=None, repr=False)

    def choose(self, view: View, limits: Limits) -> Step | None:
        started = [g for g in view.groups if g]
        if started:  # left by a layered policy (the policy changed): finish them layer by layer
            group = started[0]
            return _step(LAYER, group[0].layer, cut_batch(group, group[0], limits))
        if not view.queue:
            return self.audit_step(view, limits)
        anchor = min(view.queue, key=lambda w: (getattr(w, self.order), w.arrival))
        fits = None
        if self.cost is not None:
            cost = self.cost

            def fits(batch: list[Waiting]) -> bool:
                finish = view.now + cost([w.tokens for w in batch])
                return all(finish <= w.deadline for w in batch)

        return _step(RUN, 0, cut_batch(view.queue, anchor, limits, fits))


@dataclass
class Layered(Policy):
    """Layer steps: the group (layer boundary, the queue's window being boundary 0) holding the sample
    first in `order` advances one layer: since = least recently advanced (fair between groups);
    arrival = the oldest request (finish what started)."""

    name: str = "layered"
    order: str = "since"

    def choose(self, view: View, limits: Limits) -> Step | None:
        groups = [list(view.queue), *(list(g) for g in view.groups[1:])] if view.groups else [list(view.queue)]
        candidates = [min(g, key=lambda w: (getattr(w, self.order), w.arrival)) for g in groups if g]
        if not candidates:
            return self.audit_step(view, limits)
        anchor = min(candidates, key=lambda w: (getattr(w, self.order), w.arrival))
        group = groups[anchor.layer]
        return _step(LAYER, anchor.layer, cut_batch(group, anchor, limits))


def make_policy(name: str, cost: RunCost | None = None) -> Policy:
    """The policy called `name` (one of POLICIES); `slo` needs a cost model."""
    if name == "fcfs":
        return RunToExit("fcfs", "arrival")
    if name == "edf":
        return RunToExit("edf", "deadline")
    if name == "slo":
        if cost is None:
            raise ValueError("policy 'slo' needs a cost model")
        return RunToExit("slo", "deadline", cost)
    if name == "layered":
        return Layered("layered", "since")
    if name == "oldest":
        return Layered("oldest", "arrival")
    raise ValueError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICIES)}")


POLICIES = ("fcfs", "edf", "slo", "layered", "oldest")
