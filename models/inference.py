"""Layer-by-layer batched inference with early exit.

`predict` runs a batch one layer at a time. After each layer every active row's exit computes a
confidence; rows whose confidence passes their threshold leave with that exit's answer, and the
next layer runs only on the rows still active, trimmed to the padding they still need. The exit
decision is the only host synchronisation per layer (one small boolean copy); everything else is
indexed with CPU-side bookkeeping.

`record_all_layers` runs every layer for every sample once and keeps every exit's output, and
`simulate_exits` replays any criterion/threshold over those outputs with the same decision rule,
so threshold sweeps and layer-wise curves cost one pass over the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from exitserve.models.criteria import ExitCriterion, exits_now
from exitserve.models.early_exit import AllExits, EarlyExitModel
from exitserve.models.encoding import Encoded, collate


@dataclass
class LayerTrace:
    layer: int
    confidence: float
    prediction: float  # label id (classification) or value (regression)


@dataclass
class Prediction:
    exit_layer: int  # 1-based
    confidence: float
    value: float  # regression output, or the label id as a float
    label_id: int | None  # classification only
    probabilities: list[float] | None  # classification only
    trace: list[LayerTrace] | None = None


def decode(logits: torch.Tensor, regression: bool) -> tuple[float, int | None, list[float] | None]:
    """One row of logits -> (value, label id, probabilities)."""
    if regression:
        return float(logits[0]), None, None
    probs = logits.float().softmax(-1)
    label = int(probs.argmax())
    return float(label), label, probs.tolist()


def _answer(logits: torch.Tensor, regression: bool) -> torch.Tensor:
    return logits[:, 0].float() if regression else logits.argmax(-1).float()


@torch.inference_mode()
def predict_batch(
    model: EarlyExitModel,
    criterion: ExitCriterion,
    samples: Sequence[Encoded],
    thresholds: torch.Tensor,
    pad_id: int,
    return_trace: bool = False,
) -> list[Prediction]:
    """Early-exit inference for one batch. `thresholds` is `[B, L]` (a row per sample)."""
    device = next(model.parameters()).device
    batch = collate(samples, pad_id, device)
    lengths = torch.tensor([len(s) for s in samples])
    num, num_layers = len(samples), model.num_layers
    thresholds = thresholds.to(device)

    hidden = model.embed(batch["input_ids"], batch.get("token_type_ids"))
    mask = batch["attention_mask"]
    memory = criterion.initial_memory(num, device)
    active = torch.arange(num)  # CPU: which original rows are still running

    out_logits = torch.zeros(num, model.num_outputs, device=device)
    out_conf = torch.zeros(num, device=device)
    out_layer = torch.zeros(num, dtype=torch.long)
    # per-layer confidence and answer of every row while it runs (NaN once it has left)
    trace = torch.full((2, num_layers, num), float("nan"), device=device) if return_trace else None

    for k in range(num_layers):
        hidden = model.run_layer(k, hidden, mask)
        logits, lte = model.exit_outputs(k, hidden, mask)
        conf, memory = criterion.confidence(logits, lte, memory)
        leave = exits_now(conf, thresholds[active.to(device), k], k == num_layers - 1)
        if trace is not None:
            rows = active.to(device)
            trace[0, k, rows] = conf.float()
            trace[1, k, rows] = _answer(logits, criterion.regression)
        leave_cpu = leave.cpu()  # the one host sync of this layer
        gone, stay = leave_cpu.nonzero().squeeze(1), (~leave_cpu).nonzero().squeeze(1)
        if len(gone):
            rows = active[gone].to(device)
            out_logits[rows] = logits[gone.to(device)].float()
            out_conf[rows] = conf[gone.to(device)].float()
            out_layer[active[gone]] = k + 1
        if not len(stay):
            break
        active = active[stay]
        width = int(lengths[active].max())
        keep = stay.to(device)
        hidden, mask = hidden[keep, :width], mask[keep, :width]
        memory = memory[keep] if memory is not None else None

    out_logits, out_conf = out_logits.cpu(), out_conf.cpu()
    traces = trace.cpu() if trace is not None else None
    results = []
    for i in range(num):
        value, label, probs = decode(out_logits[i], criterion.regression)
        steps = None
        if traces is not None:
            steps = [
                LayerTrace(k + 1, float(traces[0, k, i]), float(traces[1, k, i]))
                for k in range(int(out_layer[i]))
            ]
        results.append(Prediction(int(out_layer[i]), float(out_conf[i]), value, label, probs, steps))
    return results


def length_batches(samples: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (less padding); callers restore the input order."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def predict(
    model: EarlyExitModel,
    criterion: ExitCriterion,
    samples: Sequence[Encoded],
    thresholds: Sequence[float],
    pad_id: int,
    batch_size: int = 32,
    return_trace: bool = False,
) -> list[Prediction]:
    """Early-exit predictions for any number of samples, in input order; one threshold per layer."""
    per_layer = torch.tensor(thresholds, dtype=torch.float32)
    results: list[Prediction | None] = [None] * len(samples)
    for idx in length_batches(samples, batch_size):
        rows = predict_batch(
            model, criterion, [samples[i] for i in idx], per_layer.expand(len(idx), -1), pad_id, return_trace
        )
        for i, result in zip(idx, rows, strict=True):
            results[i] = result
    return results  # type: ignore[return-value]


@torch.inference_mode()
def record_all_layers(
    model: EarlyExitModel, samples: Sequence[Encoded], pad_id: int, batch_size: int = 32, progress=None
) -> AllExits:
    """Every exit's output for every sample, in input order: logits `[L, N, C]`, LTE `[L, N]`."""
    device = next(model.parameters()).device
    logits = torch.zeros(model.num_layers, len(samples), model.num_outputs)
    lte = torch.zeros(model.num_layers, len(samples)) if model.lte is not None else None
    for idx in length_batches(samples, batch_size):
        batch = collate([samples[i] for i in idx], pad_id, device)
        out = model(**batch)
        logits[:, idx] = out.logits.float().cpu()
        if lte is not None and out.lte is not None:
            lte[:, idx] = out.lte.float().cpu()
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
    memory = criterion.initial_memory(num, torch.device("cpu"))
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
