"""`exitserve export`: the final layer of an early-exit checkpoint as a stock Hugging Face classifier.

The final classifier is the standard first-token pooler + linear, so backbone + exit L map exactly
onto `BertForSequenceClassification` / `RobertaForSequenceClassification` /
`MPNetForSequenceClassification` / `DistilBertForSequenceClassification` (whose head uses ReLU: the
checkpoint's final exit must too). `HEADS` is also the map `models/hf_classifier.py` reads a stock
classifier through. Any peer server (a transformers pipeline, infinity, TEI) can then
serve the very model exitserve serves, without exits. The export is checked: the exported model's
logits must equal the checkpoint's final-exit logits on a probe batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from exitserve.models.backbones import classifier_activation
from exitserve.models.checkpoint import Checkpoint
from exitserve.models.encoding import collate, encode

# family -> (prefix of the encoder in the HF classifier, names of its pooler dense and output layer)
HEADS = {
    "distilbert": ("distilbert", "pre_classifier", "classifier"),
    "bert": ("bert", "bert.pooler.dense", "classifier"),
    "roberta": ("roberta", "classifier.dense", "classifier.out_proj"),
    "xlm-roberta": ("roberta", "classifier.dense", "classifier.out_proj"),
    "camembert": ("roberta", "classifier.dense", "classifier.out_proj"),
    "mpnet": ("mpnet", "classifier.dense", "classifier.out_proj"),
}
PROBE = ["a probe sentence", "another, somewhat longer probe sentence for the export check"]


def export_hf(checkpoint: Checkpoint, output: str | Path) -> Path:
    cfg, model = checkpoint.exit_config, checkpoint.model
    family = model.config.model_type
    if family not in HEADS:
        raise ValueError(f"no stock HF classifier head matches exitserve's final exit for {family!r}")
    prefix, pooler, out = HEADS[family]
    if cfg.final_activation != classifier_activation(family):
        raise ValueError(
            f"this checkpoint's final exit uses {cfg.final_activation} but the stock {family} classifier head "
            f"uses {classifier_activation(family)}: it cannot be exported as one"
        )
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_labels = cfg.num_outputs
    config.problem_type = "regression" if cfg.regression else "single_label_classification"
    if not cfg.regression:
        config.id2label = dict(enumerate(cfg.label_names))
        config.label2id = {name: i for i, name in enumerate(cfg.label_names)}
    hf = AutoModelForSequenceClassification.from_config(config).eval()

    state = {f"{prefix}.{k}": v for k, v in model.encoder.state_dict().items() if not k.startswith("pooler.")}
    final = model.heads[-1]
    for name, layer in ((pooler, final.pooler), (out, final.classifier)):
        state[f"{name}.weight"], state[f"{name}.bias"] = layer.weight, layer.bias
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("position_ids") for k in missing):
        raise ValueError(f"export mismatch: missing {missing}, unexpected {unexpected}")

    samples = encode(checkpoint.tokenizer, PROBE, max_length=cfg.max_length)
    batch = collate(samples, checkpoint.tokenizer.pad_token_id)
    with torch.inference_mode():
        ours = model(**batch).logits[-1]
        theirs = hf(**batch).logits
    if not torch.allclose(ours, theirs, atol=1e-4):
        raise ValueError("exported model does not reproduce the final exit's logits")

    output = Path(output)
    hf.save_pretrained(output)
    checkpoint.tokenizer.save_pretrained(output)
    return output
