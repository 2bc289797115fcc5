"""The learned exit rule: its features by hand, rows independent of their batch, fitting finds a real
signal, the engine decides as the replay does, and the rule's file is validated like the exit config."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from exitserve.models.answers import AllExits
from exitserve.models.checkpoint import CheckpointError, ExitConfig, load_checkpoint
from exitserve.models.criteria import ExitCriterion
from exitserve.models.encoding import encode
from exitserve.models.exit_rule import (
    CLASSIFICATION_FEATURES,
    REGRESSION_FEATURES,
    RULE_FILE,
    ExitRule,
    initial_memory,
    rule_features,
)
from exitserve.models.inference import predict, record_all_layers, simulate_exits
from exitserve.models.rule_fitting import fit_rule, replay_features
from tests.conftest import TINY_LAYERS, make_model


def rule(num_layers: int = 4, regression: bool = False, seed: int = 0, **overrides) -> ExitRule:
    names = REGRESSION_FEATURES if regression else CLASSIFICATION_FEATURES
    rng = np.random.default_rng(seed)
    fields = dict(task_type="regression" if regression else "classification", num_layers=num_layers,
                  num_outputs=1 if regression else 2, features=list(names),
                  weights=rng.normal(size=(num_layers - 1, len(names))).round(3).tolist(),
                  bias=rng.normal(size=num_layers - 1).round(3).tolist(), tolerance=0.5 if regression else None)
    fields.update(overrides)
    return ExitRule(**fields)


def test_classification_features_by_hand():
    memory = initial_memory(2, 2, regression=False)
    layers = [np.array([[0.0, 2.0], [1.0, -1.0]]), np.array([[0.0, 3.0], [-1.0, 1.0]])]
    x1, memory = rule_features(layers[0], None, memory, 4, False, None)
    x2, memory = rule_features(layers[1], np.array([0.25, 0.75]), memory, 4, False, None)
    # gap, summed, previous, same, streak, lte, bias column
    assert x1 == pytest.approx(np.array([[2, 2, 0, 0, 0, 0, 1], [2, 2, 0, 0, 0, 0, 1]]), abs=1e-6)
    assert x2[0] == pytest.approx([3, 5, 2, 1, 1 / 3, 0.25, 1], abs=1e-6)  # the same answer as layer 1
    assert x2[1] == pytest.approx([2, 0, -2, 0, 0, 0.75, 1], abs=1e-6)  # changed its mind: the vote is a tie
    assert memory[:, :3].tolist() == [[2, 1, 1], [2, 0, 1]]  # layer, streak, answer


def test_regression_features_by_hand():
    memory = initial_memory(1, 1, regression=True)
    values = [3.0, 3.2, 2.0]
    rows = []
    for v in values:
        x, memory = rule_features(np.array([[v]]), None, memory, 4, True, 0.5)
        rows.append(x[0])
    # change, drift (from the mean of the earlier values), streak, value, lte, bias
    assert rows[0] == pytest.approx([0, 0, 0, 3.0, 0, 1])
    assert rows[1] == pytest.approx([0.2, 0.2, 1 / 3, 3.2, 0, 1], abs=1e-6)
    assert rows[2] == pytest.approx([1.2, 1.1, 0, 2.0, 0, 1], abs=1e-6)


@pytest.mark.parametrize("regression", [False, True])
def test_a_rows_score_does_not_depend_on_its_batch(regression):
    fitted = rule(regression=regression, seed=1)
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 6, 1 if regression else 2)).astype(np.float32)
    together = fitted.initial_memory(6)
    alone = [fitted.initial_memory(1) for _ in range(6)]
    for k in range(4):
        scores, together = fitted.step(logits[k], None, together)
        for i in range(6):
            score, alone[i] = fitted.step(logits[k][i : i + 1], None, alone[i])
            assert score[0] == pytest.approx(scores[i], rel=1e-5)
        assert scores.min() >= 0.0 and scores.max() <= 1.0
    assert scores.tolist() == [1.0] * 6  # the last layer always answers


def test_the_score_is_the_layers_logistic_regression():
    fitted = rule(seed=3)
    memory = fitted.initial_memory(3)
    logits = np.random.default_rng(4).normal(size=(2, 3, 2)).astype(np.float32)
    for k in range(2):
        x, _ = rule_features(logits[k], None, memory, 4, False, None)
        scores, memory = fitted.step(logits[k], None, memory)
        z = x[:, :-1] @ np.asarray(fitted.weights[k]) + fitted.bias[k]
        assert scores == pytest.approx(1 / (1 + np.exp(-z)), rel=1e-5)


def synthetic_recorded(rows: int = 600, seed: int = 0) -> AllExits:
    """Binary exits whose layer-k answer flips away from the final one with a probability that falls with
    the layer's margin: a signal a rule must find."""
    rng = np.random.default_rng(seed)
    final = rng.integers(0, 2, rows)
    logits = np.zeros((TINY_LAYERS, rows, 2), np.float32)
    for k in range(TINY_LAYERS):
        margin = rng.exponential(1.0 + k, rows)
        flipped = (rng.random(rows) < np.exp(-2 * margin)) & (k < TINY_LAYERS - 1)
        answer = np.where(flipped, 1 - final, final)
        logits[k, np.arange(rows), answer] = margin
    return AllExits(logits, None)


