"""Batched inference with early exit, on any runtime backend (models/backends).

`predict` cuts the samples into batches of similar length and runs each with `Backend.run`: every row
leaves at the first layer whose confidence passes its threshold, and a row that exits at layer k costs
k layers (on ONNX Runtime the whole decision runs inside one graph; elsewhere layer by layer, dropping
exited rows and trimming padding after every layer: models/backends/base.py).

`record_all_layers` runs every layer for every sample once and keeps every exit's output, and
`simulate_exits` replays any criterion/threshold over those outputs with the same decision rule
(criteria.decide), so threshold sweeps and layer-wise curves cost one pass over the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from exitserve.models.answers import AllExits, LayerTrace, Prediction, answers, decode
from exitserve.models.backends.base import Backend, BatchResult
from exitserve.models.criteria import ExitCriterion, decide
from exitserve.models.encoding import Encoded


def predictions(result: BatchResult, regression: bool, trace: bool = False) -> list[Prediction]:
    """A batch's results as one `Prediction` per row (with its per-layer trace when asked)."""
    out = []
    for i in range(len(result.exit_layer)):
        value, label, probs = decode(result.logits[i], regression)
        steps = None
        if trace:
            layers = int(result.exit_layer[i])
            said = answers(result.trace_logits[i, :layers], regression)
            steps = [LayerTrace(k + 1, float(result.trace_confidence[i, k]), float(said[k])) for k in range(layers)]
        out.append(Prediction(int(result.exit_layer[i]), float(result.confidence[i]), value, label, probs, steps))
    return out


def length_batches(samples: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (less padding); callers restore the input order."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def predict(
    backend: Backend,
    criterion: ExitCriterion,
    samples: Sequence[Encoded],
    thresholds: Sequence[float],
    batch_size: int = 32,
    return_trace: bool = False,
) -> list[Prediction]:
    """Early-exit predictions for any number of samples, in input order; one threshold per layer."""
    per_layer = np.asarray(thresholds, dtype=np.float32)
    results: list[Prediction | None] = [None] * len(samples)
    for idx in length_batches(samples, batch_size):
        batch = [samples[i] for i in idx]
        rows = np.broadcast_to(per_layer, (len(idx), len(per_layer)))
        result = backend.run(batch, rows, criterion, return_trace)
        for i, prediction in zip(idx, predictions(result, criterion.regression, return_trace), strict=True):
            results[i] = prediction
    return results  # type: ignore[return-value]


def record_all_layers(backend: Backend, samples: Sequence[Encoded], batch_size: int = 32, progress=None) -> AllExits:
    """Every exit's output for every sample, in input order: logits `[L, N, C]`, LTE `[L, N]` (or None)."""
    logits = np.zeros((backend.num_layers, len(samples), backend.num_outputs), np.float32)
    lte = None
    for idx in length_batches(samples, batch_size):
        batch = [samples[i] for i in idx]
        lengths = np.array([len(s) for s in batch])
        hidden, attention = backend.embed(batch), backend.attention(lengths)
        for k in range(backend.num_layers):
            hidden, out = backend.layer(k, hidden, attention)
            logits[k, idx] = out.logits
            if out.lte is not None:
                lte = np.zeros((backend.num_layers, len(samples)), np.float32) if lte is None else lte
                lte[k, idx] = out.lte
        if progress is not None:
            progress.update(len(idx))
    return AllExits(logits, lte)


@dataclass
class SimulatedExits:
    exit_layer: np.ndarray  # [N], 1-based
    logits: np.ndarray  # [N, C], the answering exit's logits
    confidence: np.ndarray  # [N]


def simulate_exits(recorded: AllExits, criterion: ExitCriterion, thresholds: Sequence[float]) -> SimulatedExits:
    """Where each sample would exit under `thresholds`, using the recorded outputs (no model run)."""
    num_layers, num = recorded.logits.shape[:2]
    memory = criterion.initial_memory(num)
    done = np.zeros(num, dtype=bool)
    exit_layer = np.zeros(num, dtype=np.int64)
    out_logits = np.zeros(recorded.logits.shape[1:], np.float32)
    out_conf = np.zeros(num, np.float32)
    for k in range(num_layers):
        lte = recorded.lte[k] if recorded.lte is not None else None
        decision = decide(criterion, recorded.logits[k], lte, memory, np.full(num, thresholds[k], np.float32),
                          k == num_layers - 1)
        memory = decision.memory
        leave = decision.leave & ~done
        exit_layer[leave] = k + 1
        out_logits[leave] = recorded.logits[k][leave]
        out_conf[leave] = decision.confidence[leave]
        done |= leave
    return SimulatedExits(exit_layer, out_logits, out_conf)
