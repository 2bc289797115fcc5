from __future__ import annotations

import math

import numpy as np
import pytest

from exitserve.models.criteria import ExitCriterion, exits_now, expand_thresholds


def test_max_prob_and_entropy_are_confidences_in_0_1():
    logits = np.array([[10.0, -10.0], [0.0, 0.0], [1e4, -1e4]], np.float32)
    maxp, _ = ExitCriterion("max-prob", 4).confidence(logits, None, None)
    ent, _ = ExitCriterion("entropy", 4).confidence(logits, None, None)
    assert maxp[1] == pytest.approx(0.5) and maxp[0] > 0.99
    assert ent[1] == pytest.approx(0.0, abs=1e-6)  # uniform: no confidence
    assert ent[2] == pytest.approx(1.0)  # huge logits: no overflow, full confidence
    assert not np.isnan(ent).any()
    assert ((ent >= 0) & (ent <= 1)).all()


def test_entropy_matches_formula():
    logits = np.array([[2.0, 0.5, -1.0]], np.float32)
    p = np.exp(logits) / np.exp(logits).sum()
    expected = 1 - float(-(p * np.log(p)).sum()) / math.log(3)
    conf, _ = ExitCriterion("entropy", 4).confidence(logits, None, None)
    assert float(conf[0]) == pytest.approx(expected, rel=1e-5)


def test_lte_uses_the_module_output_and_needs_it():
    lte = np.array([0.2, 0.9], np.float32)
    conf, _ = ExitCriterion("lte", 4, regression=True).confidence(np.zeros((2, 1), np.float32), lte, None)
    assert np.array_equal(conf, lte)
    with pytest.raises(ValueError, match="LTE"):
        ExitCriterion("lte", 4).confidence(np.zeros((2, 2), np.float32), None, None)


def test_patience_counts_consecutive_agreement_classification():
    crit = ExitCriterion("patience", 5)  # confidence = streak / 4
    memory = crit.initial_memory(2)
    answers = [[1, 0], [1, 1], [1, 1], [1, 0]]  # row 0 agrees throughout; row 1 changes
    confs = []
    for a in answers:
        logits = np.eye(2, dtype=np.float32)[a]
        conf, memory = crit.confidence(logits, None, memory)
        confs.append(conf.tolist())
    assert [c[0] for c in confs] == [0.0, 0.25, 0.5, 0.75]
    assert [c[1] for c in confs] == [0.0, 0.0, 0.25, 0.0]


def test_patience_regression_uses_delta():
    crit = ExitCriterion("patience", 3, regression=True, delta=0.1)
    memory = crit.initial_memory(1)
    out = []
    for value in [1.0, 1.05, 1.5]:
        conf, memory = crit.confidence(np.array([[value]], np.float32), None, memory)
        out.append(float(conf[0]))
    assert out == [0.0, 0.5, 0.0]


def test_classification_only_criteria_refuse_regression():
    with pytest.raises(ValueError, match="use lte or patience"):
        ExitCriterion("max-prob", 4, regression=True)
    with pytest.raises(ValueError, match="unknown exit criterion"):
        ExitCriterion("magic", 4)


def test_threshold_one_never_exits_early_and_last_layer_always_exits():
    conf = np.array([1.0, 0.3], np.float32)
    assert not exits_now(conf, np.array([1.0, 1.0]), is_last_layer=False).any()
    assert exits_now(conf, np.array([1.0, 1.0]), is_last_layer=True).all()
    assert exits_now(conf, np.array([0.0, 0.0]), is_last_layer=False).all()
    assert exits_now(conf, np.array([0.5, 0.5]), is_last_layer=False).tolist() == [True, False]


def test_expand_thresholds():
    assert expand_thresholds(0.8, 3) == [0.8, 0.8, 0.8]
    assert expand_thresholds([0.9, 0.8, 0.7], 3) == [0.9, 0.8, 0.7]
    with pytest.raises(ValueError, match="need 3 values"):
        expand_thresholds([0.9], 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expand_thresholds(1.5, 3)
