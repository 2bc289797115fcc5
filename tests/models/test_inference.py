"""The layer-by-layer engine: exits, compute actually skipped, padding trimmed, batch invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exitserve.models.answers import softmax
from exitserve.models.criteria import ExitCriterion
from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.encoding import collate, encode
from exitserve.models.inference import predict, record_all_layers, simulate_exits
from tests.conftest import PAD_ID, TINY_LAYERS, RecordingBackend, make_model


@pytest.fixture
def samples(tokenizer, sst2_texts):
    return encode(tokenizer, sst2_texts[:48], max_length=64)


def test_threshold_one_runs_every_layer_and_matches_the_full_forward(tokenizer, samples, backend_name, backend_for):
    model = make_model()
    crit = ExitCriterion("max-prob", TINY_LAYERS)
    results = predict(backend_for(backend_name, model), crit, samples, [1.0] * TINY_LAYERS, batch_size=16)
    with torch.inference_mode():  # the model's own full forward, whatever the backend
        full = model(**collate(samples, PAD_ID))
    final = full.logits[-1].softmax(-1)
    assert all(r.exit_layer == TINY_LAYERS for r in results)
    for i, r in enumerate(results):
        assert r.label_id == int(final[i].argmax())
        assert r.probabilities == pytest.approx(final[i].tolist(), abs=1e-5)
        assert r.confidence == pytest.approx(float(final[i].max()), abs=1e-5)


def test_early_exits_pool_the_mean_and_the_final_classifier_the_first_token():
    model = make_model()
    assert [h.pooling for h in model.heads] == ["mean", "mean", "mean", "cls"]
    hidden = torch.randn(2, 5, 64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = hidden.clone()
    padded[0, 3:] = 1e3  # padding content must not matter to a mean-pooled exit
    assert torch.allclose(model.exit_outputs(0, hidden, mask)[0], model.exit_outputs(0, padded, mask)[0])


def test_threshold_zero_exits_at_layer_one(tokenizer, samples, backend_name, backend_for):
    backend = backend_for(backend_name, make_model())
    results = predict(backend, ExitCriterion("max-prob", TINY_LAYERS), samples, [0.0] * TINY_LAYERS)
    assert {r.exit_layer for r in results} == {1}


@pytest.mark.parametrize("criterion", ["max-prob", "entropy", "patience", "lte"])
def test_engine_agrees_with_simulation_over_recorded_layers(tokenizer, samples, criterion, backend_name, backend_for):
    backend = backend_for(backend_name, make_model(use_lte=True, seed=3))
    crit = ExitCriterion(criterion, TINY_LAYERS)
    recorded = record_all_layers(backend, samples)
    for threshold in (0.3, 0.55, 0.7):
        thresholds = [threshold] * TINY_LAYERS
        sim = simulate_exits(recorded, crit, thresholds)
        results = predict(backend, crit, samples, thresholds, batch_size=16)
        assert [r.exit_layer for r in results] == sim.exit_layer.tolist()
        assert [r.label_id for r in results] == sim.logits.argmax(-1).tolist()


def test_a_sample_that_exits_at_layer_k_costs_k_layers_and_padding_is_trimmed(
    tokenizer, samples, backend_name, backend_for
):
    backend = RecordingBackend(backend_for(backend_name, make_model(seed=1)))
    crit = ExitCriterion("max-prob", TINY_LAYERS)
    recorded = record_all_layers(backend, samples)
    backend.log.clear()
    # a per-layer threshold at each layer's median confidence spreads the exits out
    conf = softmax(recorded.logits).max(-1)
    thresholds = np.median(conf, axis=1).tolist()
    n = len(samples)
    results = predict(backend, crit, samples, thresholds, batch_size=n)
    exit_layers = [r.exit_layer for r in results]
    assert len(set(exit_layers)) >= 3
    # row-layers computed == sum of exit layers: no sample ran past its exit
    assert sum(rows for _, rows, _, _ in backend.log) == sum(exit_layers)
    lengths = [len(s) for s in samples]
    for index, rows, width, _ in backend.log:
        still = [lengths[i] for i in range(n) if exit_layers[i] > index]
        assert rows == len(still)
        assert width == max(still)  # no more padding than the active rows need


def test_trace_lists_each_layer_up_to_the_exit(tokenizer, samples, backend_name, backend_for):
    backend = backend_for(backend_name, make_model(seed=2))
    crit = ExitCriterion("max-prob", TINY_LAYERS)
    results = predict(backend, crit, samples[:8], [0.6] * TINY_LAYERS, return_trace=True)
    for r in results:
        assert [t.layer for t in r.trace] == list(range(1, r.exit_layer + 1))
        assert r.trace[-1].confidence == pytest.approx(r.confidence, abs=1e-6)
        assert r.trace[-1].prediction == r.label_id
        assert all(t.confidence < 0.6 for t in r.trace[:-1])


def test_regression_outputs_a_value_and_no_probabilities(tokenizer, samples, backend_name, backend_for):
    backend = backend_for(backend_name, make_model(num_outputs=1, use_lte=True))
    crit = ExitCriterion("lte", TINY_LAYERS, regression=True)
    results = predict(backend, crit, samples[:4], [0.5] * TINY_LAYERS)
    assert all(r.label_id is None and r.probabilities is None for r in results)
    assert all(isinstance(r.value, float) for r in results)


def test_batch_invariance_on_real_text_with_minilm(tokenizer, sst2_texts, backend_name, backend_for):
    """Every sample's exit layer and prediction equal those of running it alone (fp32)."""
    torch.manual_seed(0)
    model = EarlyExitModel.from_backbone("minilm-l6", 2, use_lte=False).eval()
    backend = backend_for(backend_name, model)
    crit = ExitCriterion("max-prob", model.num_layers)
    samples = encode(tokenizer, sst2_texts[:64], max_length=128)
    recorded = record_all_layers(backend, samples)
    thresholds = np.quantile(softmax(recorded.logits).max(-1), 0.4, axis=1).tolist()
    batched = predict(backend, crit, samples, thresholds, batch_size=64)
    alone = [predict(backend, crit, [s], thresholds)[0] for s in samples]
    assert len({r.exit_layer for r in batched}) >= 3  # a real mix of exits
    assert [r.exit_layer for r in batched] == [r.exit_layer for r in alone]
    assert [r.label_id for r in batched] == [r.label_id for r in alone]
    for b, a in zip(batched, alone, strict=True):
        assert b.confidence == pytest.approx(a.confidence, abs=1e-4)


