"""A discrete-event simulator of the scheduler, to choose its policy before proving it on the server.

It runs the server's own code for every decision -- the policies (server/policy.py) and the waitlist
that builds their views (server/waitlist.py) -- over a simulated clock, with:

  - a cost model of one step (`StepModel`), fitted from the backend's measured step times (`fit`): a
    run step costs a + b x (padded token-layers) + c x (padded token-layers x width), where at layer k
    the rows still running are trimmed to the longest of them (the composed graph's compaction); a
    layer step costs the same terms for one layer;
  - the model's measured exit layers and text lengths (real sentences through the real model, taken
    jointly), and a fixed per-request overhead (HTTP, tokenisation) measured on the server at c=1;
  - Poisson or bursty arrivals (bursts of a geometric number of requests, mean 4).

loadtest/scheduling.py drives it (fit, compare the policies, check it against the real server).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from exitserve.server.policy import LAYER, Limits, make_policy
from exitserve.server.waitlist import Waitlist


@dataclass
class StepModel:
    """Seconds of one step from its shape (see the module docstring); fitted per backend."""

    run: tuple[float, float, float]  # a, b, c of a run step
    layer: tuple[float, float, float]  # a, b, c of a layer step
    overhead: float = 0.0  # per request, outside the scheduler (HTTP, tokenisation)

    @staticmethod
    def terms(rows: Sequence[tuple[int, int]], start: int = 0, stop: int | None = None) -> tuple[float, float]:
        """(padded token-layers, padded token-layers x width) of running `rows` ((tokens, exit layer)
        pairs) from layer `start` to each one's exit (or `stop`), trimmed to the longest still running."""
        tokens_layers = squared = 0.0
        last = max(exit for _, exit in rows) if stop is None else stop
        for k in range(start, last):
            active = [t for t, exit in rows if exit > k]
            if not active:
                break
            width = max(active)
            tokens_layers += len(active) * width
            squared += len(active) * width * width
        return tokens_layers, squared

    def run_seconds(self, rows: Sequence[tuple[int, int]]) -> float:
        a, b, c = self.run
        x1, x2 = self.terms(rows)
        return a + b * x1 + c * x2

    def layer_seconds(self, tokens: Sequence[int]) -> float:
        a, b, c = self.layer
        width = max(tokens)
        return a + b * len(tokens) * width + c * len(tokens) * width * width


@dataclass(eq=False)
class SimSample:
    """A request of one input, as the waitlist needs it (server/waitlist.Waiter)."""

    tokens: int
    exit_layer: int
    submitted: float
    due: float = math.inf
    since: float = 0.0
    windowed: bool = False
    next_layer: int = 0
    finished: float | None = None


@dataclass
class Result:
    policy: str
    load: float
    rate: float
    latencies_ms: list[float] = field(default_factory=list)
    throughput: float = 0.0

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms)
        q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None  # noqa: E731
        return {"policy": self.policy, "load": self.load, "rate_rps": round(self.rate, 1),
                "throughput_rps": round(self.throughput, 1), "answered": len(lat),
                "p50_ms": q(0.5), "p99_ms": q(0.99), "mean_ms": statistics.fmean(lat) if lat else None}


def arrivals(rate: float, seconds: float, bursty: bool, rng: random.Random) -> list[float]:
    """Arrival times: Poisson at `rate`, or bursts (Poisson at rate / 4, a geometric number of mean 4)."""
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate / 4 if bursty else rate)
        if t >= seconds:
            return out
        count = 1 + (int(math.log(1 - rng.random()) / math.log(0.75)) if bursty else 0)
        out += [t] * count


