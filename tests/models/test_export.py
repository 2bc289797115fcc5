from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from exitserve.cli import main
from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.encoding import collate, encode
from exitserve.models.export import export_hf


def test_export_reproduces_the_final_exit(tiny_checkpoint, tmp_path, sst2_texts):
    out = tmp_path / "hf"
    assert main(["export", str(tiny_checkpoint), "-o", str(out)]) == 0
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.id2label == {0: "negative", 1: "positive"}
    ckpt = load_checkpoint(tiny_checkpoint)
    tok = AutoTokenizer.from_pretrained(out)
    batch = collate(encode(tok, sst2_texts[:16]), tok.pad_token_id)
    with torch.inference_mode():
        assert torch.allclose(hf(**batch).logits, ckpt.model(**batch).logits[-1], atol=1e-5)


def test_a_tanh_final_head_on_distilbert_is_not_exported_as_distilberts_relu_head(tmp_path, tokenizer):
    from transformers import DistilBertConfig, DistilBertModel

    from exitserve.models.checkpoint import save_checkpoint
    from exitserve.models.early_exit import EarlyExitModel
    from tests.conftest import make_exit_config

    config = DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=30522)
    model = EarlyExitModel(DistilBertModel(config), 2, use_lte=False).eval()  # tanh, as before the field existed
    path = save_checkpoint(tmp_path / "ckpt", model, tokenizer, make_exit_config(num_layers=2))
    with pytest.raises(ValueError, match="final exit uses tanh but the stock distilbert classifier head uses relu"):
        export_hf(load_checkpoint(path), tmp_path / "hf")
