"""Layer-by-layer batched inference with early exit, on any runtime backend (models/backends).

`predict` runs a batch one layer at a time. After each layer every active row's exit computes a
confidence; rows whose confidence passes their threshold leave with that exit's answer, and the
next layer runs only on the rows still active, trimmed to the padding they still need. The backend
builds the batch's attention inputs once, and again only when rows leave. Exit outputs come back on
the CPU, which is the one host synchronisation per layer; a layer at which no row could exit (every
threshold 1.0, no trace, no criterion history) skips its exit head.

`record_all_layers` runs every layer for every sample once and keeps every exit's output, and
`simulate_exits` replays any criterion/threshold over those outputs with the same decision rule,
so threshold sweeps and layer-wise curves cost one pass over the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from exitserve.models.answers import LayerTrace, Prediction, answers, decode
from exitserve.models.backends import Backend
from exitserve.models.criteria import ExitCriterion, exits_now
from exitserve.models.early_exit import AllExits
from exitserve.models.encoding import Encoded


def needs_exit(criterion: ExitCriterion, thresholds: torch.Tensor, is_last_layer: bool, trace: bool) -> bool:
    """Whether a layer's exit head must run: some row may leave here, or its output is wanted anyway."""
    return is_last_layer or trace or criterion.has_memory or bool((thresholds < 1.0).any())


def predict_batch(
    backend: Backend,
    criterion: ExitCriterion,
    samples: Sequence[Encoded],
    thresholds: torch.Tensor,
    return_trace: bool = False,
) -> list[Prediction]:
    """Early-exit inference for one batch. `thresholds` is `[B, L]` (a row per sample)."""
    num, num_layers = len(samples), backend.num_layers
    lengths = np.array([len(s) for s in samples])
    hidden = backend.embed(samples)
    attention = backend.attention(lengths)
    memory = criterion.initial_memory(num)
    active = np.arange(num)  # which original rows are still running

    out_logits = torch.zeros(num, backend.num_outputs)
    out_conf = torch.zeros(num)
    out_layer = np.zeros(num, dtype=np.int64)
    # per-layer confidence and answer of every row while it runs (NaN once it has left)
    trace = torch.full((2, num_layers, num), float("nan")) if return_trace else None

    for k in range(num_layers):
        last = k == num_layers - 1
        row_thresholds = thresholds[torch.from_numpy(active), k]
        hidden, out = backend.layer(k, hidden, attention, needs_exit(criterion, row_thresholds, last, return_trace))
        if out is None:
            continue
        conf, memory = criterion.confidence(out.logits, out.lte, memory)
        leave = exits_now(conf, row_thresholds, last).numpy()
        if trace is not None:
            trace[0, k, active] = conf
            trace[1, k, active] = answers(out.logits, criterion.regression)
        gone, stay = leave.nonzero()[0], (~leave).nonzero()[0]
        out_logits[active[gone]] = out.logits[gone]
        out_conf[active[gone]] = conf[gone]
        out_layer[active[gone]] = k + 1
        if not len(stay):
            break
        if len(gone):  # the batch changed: keep the rest, trimmed to the padding they still need
            active = active[stay]
            width = int(lengths[active].max())
            hidden = backend.select(hidden, stay, width)
            attention = backend.attention(lengths[active])
            memory = memory[torch.from_numpy(stay)] if memory is not None else None

    results = []
    for i in range(num):
        value, label, probs = decode(out_logits[i], criterion.regression)
        steps = None
        if trace is not None:
            steps = [LayerTrace(k + 1, float(trace[0, k, i]), float(trace[1, k, i])) for k in range(out_layer[i])]
        results.append(Prediction(int(out_layer[i]), float(out_conf[i]), value, label, probs, steps))
    return results


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
    per_layer = torch.tensor(thresholds, dtype=torch.float32)
    results: list[Prediction | None] = [None] * len(samples)
    for idx in length_batches(samples, batch_size):
        batch = [samples[i] for i in idx]
        rows = predict_batch(backend, criterion, batch, per_layer.expand(len(idx), -1), return_trace)
        for i, result in zip(idx, rows, strict=True):
            results[i] = result
    return results  # type: ignore[return-value]


def record_all_layers(backend: Backend, samples: Sequence[Encoded], batch_size: int = 32, progress=None) -> AllExits:
    """Every exit's output for every sample, in input order: logits `[L, N, C]`, LTE `[L, N]` (or None)."""
    logits = torch.zeros(backend.num_layers, len(samples), backend.num_outputs)
    lte = None
    for idx in length_batches(samples, batch_size):
        batch = [samples[i] for i in idx]
        lengths = np.array([len(s) for s in batch])
        hidden, attention = backend.embed(batch), backend.attention(lengths)
        for k in range(backend.num_layers):
            hidden, out = backend.layer(k, hidden, attention)
            logits[k, idx] = out.logits
            if out.lte is not None:
                lte = torch.zeros(backend.num_layers, len(samples)) if lte is None else lte
                lte[k, idx] = out.lte
        if progress is not None:
            progress.update(len(idx))
    return AllExits(logits, lte)


@dataclass
class SimulatedExits:
    exit_layer: torch.Tensor  # [N], 1-based
    logits: torch.Tensor  # [N, C], the answering exit's logits
    confidence: torch.Tensor  # [N]


def simulate_exits(
    recorded: AllExits, criterion: ExitCriterion, thresholds: Sequence[float]
) -> SimulatedExits:
    """Where each sample would exit under `thresholds`, using the recorded outputs (no model run)."""
    num_layers, num = recorded.logits.shape[:2]
    memory = criterion.initial_memory(num)
    done = torch.zeros(num, dtype=torch.bool)
    exit_layer = torch.zeros(num, dtype=torch.long)
    out_logits = torch.zeros(recorded.logits.shape[1:])
    out_conf = torch.zeros(num)
    for k in range(num_layers):
        lte = recorded.lte[k] if recorded.lte is not None else None
        conf, memory = criterion.confidence(recorded.logits[k], lte, memory)
        leave = exits_now(conf, torch.full((num,), thresholds[k]), k == num_layers - 1) & ~done
        exit_layer[leave] = k + 1
        out_logits[leave] = recorded.logits[k][leave]
        out_conf[leave] = conf[leave]
        done |= leave
    return SimulatedExits(exit_layer, out_logits, out_conf)