def simulate(policy_name: str, model: StepModel, workload: Sequence[tuple[int, int]], times: Sequence[float],
             limits: Limits, num_layers: int, slo: float | None = None, seed: int = 0,
             closed_loop: int = 0, seconds: float = 0.0) -> tuple[list[SimSample], float]:
    """Run the policy over the arrivals `times` (or, with `closed_loop` clients, for `seconds`); returns
    the samples (answered ones have `finished`) and the simulated end time."""
    rng = random.Random(seed)
    policy = make_policy(policy_name, lambda tokens: model.run_seconds([(t, num_layers // 2) for t in tokens]))
    waiting: Waitlist[SimSample] = Waitlist(num_layers, 2 * limits.max_batch_size)
    samples: list[SimSample] = []

    def arrive(at: float) -> None:
        tokens, exit_layer = workload[rng.randrange(len(workload))]
        s = SimSample(tokens, exit_layer, at, at + slo if slo else math.inf)
        samples.append(s)
        waiting.queue.append(s)

    pending = sorted(times)
    i, now, step_started = 0, 0.0, -1.0
    for _ in range(closed_loop):
        arrive(0.0)
    while True:
        while i < len(pending) and pending[i] <= now:
            arrive(pending[i])
            i += 1
        if closed_loop and now >= seconds:
            break
        step = policy.choose(waiting.view(now, step_started), limits)
        if step is None:
            if i >= len(pending):
                break
            now = pending[i]
            continue
        batch = waiting.take(step)
        step_started = now
        if step.mode == LAYER:
            now += model.layer_seconds([s.tokens for s in batch])
            for s in batch:
                if s.exit_layer == step.layer + 1:
                    s.finished = now
                else:
                    s.next_layer = step.layer + 1
                    waiting.park(s, now)
        else:
            now += model.run_seconds([(s.tokens, s.exit_layer) for s in batch])
            for s in batch:
                s.finished = now
        if closed_loop:
            for s in batch:
                if s.finished is not None:
                    arrive(now)
    return samples, now


def capacity(policy: str, model: StepModel, workload, limits: Limits, num_layers: int, seconds: float = 30.0) -> float:
    """Answers per second under a closed loop of 32 clients."""
    samples, end = simulate(policy, model, workload, [], limits, num_layers, closed_loop=32, seconds=seconds)
    return sum(s.finished is not None for s in samples) / end


def run_load(policy: str, model: StepModel, workload, limits: Limits, num_layers: int, rate: float, load: float,
             seconds: float, bursty: bool = False, slo: float | None = None, seed: int = 0) -> Result:
    times = arrivals(rate, seconds, bursty, random.Random(seed))
    samples, end = simulate(policy, model, workload, times, limits, num_layers, slo, seed)
    done = [s for s in samples if s.finished is not None]
    result = Result(policy, load, rate)
    result.latencies_ms = [(s.finished - s.submitted + model.overhead) * 1000 for s in done]
    result.throughput = len(done) / max(end, seconds)
    return result


# ---- fitting the cost model from the real backend ---------------------------------------------------

def fit(checkpoint: str, data: str, backend_name: str, reps: int = 3, seed: int = 0) -> dict:
    """Measure step times on the backend and fit `StepModel`; also record the workload (each dev
    sentence's tokens and exit layer at the checkpoint's threshold)."""
    from tqdm.auto import tqdm

    from exitserve.models.served import load_served

    served = load_served(checkpoint, backend_name)
    backend, cfg = served.backend, served.exit_config
    criterion = cfg.make_criterion()
    texts = dev_texts(data)
    samples = served.encoder.encode(texts)
    per_layer = np.array(cfg.thresholds(), np.float32)
    exits = backend.run(samples, np.broadcast_to(per_layer, (len(samples), cfg.num_layers)), criterion).exit_layer
    workload = [(len(s), int(e)) for s, e in zip(samples, exits, strict=True)]
    rng = random.Random(seed)
    runs, layers = [], []
    sizes = (1, 1, 2, 4, 8, 16, 32)
    with tqdm(total=reps * len(sizes) * 2, desc="step timings", unit="shape") as bar:
        for _ in range(reps):
            for size in sizes:
                idx = sorted(rng.sample(range(len(samples)), size), key=lambda i: len(samples[i]))
                batch = [samples[i] for i in idx]
                thresholds = np.broadcast_to(per_layer, (size, cfg.num_layers))
                backend.run(batch, thresholds, criterion)  # warm
                start = time.perf_counter()
                result = backend.run(batch, thresholds, criterion)
                runs.append((StepModel.terms([(len(s), int(e)) for s, e in zip(batch, result.exit_layer,
                                                                                 strict=True)]),
                             time.perf_counter() - start))
                bar.update()
                hidden = backend.embed(batch)
                attention = backend.attention(np.array([len(s) for s in batch]))
                backend.layer(0, hidden, attention)  # warm
                start = time.perf_counter()
                backend.layer(0, hidden, attention)
                layers.append((StepModel.terms([(len(s), 1) for s in batch]), time.perf_counter() - start))
                bar.update()
    return {"backend": backend_name, "num_layers": cfg.num_layers, "threshold": cfg.thresholds()[0],
            "run": _least_squares(runs), "layer": _least_squares(layers), "workload": workload,
            "measured": {"run": runs, "layer": layers}}


def _least_squares(points: list[tuple[tuple[float, float], float]]) -> list[float]:
    x = np.array([[1.0, a, b] for (a, b), _ in points])
    y = np.array([t for _, t in points])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return [float(max(c, 0.0)) for c in coef]


def dev_texts(data: str) -> list[str]:
    from exitserve.models.data import load_examples

    _, rows = load_examples(data, "dev")
    return list(rows.texts)