@pytest.mark.parametrize(("criterion", "threshold", "trace", "heads"), [
    ("max-prob", 1.0, False, [TINY_LAYERS - 1]),  # exits off: only the final classifier runs
    ("max-prob", 1.0, True, list(range(TINY_LAYERS))),  # a trace wants every layer's answer
    ("patience", 1.0, False, list(range(TINY_LAYERS))),  # patience needs every layer's answer
    ("max-prob", 0.999, False, list(range(TINY_LAYERS))),
])
def test_exit_heads_run_only_where_a_row_could_leave(
    samples, criterion, threshold, trace, heads, backend_name, backend_for
):
    backend = RecordingBackend(backend_for(backend_name, make_model(seed=4)))
    crit = ExitCriterion(criterion, TINY_LAYERS)
    results = predict(backend, crit, samples[:1], [threshold] * TINY_LAYERS, return_trace=trace)
    assert [index for index, _, _, need_exit in backend.log if need_exit] == heads[: results[0].exit_layer]
    assert results[0].exit_layer == TINY_LAYERS or threshold < 1.0


def test_a_skipped_exit_head_returns_nothing(samples, backend_name, backend_for):
    backend = backend_for(backend_name, make_model(seed=4))
    lengths = np.array([len(s) for s in samples[:3]])
    hidden, attention = backend.embed(samples[:3]), backend.attention(lengths)
    hidden, out = backend.layer(0, hidden, attention, need_exit=False)
    assert out is None and tuple(hidden.shape) == (3, lengths.max(), 64)
    _, out = backend.layer(1, hidden, attention)
    assert tuple(out.logits.shape) == (3, 2) and out.logits.dtype == np.float32
