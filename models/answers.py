"""What an exit answers, written once: the answer rule and the per-input result types.

The rule: for regression an exit's answer is its first (only) logit; for classification it is the
argmax label id. Criteria (patience compares answers), the engines (library and server), evaluation
and training strategies all use `answers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def answers(logits: torch.Tensor, regression: bool) -> torch.Tensor:
    """`[..., C]` logits -> `[...]` float answers: the value (regression) or the label id."""
    return logits[..., 0].float() if regression else logits.argmax(-1).float()


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
    value = float(answers(logits, regression))
    if regression:
        return value, None, None
    return value, int(value), logits.float().softmax(-1).tolist()
