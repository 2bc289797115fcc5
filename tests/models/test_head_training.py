"""The feature cache holds exactly what the exits read, and head training touches nothing else."""

from __future__ import annotations

import pytest
import torch

from exitserve.models.data import load_examples
from exitserve.models.encoding import collate, encode
from exitserve.models.feature_cache import CachedFeatures, cache_features
from exitserve.models.head_training import ExitHeadStack, train_exit_heads
from exitserve.models.training import RunOptions
from tests.conftest import GLUE, make_model
from tests.models.test_training import changed, groups

OPTIONS = RunOptions(epochs=2, batch_size=8, learning_rate=1e-3, warmup=0.0, seed=0)


def test_cached_features_give_the_live_exit_outputs(tokenizer, tmp_path, sst2_texts):
    model = make_model(use_lte=True)
    samples = encode(tokenizer, sst2_texts[:20])
    cache = cache_features(model, samples, tokenizer.pad_token_id, tmp_path, batch_size=6)
    assert cache.features.shape == (20, model.num_layers - 1, 64) and cache.final.shape == (20, 2)
    with torch.inference_mode():
        live = model(**collate(samples, tokenizer.pad_token_id))
        cached = ExitHeadStack(model).eval()(torch.from_numpy(cache.features[:]))
    assert torch.allclose(cached.logits, live.logits[:-1], atol=1e-5)
    assert torch.allclose(cached.lte, live.lte[:-1], atol=1e-5)
    assert torch.allclose(torch.from_numpy(cache.final[:]), live.logits[-1], atol=1e-5)


@pytest.mark.parametrize(("regression", "distill"), [(True, False), (False, True)])
def test_head_training_changes_only_the_early_exits_and_lte(regression, distill, tokenizer, tmp_path):
    _, rows = load_examples(str(GLUE / ("STS-B" if regression else "SST-2")), "train")
    rows = rows.subset(32, seed=0)
    model = make_model(num_outputs=1 if regression else 2, use_lte=True)
    samples = encode(tokenizer, rows.texts, rows.pairs)
    cache = cache_features(model, samples, tokenizer.pad_token_id, tmp_path)
    before = groups(model)
    dataset = CachedFeatures(cache, None if distill else rows.labels, regression)
    assert train_exit_heads(model, dataset, OPTIONS, tmp_path / "trainer") == 8
    assert changed(before, groups(model)) == {"backbone": False, "exits": True, "final": False, "lte": True}
    assert not model.training
