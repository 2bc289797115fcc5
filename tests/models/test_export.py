from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from exitserve.cli import main
from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.encoding import collate, encode


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
