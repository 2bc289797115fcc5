"""The learned exit rule (criterion `learned`): at layer k, a tiny model predicts "the final layer
would answer the same as this exit" from what is known at k, and its probability is the confidence.

Why: max-prob of one exit is a weak signal of whether the rest of the network would change its mind.
CALM (Schuster et al., NeurIPS 2022) trains exactly such a consistency classifier; its target is the
model's own final answer, so it needs no labels: any unlabelled text of the traffic fits it
(`exitserve fit-exit-rule`). The threshold on its score is then chosen by the same Learn-then-Test
procedure as any other criterion (models/calibration.py), so the guarantee does not depend on how well
the rule was fitted -- only the layers saved do.

What the rule reads at layer k (k = 1..L-1; the last layer always answers, with score 1):

  classification (answer a = the exit's argmax; log p = its log-softmax)
    gap        log p[a] - max_{j != a} log p[j]: this exit's own margin (with two classes max-prob,
               margin and entropy are all functions of it)
    summed     the same margin of the log-probabilities summed over exits 1..k: a vote of every exit so far
    previous   the previous exit's margin for this exit's answer (negative: it disagreed)
    same       1 when the previous exit gave the same answer
    streak     how many exits in a row before this one gave this answer, / (L - 1) (PABEE's patience)
    lte        the LTE module's output (0 without one)
  regression (answer v = the exit's output; "the same" means within the rule's tolerance)
    change     |v - v_prev|
    drift      |v - mean(v_1..v_{k-1})|
    streak     consecutive exits within tolerance of the previous one, / (L - 1)
    value      v
    lte        the LTE module's output (0 without one)

score = sigmoid(w_k . x + b_k): one logistic regression per layer, its weights a row of a table picked
by the layer index. Everything a step needs from earlier layers is a per-row float32 memory `[B, M]`
(the layer index, the streak, the previous answer, and for classification the previous exit's and the
summed log-probabilities), so rows can be regrouped freely between steps. A step is ~25 vectorised
numpy calls (no loop over rows), each with an ONNX counterpart (ReduceMax, Sub, Exp, ReduceSum, Log,
ArgMax, Equal, Where, Mul, Abs, Gather of the layer's weight row, Sigmoid); at batch 1 their count is
the cost, so features are written into preallocated arrays rather than stacked.

Stored in the checkpoint as `exit_rule.json` (`ExitRule`), with where it was fitted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as typed_dataclass

RULE_FILE = "exit_rule.json"
RULE_SCHEMA_VERSION = 1
CLASSIFICATION_FEATURES = ("gap", "summed", "previous", "same", "streak", "lte")
REGRESSION_FEATURES = ("change", "drift", "streak", "value", "lte")
Finite = Annotated[float, Field(allow_inf_nan=False)]


def feature_names(regression: bool) -> tuple[str, ...]:
    return REGRESSION_FEATURES if regression else CLASSIFICATION_FEATURES


def initial_memory(batch: int, num_outputs: int, regression: bool) -> np.ndarray:
    """Memory before layer 1: layer 0, streak 0, previous answer -1 (none), zero log-probabilities / sums."""
    memory = np.zeros((batch, 4 if regression else 3 + 2 * num_outputs), np.float32)
    memory[:, 2] = -1.0
    return memory


def rule_features(
    logits: np.ndarray, lte: np.ndarray | None, memory: np.ndarray, num_layers: int, regression: bool,
    tolerance: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(features `[B, F + 1]`, the last column 1 for the bias; the memory after this layer) of one
    layer's exit, for every row at once. Written column by column into preallocated arrays: at batch 1
    numpy's per-call cost is the whole cost, and stacking arrays costs several calls."""
    logits = np.asarray(logits, np.float32)
    batch = len(logits)
    layer, streak, previous = memory[:, 0], memory[:, 1], memory[:, 2]
    x = np.empty((batch, len(feature_names(regression)) + 1), np.float32)
    x[:, -1] = 1.0
    x[:, -2] = 0.0 if lte is None else lte
    new = np.empty_like(memory)
    new[:, 0] = layer + 1.0
    if regression:
        value = logits[:, 0]
        seen = layer > 0
        x[:, 0] = np.where(seen, np.abs(value - previous), 0.0)
        x[:, 1] = np.where(seen, np.abs(value - memory[:, 3] / np.maximum(layer, 1.0)), 0.0)
        new[:, 1] = np.where(seen & (x[:, 0] <= tolerance), streak + 1.0, 0.0)
        x[:, 2] = new[:, 1] / (num_layers - 1)
        x[:, 3] = value
        new[:, 2] = value
        new[:, 3] = memory[:, 3] + value
        return x, new
    classes = logits.shape[1]
    # this exit's log-probabilities, their sum over exits 1..k, the previous exit's: [B, 3, C]
    logps = np.empty((batch, 3, classes), np.float32)
    np.subtract(logits, logits.max(axis=1, keepdims=True), out=logps[:, 0])
    logps[:, 0] -= np.log(np.exp(logps[:, 0]).sum(axis=1, keepdims=True))
    np.add(memory[:, 3 + classes :], logps[:, 0], out=logps[:, 1])
    logps[:, 2] = memory[:, 3 : 3 + classes]
    answer = logits.argmax(axis=1)
    mine = (answer[:, None] == np.arange(classes))[:, None]  # [B, 1, C]
    # each one's margin for this exit's answer a: v[a] - max_{j != a} v[j]
    x[:, 0:3] = (logps * mine).sum(axis=2) - np.where(mine, -np.inf, logps).max(axis=2)
    same = answer == previous
    x[:, 3] = same
    new[:, 1] = (streak + 1.0) * same  # 0 if the answer changed, else one more
    x[:, 4] = new[:, 1] / (num_layers - 1)
    new[:, 2] = answer
    new[:, 3:] = logps[:, :2].reshape(batch, 2 * classes)
    return x, new


