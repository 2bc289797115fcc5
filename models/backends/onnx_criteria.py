"""Each exit criterion (models/criteria.py) written as ONNX nodes, for the composed early-exit graph
(onnx_compose.py). Same arithmetic as the numpy version, in float32; tests check the two agree.

A criterion with history (patience) carries its per-row memory as one `[b]` tensor per column of the
numpy version's `[b, M]` memory; the composed graph gathers them with the rows that stay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from exitserve.models.criteria import ExitCriterion


class Scope(Protocol):
    def op(self, op_type: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str: ...

    def const(self, name: str, value: np.ndarray) -> str: ...


@dataclass
class CriterionNodes:
    confidence: str  # [b] float32
    memory: list[str]  # the updated memory columns, each [b] float32


def memory_init(criterion: ExitCriterion) -> list[float]:
    """The first layer's memory, one value per column (criterion.initial_memory's row)."""
    row = criterion.initial_memory(1)
    return [] if row is None else [float(v) for v in row[0]]


def _f32(value: float) -> np.ndarray:
    return np.array(value, np.float32)


def write_criterion(
    s: Scope, criterion: ExitCriterion, logits: str, lte: str | None, answer: str, memory: list[str],
    num_outputs: int,
) -> CriterionNodes:
    """Nodes computing a layer's confidence `[b]` (and the new memory) from its exit's outputs."""
    name = criterion.name
    if name == "max-prob":
        probs = s.op("Softmax", [logits], "probs", axis=-1)
        return CriterionNodes(s.op("ReduceMax", [probs], "confidence", axes=[-1], keepdims=0), memory)
    if name == "entropy":
        logp = s.op("LogSoftmax", [logits], "logp", axis=-1)
        summed = s.op("ReduceSum", [s.op("Mul", [s.op("Exp", [logp], "p"), logp], "plogp"),
                                    s.const("axes_last", np.array([-1]))], "neg_entropy", keepdims=0)
        # 1 - H / log C  =  1 + sum(p log p) / log C
        scaled = s.op("Div", [summed, s.const("log_classes", _f32(math.log(num_outputs)))], "scaled")
        conf = s.op("Add", [s.const("one", _f32(1.0)), scaled], "unclipped")
        return CriterionNodes(s.op("Clip", [conf, s.const("zero", _f32(0.0)), "one"], "confidence"), memory)
    if name == "lte":
        if lte is None:
            raise ValueError("criterion 'lte' needs a model trained with the LTE module")
        return CriterionNodes(s.op("Identity", [lte], "confidence"), memory)
    if name == "patience":
        previous, streak = memory
        if criterion.regression:
            distance = s.op("Abs", [s.op("Sub", [answer, previous], "change")], "distance")
            same = s.op("Less", [distance, s.const("delta", _f32(criterion.delta))], "same")
        else:
            same = s.op("Equal", [answer, previous], "same")
        longer = s.op("Add", [streak, s.const("one", _f32(1.0))], "longer")
        streak = s.op("Where", [same, longer, s.const("zero", _f32(0.0))], "streak")
        fraction = s.op("Div", [streak, s.const("patience_span", _f32(max(criterion.num_layers - 1, 1)))], "fraction")
        conf = s.op("Min", [fraction, s.const("one", _f32(1.0))], "confidence")
        return CriterionNodes(conf, [answer, streak])
    raise ValueError(f"criterion {name!r} has no ONNX form")
