"""Exit criteria: after each layer, how confident is that layer's exit, in [0, 1]?

A sample exits at the first layer whose confidence >= the threshold for that layer. A threshold
of 1.0 or more disables early exit (every layer runs), whatever the criterion; 0.0 exits at layer 1.
The last layer always answers.

  max-prob  the largest softmax probability (BERxiT/DeeBERT's criterion);
  entropy   1 - H(p) / log C, with H computed from log-softmax (no overflow for large logits);
  lte       the learned-to-exit module's output (one linear layer + sigmoid, shared by all layers);
            the only criterion besides patience that works for regression;
  patience  PABEE: how many consecutive earlier layers gave the same answer, as a fraction of
            L - 1. A threshold t therefore means "patience of ceil(t * (L - 1)) layers".
            For regression "the same answer" means |prediction - previous| < delta.
  learned   a fitted rule's probability that the final layer would give this exit's answer
            (models/exit_rule.py; `exitserve fit-exit-rule`).

numpy, float32, so serving never needs torch; the composed ONNX graph computes the same in ONNX
(models/backends/onnx_criteria.py). Criteria that need history (patience, learned) carry a small per-row
`memory` array `[B, M]`; callers subset it together with the hidden states when rows leave the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from exitserve.models.answers import answers, softmax
from exitserve.models.exit_rule import ExitRule

CRITERIA = ("max-prob", "entropy", "lte", "patience", "learned")
CLASSIFICATION_ONLY = ("max-prob", "entropy")


@dataclass(frozen=True)
class ExitCriterion:
    name: str
    num_layers: int
    regression: bool = False
    delta: float = 0.1  # patience, regression only
    rule: ExitRule | None = field(default=None, compare=False)  # learned

    def __post_init__(self) -> None:
        if self.name not in CRITERIA:
            raise ValueError(f"unknown exit criterion {self.name!r}; choose one of {', '.join(CRITERIA)}")
        if self.name == "learned" and self.rule is None:
            raise ValueError("criterion 'learned' needs a fitted exit rule (exitserve fit-exit-rule)")
        if self.regression and self.name in CLASSIFICATION_ONLY:
            raise ValueError(f"criterion {self.name!r} needs class probabilities; use lte or patience")

    @property
    def has_memory(self) -> bool:
        """Whether confidence depends on earlier layers (then every layer's exit must run)."""
        return self.name in ("patience", "learned")

    def initial_memory(self, batch: int) -> np.ndarray | None:
        """Per-row state for criteria with history: patience (previous answer, streak); learned: its rule's."""
        if self.rule is not None and self.name == "learned":
            return self.rule.initial_memory(batch)
        if not self.has_memory:
            return None
        memory = np.zeros((batch, 2), dtype=np.float32)
        memory[:, 0] = np.nan
        return memory

    def confidence(
        self, logits: np.ndarray, lte: np.ndarray | None, memory: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Confidence `[B]` float32 of one layer's exit and the updated memory."""
        logits = logits.astype(np.float32, copy=False)
        if self.name == "max-prob":
            return softmax(logits).max(-1), memory
        if self.name == "entropy":
            shifted = logits - logits.max(-1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            plogp = (np.exp(logp) * logp).sum(-1)  # -H
            return np.clip(np.float32(1.0) + plogp / np.float32(math.log(logits.shape[-1])), 0.0, 1.0), memory
        if self.name == "lte":
            if lte is None:
                raise ValueError("criterion 'lte' needs a model trained with the LTE module")
            return lte.astype(np.float32, copy=False), memory
        assert memory is not None
        if self.rule is not None and self.name == "learned":
            return self.rule.step(logits, lte, memory)
        answer = answers(logits, self.regression)
        previous, streak = memory[:, 0], memory[:, 1]
        same = np.abs(answer - previous) < np.float32(self.delta) if self.regression else answer == previous
        streak = np.where(same, streak + np.float32(1.0), np.float32(0.0))
        conf = np.minimum(streak / np.float32(max(self.num_layers - 1, 1)), np.float32(1.0))
        return conf, np.stack([answer, streak], axis=1)


def expand_thresholds(threshold: float | Sequence[float], num_layers: int) -> list[float]:
    """One threshold per layer, from a single float or a per-layer list."""
    if isinstance(threshold, (int, float)):
        values = [float(threshold)] * num_layers
    else:
        values = [float(t) for t in threshold]
        if len(values) != num_layers:
            raise ValueError(f"per-layer thresholds need {num_layers} values, got {len(values)}")
    if any(not 0.0 <= t <= 1.0 for t in values):
        raise ValueError("thresholds must lie in [0, 1]")
    return values


def exits_now(conf: np.ndarray, thresholds: np.ndarray, is_last_layer: bool) -> np.ndarray:
    """Boolean `[B]`: which rows leave at this layer, given each row's threshold `[B]` for it."""
    if is_last_layer:
        return np.ones(conf.shape, dtype=bool)
    return (conf >= thresholds) & (thresholds < 1.0)


@dataclass
class Decision:
    """One layer's exit decision for a batch: each row's confidence `[B]`, whether it leaves `[B]`, and
    the criterion's updated memory."""

    confidence: np.ndarray
    leave: np.ndarray
    memory: np.ndarray | None


def decide(
    criterion: ExitCriterion, logits: np.ndarray, lte: np.ndarray | None, memory: np.ndarray | None,
    thresholds: np.ndarray, is_last_layer: bool,
) -> Decision:
    """The exit rule, once for every engine: a layer's confidence, and which rows leave at it."""
    conf, memory = criterion.confidence(logits, lte, memory)
    return Decision(conf, exits_now(conf, thresholds, is_last_layer), memory)
