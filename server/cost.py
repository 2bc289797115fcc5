"""What a step costs, learned online: the scheduler's prediction of how long work takes.

A step's seconds are modelled as `overhead + rate x work`, work being the token-layers it computes
(each row's tokens x the layers it runs). Both are fitted by exponentially weighted least squares over
the steps the server actually ran (recent steps count most: the machine's load changes), starting from
a prior until enough steps are seen. `mean_layers` tracks how many layers an input runs on average, so
a queued input's work can be predicted before it runs. Admission uses it to predict a new request's
wait and shed what cannot meet `slo_ms` (server/scheduler.py); the `slo` policy to size batches.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class StepCost:
    overhead: float = 0.001  # seconds per step (the prior, until fitted)
    rate: float = 2e-5  # seconds per token-layer (the prior)
    mean_layers: float = 3.0  # layers an input runs, on average
    decay: float = 0.99  # weight of the past per observed step (a half-life of ~70 steps)
    min_steps: int = 5  # steps seen before the fit replaces the prior (the warm-up's steps, of several sizes)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._s = [0.0] * 5  # weighted sums: 1, x, y, xx, xy
        self.steps = 0

    def observe(self, work: float, seconds: float, rows: int, layers: int) -> None:
        """One finished step: its token-layers, seconds, rows and the layers its rows ran in all."""
        with self._lock:
            d = self.decay
            s = self._s
            for i, value in enumerate((1.0, work, seconds, work * work, work * seconds)):
                s[i] = d * s[i] + value
            self.steps += 1
            if rows:
                self.mean_layers = d * self.mean_layers + (1 - d) * (layers / rows)
            if self.steps < self.min_steps:
                return
            n, x, y, xx, xy = s
            var = n * xx - x * x
            if var > 1e-12 * max(n * xx, 1e-30):
                rate = (n * xy - x * y) / var
                overhead = (y - rate * x) / n
                if rate > 0:
                    self.rate, self.overhead = rate, max(overhead, 0.0)
                    return
            self.rate = max((y - self.overhead * n) / x, 1e-9) if x > 0 else self.rate  # one work size seen

    def work(self, tokens: Sequence[int]) -> float:
        """Predicted token-layers of inputs of these lengths, run to their exits."""
        return sum(tokens) * self.mean_layers

    def seconds(self, work: float, steps: int = 1) -> float:
        """Predicted seconds of `steps` steps computing `work` token-layers in all."""
        return steps * self.overhead + work * self.rate

    def run_seconds(self, tokens: Sequence[int]) -> float:
        """Predicted seconds of one run step over inputs of these lengths (the `slo` policy's cost)."""
        return self.seconds(self.work(tokens))
