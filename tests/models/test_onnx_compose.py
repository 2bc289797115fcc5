"""The composed early-exit graph (one ONNX Runtime call per batch, the exit decision inside) against the
layer-by-layer path over the same weights: the same exit layers, answers and traces for every family
and criterion, on padded batches with a different threshold per row; and the same answers batched as alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel

from exitserve.models.backends import create_backend
from exitserve.models.backends.base import run_layers
from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.criteria import ExitCriterion
from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.encoding import encode
from exitserve.models.inference import record_all_layers
from tests.conftest import FAMILIES, TINY_LAYERS, model_checkpoint


@pytest.fixture(scope="module")
def samples(tokenizer):
    texts = [line.split("\t")[0] for line in
             (__import__("tests.conftest").conftest.GLUE / "SST-2" / "dev.tsv").read_text().splitlines()[1:41]]
    return encode(tokenizer, texts, max_length=64)


def family_backend(family: str, tokenizer, directory, regression: bool = False, criterion: str | None = None):
    torch.manual_seed(1)
    pooling = "cls" if family == "distilbert" else "mean"
    model = EarlyExitModel(AutoModel.from_config(FAMILIES[family]), 1 if regression else 2, True, pooling).eval()
    config = {"criterion": criterion} if criterion else {}
    ckpt = load_checkpoint(model_checkpoint(model, directory, tokenizer, pooling=pooling, **config))
    return create_backend(ckpt, "onnxruntime")


def spread_thresholds(backend, criterion: ExitCriterion, samples) -> np.ndarray:
    """Per-row thresholds [B, L] at quantiles of each layer's confidence: rows exit at every layer."""
    recorded = record_all_layers(backend, samples)
    memory, confs = criterion.initial_memory(len(samples)), []
    for k in range(backend.num_layers):
        conf, memory = criterion.confidence(recorded.logits[k], None if recorded.lte is None else recorded.lte[k],
                                            memory)
        confs.append(conf)
    rng = np.random.default_rng(0)
    quantiles = rng.uniform(0.2, 0.9, size=len(samples))
    per_layer = np.stack([np.quantile(c, quantiles) for c in confs], axis=1).astype(np.float32)
    per_layer[::7] = 1.0  # some rows never exit early
    return per_layer + np.float32(1e-4)  # not exactly at any confidence: no float ties


def assert_same(a, b, atol=1e-5) -> None:
    np.testing.assert_array_equal(a.exit_layer, b.exit_layer)
    np.testing.assert_allclose(a.logits, b.logits, atol=atol, rtol=0)
    np.testing.assert_allclose(a.confidence, b.confidence, atol=atol, rtol=0)
    for name in ("trace_confidence", "trace_logits", "trace_lte"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(np.isnan(x), np.isnan(y))  # the same layers ran for every row
            np.testing.assert_allclose(np.nan_to_num(x), np.nan_to_num(y), atol=atol, rtol=0)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "mpnet"])
def test_every_family_answers_as_the_layer_path(family, tokenizer, samples, tmp_path):
    backend = family_backend(family, tokenizer, tmp_path / family)
    criterion = backend.criterion
    thresholds = spread_thresholds(backend, criterion, samples)
    composed = backend.run(samples, thresholds, criterion, trace=True)
    layered = run_layers(backend, samples, thresholds, criterion, trace=True)
    assert len(set(composed.exit_layer.tolist())) >= 3  # a real mix of exit layers
    assert_same(composed, layered)


@pytest.mark.parametrize(("criterion", "regression"), [
    ("max-prob", False), ("entropy", False), ("lte", False), ("patience", False), ("lte", True), ("patience", True),
])
def test_every_criterion_answers_as_the_layer_path(criterion, regression, tokenizer, samples, tmp_path):
    backend = family_backend("bert", tokenizer, tmp_path / "bert", regression, criterion)
    chosen = backend.criterion
    assert chosen.name == criterion
    thresholds = spread_thresholds(backend, chosen, samples)
    assert_same(backend.run(samples, thresholds, chosen, trace=True),
                run_layers(backend, samples, thresholds, chosen, trace=True))


def test_a_criterion_other_than_the_checkpoint_s_is_composed_on_the_fly(tokenizer, samples, tmp_path):
    backend = family_backend("bert", tokenizer, tmp_path / "bert")
    other = create_backend(load_checkpoint(tmp_path / "bert"), "onnxruntime",
                           criterion=ExitCriterion("entropy", TINY_LAYERS))
    assert other.criterion.name == "entropy" and backend.criterion.name == "max-prob"
    assert not (tmp_path / "bert" / "onnx" / "fp32" / "early_exit_entropy.onnx").exists()  # nothing stored
    thresholds = spread_thresholds(other, other.criterion, samples)
    assert_same(other.run(samples, thresholds, other.criterion, trace=True),
                run_layers(other, samples, thresholds, other.criterion, trace=True))


def test_batched_rows_answer_as_they_do_alone(tokenizer, samples, tmp_path):
    backend = family_backend("bert", tokenizer, tmp_path / "bert")
    criterion = backend.criterion
    thresholds = spread_thresholds(backend, criterion, samples)
    batched = backend.run(samples, thresholds, criterion)
    for i, sample in enumerate(samples):
        alone = backend.run([sample], thresholds[i : i + 1], criterion)
        assert int(alone.exit_layer[0]) == int(batched.exit_layer[i])
        np.testing.assert_allclose(alone.logits[0], batched.logits[i], atol=1e-5, rtol=0)


def test_thresholds_at_the_edges(tokenizer, samples, tmp_path):
    backend = family_backend("bert", tokenizer, tmp_path / "bert")
    criterion = backend.criterion
    n = len(samples)
    assert set(backend.run(samples, np.zeros((n, TINY_LAYERS), np.float32), criterion).exit_layer) == {1}
    full = backend.run(samples, np.ones((n, TINY_LAYERS), np.float32), criterion, trace=True)
    assert set(full.exit_layer) == {TINY_LAYERS} and not np.isnan(full.trace_logits).any()


def test_int8_weights_compose_too(tokenizer, samples, tmp_path):
    family_backend("bert", tokenizer, tmp_path / "bert")
    int8 = create_backend(load_checkpoint(tmp_path / "bert"), "onnxruntime", quantize="int8")
    assert int8.quantize == "int8"
    thresholds = spread_thresholds(int8, int8.criterion, samples)
    assert_same(int8.run(samples, thresholds, int8.criterion, trace=True),
                run_layers(int8, samples, thresholds, int8.criterion, trace=True), atol=1e-4)


@pytest.mark.parametrize("regression", [False, True])
def test_the_learned_rule_answers_as_the_layer_path(regression, tokenizer, samples, tmp_path):
    from exitserve.models.exit_config import ExitConfig
    from exitserve.models.rule_fitting import fit_rule

    backend = family_backend("bert", tokenizer, tmp_path / "bert", regression)
    rule = fit_rule(record_all_layers(backend, samples), regression, 0.05 if regression else None, {})
    path = tmp_path / "bert"
    config = ExitConfig.read(path)
    config.exit_rule, config.criterion = rule, "learned"
    config.save(path)
    learned = create_backend(load_checkpoint(path), "onnxruntime")  # the graphs are rebuilt for the rule
    assert learned.criterion.name == "learned" and learned.criterion.rule is not None
    thresholds = spread_thresholds(learned, learned.criterion, samples)
    assert_same(learned.run(samples, thresholds, learned.criterion, trace=True),
                run_layers(learned, samples, thresholds, learned.criterion, trace=True))