def test_fitting_finds_the_signal_and_records_where():
    recorded = synthetic_recorded()
    fitted = fit_rule(recorded, False, None, {"rows": 600})
    assert fitted.fitted["rows"] == 600 and len(fitted.fitted["agreement_per_layer"]) == TINY_LAYERS
    held_out = synthetic_recorded(seed=1)
    memory = fitted.initial_memory(600)
    agree = (held_out.logits.argmax(-1) == held_out.logits[-1].argmax(-1))
    for k in range(TINY_LAYERS - 1):
        scores, memory = fitted.step(held_out.logits[k], None, memory)
        ranks = scores.argsort().argsort()  # the AUC of the score for "agrees with the final layer"
        positives = agree[k].sum()
        auc = (ranks[agree[k]].sum() - positives * (positives - 1) / 2) / (positives * (~agree[k]).sum())
        assert auc > 0.75, f"layer {k + 1}: AUC {auc:.2f}"


def test_a_layer_whose_rows_all_agree_gets_a_constant():
    recorded = synthetic_recorded(rows=50)
    recorded.logits[:-1] = recorded.logits[-1]  # every exit agrees with the final layer
    fitted = fit_rule(recorded, False, None, {})
    assert all(w == [0.0] * len(CLASSIFICATION_FEATURES) for w in fitted.weights)
    assert all(b == pytest.approx(math.log(50.5 / 0.5)) for b in fitted.bias)


def test_replayed_features_are_the_served_ones():
    recorded = synthetic_recorded(rows=20)
    x = replay_features(recorded, False, None)
    memory = initial_memory(20, 2, False)
    for k in range(TINY_LAYERS):
        step, memory = rule_features(recorded.logits[k], None, memory, TINY_LAYERS, False, None)
        assert np.array_equal(step, x[k])


def test_the_engine_decides_as_the_replay(tokenizer, sst2_texts, backend_name, backend_for):
    backend = backend_for(backend_name, make_model(seed=3))
    samples = encode(tokenizer, sst2_texts[:48], max_length=64)
    recorded = record_all_layers(backend, samples)
    crit = ExitCriterion("learned", TINY_LAYERS, rule=fit_rule(recorded, False, None, {}))
    for threshold in (0.5, 0.8, 0.95):
        thresholds = [threshold] * TINY_LAYERS
        sim = simulate_exits(recorded, crit, thresholds)
        results = predict(backend, crit, samples, thresholds, batch_size=16)
        assert [r.exit_layer for r in results] == sim.exit_layer.tolist()
        assert [r.confidence for r in results] == pytest.approx(sim.confidence.tolist(), rel=1e-5)


def test_learned_needs_a_rule():
    with pytest.raises(ValueError, match="fit-exit-rule"):
        ExitCriterion("learned", TINY_LAYERS)
    assert ExitCriterion("learned", TINY_LAYERS, rule=rule()).has_memory


@pytest.fixture
def ckpt(tmp_path, tiny_checkpoint):
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def test_the_rule_file_round_trips_and_old_checkpoints_have_none(ckpt):
    assert ExitConfig.read(ckpt).exit_rule is None
    cfg = ExitConfig.read(ckpt)
    cfg.exit_rule, cfg.criterion = rule(), "learned"
    cfg.save(ckpt)
    assert "exit_rule" not in json.loads((ckpt / "exit_config.json").read_text())
    loaded = load_checkpoint(ckpt).exit_config
    assert loaded.exit_rule == cfg.exit_rule and loaded.make_criterion().rule == cfg.exit_rule


@pytest.mark.parametrize(("change", "message"), [
    (lambda r: r.update(weights=r["weights"][:-1]), "weights must be"),
    (lambda r: r.update(features=["gap"]), "features must be"),
    (lambda r: r["weights"][0].__setitem__(0, float("nan")), r"weights\[0\]\[0\]"),
    (lambda r: r.update(num_layers="4"), "num_layers"),
    (lambda r: r.update(num_layers=6, weights=[[0.0] * 6] * 5, bias=[0.0] * 5), "6 layers"),
    (lambda r: r.update(schema_version=2), "schema version"),
    (lambda r: r.pop("bias"), "bias: missing"),
])
def test_a_broken_rule_file_is_a_one_line_checkpoint_error(ckpt, change, message):
    rule().save(ckpt)
    raw = json.loads((ckpt / RULE_FILE).read_text())
    change(raw)
    (ckpt / RULE_FILE).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(ckpt)
    assert "\n" not in str(err.value)


def test_criterion_learned_without_its_file_is_a_checkpoint_error(ckpt):
    raw = json.loads((ckpt / "exit_config.json").read_text())
    raw["criterion"] = "learned"
    (ckpt / "exit_config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="fit-exit-rule"):
        load_checkpoint(ckpt)
