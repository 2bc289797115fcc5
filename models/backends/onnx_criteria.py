"""Each exit criterion (models/criteria.py) written as ONNX nodes, for the composed early-exit graph
(onnx_compose.py). Same arithmetic as the numpy version, in float32; tests check the two agree.

A criterion with history (patience, learned) carries its per-row memory as a few tensors ("slots",
`[b]` or `[b, C]`) in place of the numpy version's flat `[b, M]` rows; the composed graph gathers them
with the rows that stay. The learned rule (models/exit_rule.py) reads the layer index from where its
level sits in the graph, so its weights are constants of that level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from onnx import TensorProto

from exitserve.models.criteria import ExitCriterion


class Scope(Protocol):
    def op(self, op_type: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str: ...

    def const(self, name: str, value: np.ndarray) -> str: ...


@dataclass
class CriterionNodes:
    confidence: str  # [b] float32
    memory: list[str]  # the updated memory columns, each [b] float32


def memory_init(criterion: ExitCriterion, num_outputs: int) -> list[np.ndarray]:
    """The first layer's memory slots, each a row's value (shape () or (C,)): criterion.initial_memory's
    row cut into the slots `write_criterion` reads."""
    row = criterion.initial_memory(1)
    if row is None:
        return []
    row = row[0].astype(np.float32)
    if criterion.name == "learned" and not criterion.regression:  # layer, streak, previous, prev log p, summed
        return [row[0], row[1], row[2], row[3 : 3 + num_outputs], row[3 + num_outputs :]]
    return list(row)


def _f32(value: float) -> np.ndarray:
    return np.array(value, np.float32)


def write_criterion(
    s: Scope, criterion: ExitCriterion, k: int, logits: str, lte: str | None, answer: str, memory: list[str],
    num_outputs: int,
) -> CriterionNodes:
    """Nodes computing layer k's confidence `[b]` (and the new memory) from its exit's outputs."""
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
    if name == "learned":
        return _learned(s, criterion, k, logits, lte, memory, num_outputs)
    raise ValueError(f"criterion {name!r} has no ONNX form")


def _column(s: Scope, tensor: str, name: str) -> str:
    return s.op("Unsqueeze", [tensor, s.const("axes1", np.array([1]))], name)


def _learned(s: Scope, criterion: ExitCriterion, k: int, logits: str, lte: str | None, memory: list[str],
             num_outputs: int) -> CriterionNodes:
    """models/exit_rule.py's step at layer k: the features, then sigmoid(w_k . x + b_k) (the last layer's
    row scores 1), in the same order of operations."""
    rule = criterion.rule
    assert rule is not None
    row = rule.row(k)[None].astype(np.float32)  # [1, F + 1]: w_k and b_k (the last layer: 0s and +inf)
    one, zero = s.const("one", _f32(1.0)), s.const("zero", _f32(0.0))
    span = s.const("rule_span", _f32(criterion.num_layers - 1))
    lte_col = lte if lte is not None else s.op("Mul", [logits, zero], "no_lte_cols")
    if lte is None:  # zeros [b]: the rule's lte feature without an LTE module
        lte_col = s.op("ReduceSum", [lte_col, s.const("axes_last", np.array([-1]))], "no_lte", keepdims=0)
    if rule.regression:
        layer, streak, previous, total = memory
        value = s.op("Squeeze", [logits, s.const("axes_last", np.array([-1]))], "rule_value")
        seen = s.op("Greater", [layer, zero], "rule_seen")
        change = s.op("Where", [seen, s.op("Abs", [s.op("Sub", [value, previous], "rule_diff")], "rule_absdiff"),
                                zero], "rule_change")
        mean = s.op("Div", [total, s.op("Max", [layer, one], "rule_seen_layers")], "rule_mean")
        drift = s.op("Where", [seen, s.op("Abs", [s.op("Sub", [value, mean], "rule_off")], "rule_absoff"), zero],
                     "rule_drift")
        steady = s.op("And", [seen, s.op("LessOrEqual", [change, s.const("rule_tolerance",
                                                                          _f32(rule.tolerance))], "rule_close")],
                      "rule_steady")
        streak = s.op("Where", [steady, s.op("Add", [streak, one], "rule_longer"), zero], "rule_streak")
        features = [change, drift, s.op("Div", [streak, span], "rule_streak_share"), value, lte_col]
        new_memory = [s.op("Add", [layer, one], "rule_layer"), streak, value,
                      s.op("Add", [total, value], "rule_total")]
    else:
        layer, streak, previous, previous_logp, summed = memory
        logp = s.op("LogSoftmax", [logits], "rule_logp", axis=-1)
        summed = s.op("Add", [summed, logp], "rule_summed")
        answer = s.op("ArgMax", [logits], "rule_answer_id", axis=1, keepdims=0)
        mine = s.op("Equal", [_column(s, answer, "rule_answer_col"),
                              s.const("rule_classes", np.arange(num_outputs, dtype=np.int64)[None])], "rule_mine")
        mine_f = s.op("Cast", [mine], "rule_mine_float", to=TensorProto.FLOAT)
        minus_inf = s.const("minus_inf", _f32(-np.inf))

        def margin(v: str, tag: str) -> str:  # v[a] - max_{j != a} v[j]
            own = s.op("ReduceSum", [s.op("Mul", [v, mine_f], f"rule_{tag}_own_cols"),
                                     s.const("axes1", np.array([1]))], f"rule_{tag}_own", keepdims=0)
            other = s.op("ReduceMax", [s.op("Where", [mine, minus_inf, v], f"rule_{tag}_others")],
                         f"rule_{tag}_best_other", axes=[1], keepdims=0)
            return s.op("Sub", [own, other], f"rule_{tag}_margin")

        answer_f = s.op("Cast", [answer], "rule_answer", to=TensorProto.FLOAT)
        same = s.op("Cast", [s.op("Equal", [answer_f, previous], "rule_same_bool")], "rule_same",
                    to=TensorProto.FLOAT)
        streak = s.op("Mul", [s.op("Add", [streak, one], "rule_longer"), same], "rule_streak")
        features = [margin(logp, "gap"), margin(summed, "summed"), margin(previous_logp, "previous"), same,
                    s.op("Div", [streak, span], "rule_streak_share"), lte_col]
        new_memory = [s.op("Add", [layer, one], "rule_layer"), streak, answer_f, logp, summed]
    columns = [_column(s, f, f"rule_x{i}") for i, f in enumerate(features)]
    ones = s.op("Add", [s.op("Mul", [columns[0], zero], "rule_zero_col"), one], "rule_ones")
    x = s.op("Concat", [*columns, ones], "rule_x", axis=1)
    logit = s.op("ReduceSum", [s.op("Mul", [x, s.const(f"rule_row{k}", row)], "rule_terms"),
                               s.const("axes1", np.array([1]))], "rule_logit", keepdims=0)
    logit = s.op("Clip", [logit, s.const("rule_low", _f32(-80.0)), s.const("rule_high", _f32(80.0))], "rule_clipped")
    score = s.op("Div", [one, s.op("Add", [one, s.op("Exp", [s.op("Neg", [logit], "rule_neg")], "rule_exp")],
                                   "rule_denominator")], "confidence")
    return CriterionNodes(score, new_memory)
