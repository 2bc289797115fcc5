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

Criteria that need history (patience, learned) carry a small per-row `memory` tensor; callers subset it
together with the hidden states when rows leave the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from exitserve.models.answers import answers
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

    def initial_memory(self, batch: int) -> torch.Tensor | None:
        """Per-row state for criteria with history: patience (previous answer, streak); learned: its rule's."""
        if self.rule is not None and self.name == "learned":
            return torch.from_numpy(self.rule.initial_memory(batch))
        if not self.has_memory:
            return None
        memory = torch.zeros(batch, 2)
        memory[:, 0] = math.nan
        return memory

    def confidence(
        self, logits: torch.Tensor, lte: torch.Tensor | None, memory: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Confidence `[B]` of one layer's exit and the updated memory."""
        if self.name == "max-prob":
            return logits.float().softmax(-1).amax(-1), memory
        if self.name == "entropy":
            logp = logits.float().log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            return (1.0 - entropy / math.log(logits.shape[-1])).clamp(0.0, 1.0), memory
        if self.name == "lte":
            if lte is None:
                raise ValueError("criterion 'lte' needs a model trained with the LTE module")
            return lte.float(), memory
        assert memory is not None
        if self.rule is not None and self.name == "learned":
            score, memory_after = self.rule.step(
                np.asarray(logits, np.float32), None if lte is None else np.asarray(lte), np.asarray(memory))
            return torch.from_numpy(score), torch.from_numpy(memory_after)
        answer = answers(logits, self.regression)
        previous, streak = memory[:, 0], memory[:, 1]
        same = (answer - previous).abs() < self.delta if self.regression else answer == previous
        streak = torch.where(same, streak + 1, torch.zeros_like(streak))
        conf = (streak / max(self.num_layers - 1, 1)).clamp(max=1.0)
        return conf, torch.stack([answer, streak], dim=1)


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


def exits_now(conf: torch.Tensor, thresholds: torch.Tensor, is_last_layer: bool) -> torch.Tensor:
    """Boolean `[B]`: which rows leave at this layer, given each row's threshold `[B]` for it."""
    if is_last_layer:
        return torch.ones_like(conf, dtype=torch.bool)
    return (conf >= thresholds) & (thresholds < 1.0)
