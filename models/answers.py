"""What an exit answers, written once: the answer rule and the per-input result types.

The rule: for regression an exit's answer is its first (only) logit; for classification it is the
argmax label id. Criteria (patience compares answers), the engines (library and server), evaluation
and training strategies all use `answers`: on numpy arrays (inference, which never needs torch) and on
torch tensors (training), the same indexing either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Array = Any  # a numpy array, or a torch tensor in training code


def answers(logits: Array, regression: bool) -> Array:
    """`[..., C]` logits -> `[...]` float32 answers: the value (regression) or the label id."""
    out = logits[..., 0] if regression else logits.argmax(-1)
    return out.astype(np.float32) if isinstance(out, np.ndarray | np.generic) else out.float()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32 (max-subtracted: no overflow)."""
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


@dataclass
class AllExits:
    """Every exit's output for a batch: logits `[L, B, C]`, LTE confidence `[L, B]` (or None); numpy
    arrays when recorded by inference, torch tensors inside training."""

    logits: Array
    lte: Array | None


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


def decode(logits: np.ndarray, regression: bool) -> tuple[float, int | None, list[float] | None]:
    """One row of logits `[C]` -> (value, label id, probabilities)."""
    value = float(answers(logits, regression))
    if regression:
        return value, None, None
    return value, int(value), softmax(logits.astype(np.float32)).tolist()


@dataclass
class ExitRecord:
    """What every exit said for one input, and where it was answered: a shadow audit's record
    (server/audit.py). logits `[L, C]`, LTE `[L]` (LTE models), exit layer 1-based."""

    exit_layer: int
    logits: np.ndarray
    lte: np.ndarray | None = None
