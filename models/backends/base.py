"""The runtime seam: what early-exit inference needs from whatever computes the model.

Two engines drive a backend: the library's `predict` (models/inference.py: one batch whose rows leave
as they exit) and the server's layer-level scheduler (server/scheduler.py: a new batch every layer
step, formed from samples waiting at the same layer). Neither knows which runtime is behind it:

    hidden = backend.embed(samples)                      # token ids -> [B, S, H], right-padded
    attn = backend.attention(lengths)                    # built once per batch, used by every layer
    hidden, exit = backend.layer(k, hidden, attn, need)  # layer k, then exit k: logits [B, C] (+ LTE)
    rows = backend.rows(hidden, lengths)                 # per-sample states, kept between steps
    hidden = backend.stack(rows)                         # right-pad per-sample states into a batch
    hidden = backend.select(hidden, keep, width)         # keep some rows, trimmed to `width` tokens

Hidden states stay in the backend's own array type (torch tensors on the model's device; numpy arrays
for ONNX Runtime). Exit outputs come back as CPU float32 torch tensors, so the exit criteria
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
import torch

from exitserve.models.encoding import Encoded

QUANTIZATIONS = ("none", "int8")  # weight formats: none (the checkpoint's fp32), int8 (ONNX Runtime only)

Hidden = Any  # the backend's own array type: `[B, S, H]`
Row = Any  # one sample's `[len, H]` slice of a `Hidden`


@dataclass
class ExitOutput:
    """One layer's exit for a batch, on the CPU: logits `[B, C]` float32, LTE confidence `[B]` (or None)."""

    logits: torch.Tensor
    lte: torch.Tensor | None


class Backend(ABC):
    """A runtime that computes an early-exit model one layer at a time (see the module docstring)."""

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
