"""The runtime seam: what early-exit inference needs from whatever computes the model.

Two engines drive a backend: the library's `predict` (models/inference.py) and the server's
scheduler (server/scheduler.py). Neither knows which runtime is behind it. They use two levels:

    result = backend.run(samples, thresholds, criterion, trace)   # a batch, each row to its exit

`run` answers a batch whose rows exit at different layers, in one call: the ONNX Runtime backend runs it
inside ONE graph (onnx_compose.py); the default below drives the layer-level calls, which are also
what a scheduler that re-batches between layers uses:

    hidden = backend.embed(samples)                      # token ids -> [B, S, H], right-padded
    attn = backend.attention(lengths)                    # built once per batch, used by every layer
    hidden, exit = backend.layer(k, hidden, attn, need)  # layer k, then exit k: logits [B, C] (+ LTE)
    rows = backend.rows(hidden, lengths)                 # per-sample states, kept between steps
    hidden = backend.stack(rows)                         # right-pad per-sample states into a batch
    hidden = backend.select(hidden, keep, width)         # keep some rows, trimmed to `width` tokens

Hidden states stay in the backend's own array type (torch tensors on the model's device; numpy arrays
for ONNX Runtime). Exit outputs come back as CPU float32 numpy arrays, so the exit criteria
(models/criteria.py) and the answer rule (models/answers.py) are the same for every backend. A layer
whose exit cannot let any row leave (`need_exit=False`: every row's threshold is 1.0, no trace, a
criterion without history) may skip the exit head.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from exitserve.models.criteria import ExitCriterion, decide
from exitserve.models.encoding import Encoded

QUANTIZATIONS = ("none", "int8")  # weight formats: none (the checkpoint's fp32), int8 (ONNX Runtime only)

Hidden = Any  # the backend's own array type: `[B, S, H]`
Row = Any  # one sample's `[len, H]` slice of a `Hidden`


@dataclass
class ExitOutput:
    """One layer's exit for a batch, on the CPU: logits `[B, C]` float32, LTE confidence `[B]` (or None)."""

    logits: np.ndarray
    lte: np.ndarray | None


@dataclass
class BatchResult:
    """A batch run to each row's exit: the answering exit's logits `[B, C]`, confidence `[B]` and layer
    `[B]` (1-based); with `trace`, what every layer said: confidence `[B, L]`, logits `[B, L, C]` and
    LTE `[B, L]` (LTE models), NaN at the layers a row did not run."""

    logits: np.ndarray
    confidence: np.ndarray
    exit_layer: np.ndarray
    trace_confidence: np.ndarray | None = None
    trace_logits: np.ndarray | None = None
    trace_lte: np.ndarray | None = None


def needs_exit(criterion: ExitCriterion, thresholds: np.ndarray, is_last_layer: bool, trace: bool) -> bool:
    """Whether a layer's exit head must run: some row may leave here, or its output is wanted anyway."""
    return is_last_layer or trace or criterion.has_memory or bool((thresholds < 1.0).any())


class Backend(ABC):
    """A runtime that computes an early-exit model (see the module docstring)."""

    name: str
    device: Any  # where it computes (printed in reports)
    num_layers: int
    num_outputs: int
    pad_id: int
    # Where this backend's calibrated threshold is stored in the checkpoint (ExitConfig.threshold_for):
    # None for the checkpoint's default (torch and fp32 ONNX Runtime agree), a key for a variant whose
    # answers differ (quantised weights).
    calibration_key: str | None = None
    quantize: str = "none"  # one of QUANTIZATIONS

    def run(
        self, samples: Sequence[Encoded], thresholds: np.ndarray, criterion: ExitCriterion, trace: bool = False
    ) -> BatchResult:
        """Every sample of a batch to its exit; `thresholds` is `[B, L]` float32 (a row per sample)."""
        return run_layers(self, samples, thresholds, criterion, trace)

    def release_checks(self) -> None:  # noqa: B027 (a hook: most backends hold nothing extra)
        """Free what only the load-time checks needed (models/self_test.py); the layer-level calls still
        work afterwards (a backend may reload what they use)."""

    @abstractmethod
    def embed(self, samples: Sequence[Encoded]) -> Hidden:
        """The embedding layer's output for the right-padded samples."""

    @abstractmethod
    def attention(self, lengths: np.ndarray) -> Any:
        """Whatever every layer of a batch with these row lengths needs to mask padding (built once)."""

    @abstractmethod
    def layer(
        self, index: int, hidden: Hidden, attention: Any, need_exit: bool = True
    ) -> tuple[Hidden, ExitOutput | None]:
        """Transformer layer `index` (0-based) and its exit; the exit is None when skipped (`need_exit` False)."""

    @abstractmethod
    def select(self, hidden: Hidden, keep: np.ndarray, width: int) -> Hidden:
        """Rows `keep` of `hidden`, trimmed to their first `width` positions."""

    @abstractmethod
    def rows(self, hidden: Hidden, lengths: Sequence[int]) -> list[Row]:
        """Each row's real tokens' states (views where the array type allows)."""

    @abstractmethod
    def stack(self, rows: Sequence[Row]) -> Hidden:
        """Right-pad per-sample states into one `[B, S, H]` batch."""


def run_layers(
    backend: Backend, samples: Sequence[Encoded], thresholds: np.ndarray, criterion: ExitCriterion,
    trace: bool = False,
) -> BatchResult:
    """`Backend.run` through the layer-level calls: after each layer every active row's exit decides
    (criteria.decide); rows that leave keep that exit's answer, and the next layer runs only on the rows
    still active, trimmed to the padding they still need (the attention inputs are rebuilt then). One
    host synchronisation per layer; a layer at which no row could exit skips its exit head."""
    num, num_layers, num_outputs = len(samples), backend.num_layers, backend.num_outputs
    lengths = np.array([len(s) for s in samples])
    hidden = backend.embed(samples)
    attention = backend.attention(lengths)
    memory = criterion.initial_memory(num)
    active = np.arange(num)  # which original rows are still running
    result = BatchResult(np.zeros((num, num_outputs), np.float32), np.zeros(num, np.float32), np.zeros(num, np.int64))
    if trace:
        result.trace_confidence = np.full((num, num_layers), np.nan, np.float32)
        result.trace_logits = np.full((num, num_layers, num_outputs), np.nan, np.float32)
    for k in range(num_layers):
        last = k == num_layers - 1
        row_thresholds = thresholds[active, k]
        hidden, out = backend.layer(k, hidden, attention, needs_exit(criterion, row_thresholds, last, trace))
        if out is None:
            continue
        decision = decide(criterion, out.logits, out.lte, memory, row_thresholds, last)
        memory = decision.memory
        if trace:
            result.trace_confidence[active, k] = decision.confidence
            result.trace_logits[active, k] = out.logits
            if out.lte is not None:
                if result.trace_lte is None:
                    result.trace_lte = np.full((num, num_layers), np.nan, np.float32)
                result.trace_lte[active, k] = out.lte
        gone, stay = decision.leave.nonzero()[0], (~decision.leave).nonzero()[0]
        result.logits[active[gone]] = out.logits[gone]
        result.confidence[active[gone]] = decision.confidence[gone]
        result.exit_layer[active[gone]] = k + 1
        if not len(stay):
            break
        if len(gone):  # the batch changed: keep the rest, trimmed to the padding they still need
            active = active[stay]
            hidden = backend.select(hidden, stay, int(lengths[active].max()))
            attention = backend.attention(lengths[active])
            memory = memory[stay] if memory is not None else None
    return result
