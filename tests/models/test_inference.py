"""The layer-by-layer engine: exits, compute actually skipped, padding trimmed, batch invariance."""

from __future__ import annotations

import pytest
import torch

from exitserve.models.criteria import ExitCriterion
from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.encoding import encode
from exitserve.models.inference import predict, predict_batch, record_all_layers, simulate_exits
from tests.conftest import TINY_LAYERS, make_model, torch_backend


@pytest.fixture
def samples(tokenizer, sst2_texts):
    return encode(tokenizer, sst2_texts[:48], max_length=64)


def test_threshold_one_runs_every_layer_and_matches_the_full_forward(tokenizer, samples):
    model = make_model()
    crit = ExitCriterion("max-prob", TINY_LAYERS)
    results = predict(torch_backend(model), crit, samples, [1.0] * TINY_LAYERS, batch_size=16)
    recorded = record_all_layers(torch_backend(model), samples)
    final = recorded.logits[-1].softmax(-1)
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


def test_threshold_zero_exits_at_layer_one(tokenizer, samples):
    results = predict(torch_backend(make_model()), ExitCriterion("max-prob", TINY_LAYERS), samples, [0.0] * TINY_LAYERS)
    assert {r.exit_layer for r in results} == {1}


@pytest.mark.parametrize("criterion", ["max-prob", "entropy", "patience", "lte"])
def test_engine_agrees_with_simulation_over_recorded_layers(tokenizer, samples, criterion):
    model = make_model(use_lte=True, seed=3)
    crit = ExitCriterion(criterion, TINY_LAYERS)
    recorded = record_all_layers(torch_backend(model), samples)
    for threshold in (0.3, 0.55, 0.7):
        thresholds = [threshold] * TINY_LAYERS
        sim = simulate_exits(recorded, crit, thresholds)
        results = predict(torch_backend(model), crit, samples, thresholds, batch_size=16)
        assert [r.exit_layer for r in results] == sim.exit_layer.tolist()
        assert [r.label_id for r in results] == sim.logits.argmax(-1).tolist()


class CountingModel(EarlyExitModel):
    """Records (layer, rows, width) for every layer the engine runs."""

    calls: list

    def run_layer(self, index, hidden, attention):
        self.calls.append((index, hidden.shape[0], hidden.shape[1]))
        return super().run_layer(index, hidden, attention)


def test_a_sample_that_exits_at_layer_k_costs_k_layers_and_padding_is_trimmed(tokenizer, samples):
    base = make_model(seed=1)
    model = CountingModel(base.encoder, 2, use_lte=False)
    model.load_state_dict(base.state_dict())
    model.eval()
    model.calls = []
    crit = ExitCriterion("max-prob", TINY_LAYERS)
    recorded = record_all_layers(torch_backend(model), samples)
    model.calls = []
    # a per-layer threshold at each layer's median confidence spreads the exits out
    conf = recorded.logits.softmax(-1).amax(-1)
    thresholds = conf.median(dim=1).values.tolist()
    n = len(samples)
    per_layer = torch.tensor(thresholds).expand(n, -1)
    results = predict_batch(torch_backend(model), crit, samples, per_layer)
    exit_layers = [r.exit_layer for r in results]
    assert len(set(exit_layers)) >= 3
    # row-layers computed == sum of exit layers: no sample ran past its exit
    assert sum(rows for _, rows, _ in model.calls) == sum(exit_layers)
    lengths = [len(s) for s in samples]
    for index, rows, width in model.calls:
        still = [lengths[i] for i in range(n) if exit_layers[i] > index]
        assert rows == len(still)
        assert width == max(still)  # no more padding than the active rows need


def test_trace_lists_each_layer_up_to_the_exit(tokenizer, samples):
    model = make_model(seed=2)
    crit = ExitCriterion("max-prob", TINY_LAYERS)
    results = predict(torch_backend(model), crit, samples[:8], [0.6] * TINY_LAYERS, return_trace=True)
    for r in results:
        assert [t.layer for t in r.trace] == list(range(1, r.exit_layer + 1))
        assert r.trace[-1].confidence == pytest.approx(r.confidence, abs=1e-6)
        assert r.trace[-1].prediction == r.label_id
        assert all(t.confidence < 0.6 for t in r.trace[:-1])


def test_regression_outputs_a_value_and_no_probabilities(tokenizer, samples):
    model = make_model(num_outputs=1, use_lte=True)
    crit = ExitCriterion("lte", TINY_LAYERS, regression=True)
    results = predict(torch_backend(model), crit, samples[:4], [0.5] * TINY_LAYERS)
    assert all(r.label_id is None and r.probabilities is None for r in results)
    assert all(isinstance(r.value, float) for r in results)


def test_batch_invariance_on_real_text_with_minilm(tokenizer, sst2_texts):
    """Every sample's exit layer and prediction equal those of running it alone (fp32)."""
    torch.manual_seed(0)
    model = EarlyExitModel.from_backbone("minilm-l6", 2, use_lte=False).eval()
    crit = ExitCriterion("max-prob", model.num_layers)
    samples = encode(tokenizer, sst2_texts[:64], max_length=128)
    recorded = record_all_layers(torch_backend(model), samples)
    thresholds = recorded.logits.softmax(-1).amax(-1).quantile(0.4, dim=1).tolist()
    batched = predict(torch_backend(model), crit, samples, thresholds, batch_size=64)
    alone = [predict(torch_backend(model), crit, [s], thresholds)[0] for s in samples]
    assert len({r.exit_layer for r in batched}) >= 3  # a real mix of exits
    assert [r.exit_layer for r in batched] == [r.exit_layer for r in alone]
    assert [r.label_id for r in batched] == [r.label_id for r in alone]
    for b, a in zip(batched, alone, strict=True):
        assert b.confidence == pytest.approx(a.confidence, abs=1e-4)


class ExitCountingModel(EarlyExitModel):
    """Records which layers' exit heads run."""

    exits_run: list

    def exit_outputs(self, index, hidden, attention_mask):
        self.exits_run.append(index)
        return super().exit_outputs(index, hidden, attention_mask)


@pytest.mark.parametrize(("criterion", "threshold", "trace", "heads"), [
    ("max-prob", 1.0, False, [TINY_LAYERS - 1]),  # exits off: only the final classifier runs
    ("max-prob", 1.0, True, list(range(TINY_LAYERS))),  # a trace wants every layer's answer
    ("patience", 1.0, False, list(range(TINY_LAYERS))),  # patience needs every layer's answer
    ("max-prob", 0.999, False, list(range(TINY_LAYERS))),
])
def test_exit_heads_run_only_where_a_row_could_leave(samples, criterion, threshold, trace, heads):
    base = make_model(seed=4)
    model = ExitCountingModel(base.encoder, 2, use_lte=False)
    model.load_state_dict(base.state_dict())
    model.eval().exits_run = []
    crit = ExitCriterion(criterion, TINY_LAYERS)
    results = predict(torch_backend(model), crit, samples[:1], [threshold] * TINY_LAYERS, return_trace=trace)
    assert model.exits_run == heads[: results[0].exit_layer]
    assert results[0].exit_layer == TINY_LAYERS or threshold < 1.0
