"""The threshold autopilot: keeps the agreement's lower bound at or above `target_agreement` by
moving the server's DEFAULT exit threshold (a request's own `threshold` is never touched).

Opt-in (`target_agreement`). It starts from the checkpoint's threshold (so a restart forgets every
move) and stays within [floor, 1.0], the floor being `autopilot_floor` (default: the checkpoint's
calibrated threshold). It judges only a full audit window (`audit_window` audits: before that the
bound mostly reflects how few audits there are, and the calibrated threshold stands), and at most
once per `autopilot_min_samples` finished audits since the last move. A threshold is judged by the
agreement lower bound it would have given on the window (`AuditMonitor.bound_at`, a replay of the
recorded exits):

  raise   when the bound at the current threshold is below the target: to the lowest of
          t + s/5, t + 2s/5, ..., t + s whose bound reaches the target, else t + s (s =
          `autopilot_step`, the largest move), at most 1.0;
  lower   slowly, when the bound at t - s/5 is at least target + `autopilot_margin` (the
          hysteresis band: a threshold that only just meets the target stays), never below the floor;
  hold    otherwise.

Every move is logged, counted (exitserve_autopilot_moves_total{direction}) and listed in /info.
Under Ray Serve each replica runs its own autopilot on its own audits (docs/RAY.md).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

log = logging.getLogger("exitserve")

FINE_STEPS = 5  # a raise tries s/5, 2s/5, ..., s; a lowering moves s/5
RECENT_MOVES = 20  # moves listed in /info


@dataclass
class Move:
    time: float  # unix time
    audits: int  # audits finished when it moved
    old: float
    new: float
    lower_bound: float  # the bound that justified it: at `old` for a raise, at `new` for a lowering


class Autopilot:
    """The controller (see the module docstring); `observe` is called once per finished audit."""

    def __init__(self, start: float, floor: float, target: float, step: float, min_samples: int, margin: float,
                 window: int, count_move: Callable[[str], None] = lambda direction: None):
        self.floor, self.target, self.step, self.window = floor, target, step, window
        self.min_samples, self.margin = min_samples, margin
        self.start = self.threshold = min(1.0, max(floor, start))
        self.since_move = 0
        self.moves: deque[Move] = deque(maxlen=RECENT_MOVES)
        self.counts = {"up": 0, "down": 0}
        self._count_move = count_move

    def observe(self, bound_at: Callable[[float], float], audits: int) -> Move | None:
        """One more audit finished (`audits` since start): move the threshold if the rules say so."""
        self.since_move += 1
        if audits < self.window or self.since_move < self.min_samples:
            return None
        t, fine = self.threshold, self.step / FINE_STEPS
        bound = bound_at(t)
        if t < 1.0 and bound < self.target:
            candidates = [min(1.0, round(t + fine * i, 6)) for i in range(1, FINE_STEPS + 1)]
            new = next((c for c in candidates if bound_at(c) >= self.target), candidates[-1])
            return self._move(new, bound, audits, "up")
        if t > self.floor:
            down = max(self.floor, round(t - fine, 6))
            down_bound = bound_at(down)
            if down_bound >= self.target + self.margin:
                return self._move(down, down_bound, audits, "down")
        return None

    def _move(self, new: float, bound: float, audits: int, direction: str) -> Move:
        move = Move(time.time(), audits, self.threshold, new, bound)
        (log.warning if direction == "up" else log.info)(
            "autopilot: default threshold %.4f -> %.4f (agreement lower bound %.4f at %.4f; target %.4f; %d audits)",
            move.old, move.new, bound, move.old if direction == "up" else move.new, self.target, audits)
        self.threshold, self.since_move = new, 0
        self.moves.append(move)
        self.counts[direction] += 1
        self._count_move(direction)
        return move

    def info(self, bound_at: Callable[[float], float]) -> dict:
        bound = bound_at(self.threshold)
        return {
            "target": self.target, "threshold": self.threshold, "start": self.start, "floor": self.floor,
            "step": self.step, "min_samples": self.min_samples, "margin": self.margin,
            "lower_bound_at_threshold": None if bound != bound else bound,  # NaN: no audit yet
            "audits_since_move": self.since_move, "moves": dict(self.counts),
            "recent_moves": [asdict(m) for m in self.moves],
        }
