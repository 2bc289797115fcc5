"""Where samples wait between steps, and what of it a policy sees: shared by the scheduler's worker and
the simulator (loadtest/simulate.py), so both give the policy exactly the same views.

    queue    samples not started, oldest first; a policy sees its first `admit_window` (the admission
             window: a step's batch is cut from there, and a backlog behind it is invisible)
    groups   samples stopped between two layers, by the next layer they run (layer steps only)
    audits   answered samples waiting for their audit run

A sample entering the admission window counts as waiting from its arrival if it arrived during the
latest step, else from now: time spent behind a backlog does not make it look older than the samples
already in flight (what least-recently-advanced ordering needs to stay starvation-free).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Protocol, TypeVar

from exitserve.server.policy import Step, View, Waiting


class Waiter(Protocol):
    tokens: int
    submitted: float  # arrival
    due: float  # deadline the policy orders by
    since: float
    windowed: bool
    next_layer: int


T = TypeVar("T", bound=Waiter)


class Waitlist(Generic[T]):
    def __init__(self, num_layers: int, admit_window: int):
        self.admit_window = admit_window
        self.queue: deque[T] = deque()
        self.groups: list[list[T]] = [[] for _ in range(num_layers)]  # by the next layer they run
        self.audits: list[T] = []

    def idle(self) -> bool:
        return not self.queue and not self.started() and not self.audits

    def started(self) -> int:
        """Samples stopped between layers."""
        return sum(len(g) for g in self.groups)

    def view(self, now: float, step_started: float) -> View:
        window = []
        for i, s in enumerate(self.queue):
            if i == self.admit_window:
                break
            if not s.windowed:
                s.windowed = True
                s.since = s.submitted if s.submitted >= step_started else now
            window.append(_waiting(i, s))
        groups, offset = [], len(self.queue)
        for group in self.groups:
            groups.append([_waiting(offset + j, s) for j, s in enumerate(group)])
            offset += len(group)
        return View(now, window, groups, [_waiting(offset + j, s) for j, s in enumerate(self.audits)])

    def take(self, step: Step) -> list[T]:
        """Remove the step's samples from where they wait (keys index queue, then groups, then audits)."""
        places = [self.queue, *self.groups, self.audits]
        flat = [(place, s) for place in places for s in place]
        chosen = [flat[key] for key in step.keys]
        for place, s in chosen:
            place.remove(s)
        return [s for _, s in chosen]

    def park(self, sample: T, now: float) -> None:
        """A sample that ran a layer step without leaving: it waits for its next layer from now."""
        sample.since = now
        self.groups[sample.next_layer].append(sample)


def _waiting(key: int, s: Waiter) -> Waiting:
    return Waiting(key, s.tokens, s.submitted, s.due, s.since, s.next_layer)