@typed_dataclass(config=ConfigDict(strict=True))
class ExitRule:
    """A fitted rule: `weights[k]`, `bias[k]` score layer k + 1 (k = 0..L-2). Construction validates
    types and shapes; `fitted` records what it was fitted on (the rows, for models/holdout.py)."""

    task_type: Literal["classification", "regression"]
    num_layers: Annotated[int, Field(ge=2)]
    num_outputs: Annotated[int, Field(ge=1)]
    features: list[str]
    weights: list[list[Finite]]
    bias: list[Finite]
    tolerance: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    kind: Literal["per-layer-logistic"] = "per-layer-logistic"
    fitted: dict[str, Any] = field(default_factory=dict)
    schema_version: Literal[1] = RULE_SCHEMA_VERSION

    def __post_init__(self) -> None:
        regression = self.task_type == "regression"
        if tuple(self.features) != feature_names(regression):
            raise ValueError(f"features must be {list(feature_names(regression))}, got {self.features}")
        if regression and self.tolerance is None:
            raise ValueError("a regression rule needs a tolerance")
        if regression != (self.num_outputs == 1):
            raise ValueError(f"a {self.task_type} rule cannot have {self.num_outputs} outputs")
        rows = self.num_layers - 1
        shapes = {len(self.weights), len(self.bias)}, {len(w) for w in self.weights}
        if shapes != ({rows}, {len(self.features)}):
            raise ValueError(f"weights must be [{rows} layers, {len(self.features)} features] and bias [{rows}]")
        # the table a step gathers from: [w_k, b_k] per layer, and a last row whose score is 1 (bias +inf)
        table = np.zeros((self.num_layers, len(self.features) + 1), np.float32)
        table[:-1, :-1], table[:-1, -1], table[-1, -1] = self.weights, self.bias, np.inf
        self._table = table

    @property
    def regression(self) -> bool:
        return self.task_type == "regression"

    def row(self, layer: int) -> np.ndarray:
        """`[w_k, b_k]` of layer `layer` (0-based; the last layer's row scores 1): what a step multiplies
        its features by (the composed ONNX graph takes them as constants)."""
        return self._table[layer].copy()

    def initial_memory(self, batch: int) -> np.ndarray:
        return initial_memory(batch, self.num_outputs, self.regression)

    def step(
        self, logits: np.ndarray, lte: np.ndarray | None, memory: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Score `[B]` in [0, 1] of one layer's exit and the memory after it."""
        x, new = rule_features(logits, lte, memory, self.num_layers, self.regression, self.tolerance)
        logit = (x * self._table[memory[:, 0].astype(np.intp)]).sum(axis=1)
        logit = np.clip(logit, -80.0, 80.0)  # the last layer's +inf bias: a score of exactly 1; no overflow
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(-logit))).astype(np.float32), new

    def describe(self) -> dict:
        """What the rule is and where it was fitted, for calibration records and reports."""
        return {"kind": self.kind, "features": list(self.features), "tolerance": self.tolerance, "fitted": self.fitted}

    def save(self, directory: Path) -> None:
        (directory / RULE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")
