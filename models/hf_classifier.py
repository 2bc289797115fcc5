"""A stock Hugging Face `*ForSequenceClassification` as the final exit of an early-exit model.

The inverse of `exitserve export` (models/export.py), through the same `HEADS` map: the classifier's
encoder becomes the backbone and its own head (BERT's pooler + classifier, RoBERTa's / MPNet's
classifier.dense + out_proj, DistilBERT's pre_classifier + ReLU + classifier) becomes exit L with
its weights copied unchanged, so the final exit answers exactly as the classifier does. Exits
1..L-1 (and the LTE module) are new: `models/retrofit.py` trains them.

`read_classifier` reads only the classifier's config (family, task type, label names), so a
mismatch with the data is reported before any weights are loaded; `load_classifier` then builds the
model. Exit poolers start as copies of the classifier's head dense layer, as `from_backbone` starts
them from a pretrained pooler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from exitserve.models.backbones import classifier_activation
from exitserve.models.data import looks_local
from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.export import HEADS
from exitserve.models.tasks import CLASSIFICATION, REGRESSION


@dataclass(frozen=True)
class ClassifierInfo:
    """What a classifier's config says: where it is, its family, task type and label names."""

    source: str
    family: str
    task_type: str
    label_names: tuple[str, ...]  # id -> name; empty for a regressor

    @property
    def regression(self) -> bool:
        return self.task_type == REGRESSION


@dataclass
class ImportedClassifier:
    model: EarlyExitModel  # exit L = the classifier's head; exits 1..L-1 untrained
    original: PreTrainedModel  # the classifier itself (fp32, eval), the reference its final exit must match
    tokenizer: PreTrainedTokenizerBase


def read_classifier(source: str) -> ClassifierInfo:
    """The classifier's task from its config alone (a local directory or a Hugging Face hub id)."""
    if looks_local(source) and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"--from-classifier {source}: no such directory")
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--from-classifier {source}: cannot read its config ({reason})") from exc
    family = config.model_type
    if family not in HEADS:
        raise ValueError(
            f"--from-classifier {source}: unsupported family {family!r}; supported: {', '.join(sorted(HEADS))}"
        )
    if config.problem_type == "multi_label_classification":
        raise ValueError(f"--from-classifier {source}: multi-label classifiers are not supported")
    if config.problem_type == "regression" or config.num_labels == 1:
        return ClassifierInfo(source, family, REGRESSION, ())
    names = tuple(str(config.id2label[i]) for i in range(config.num_labels))
    return ClassifierInfo(source, family, CLASSIFICATION, names)


def load_classifier(info: ClassifierInfo, use_lte: bool, pooling: str) -> ImportedClassifier:
    """The early-exit model around the classifier (see the module docstring), with its tokenizer."""
    original, loading = AutoModelForSequenceClassification.from_pretrained(
        info.source, dtype=torch.float32, output_loading_info=True
    )
    untrained = [k for k in loading["missing_keys"] if not k.endswith("position_ids")]
    if untrained:
        raise ValueError(
            f"--from-classifier {info.source}: no trained weights for {', '.join(sorted(untrained)[:3])}: "
            "is it a fine-tuned *ForSequenceClassification model? (a bare encoder: use --backbone)"
        )
    original.eval()
    prefix, pooler_name, out_name = HEADS[info.family]
    state = original.state_dict()

    encoder = AutoModel.from_config(original.config)
    encoder_state = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    missing, unexpected = encoder.load_state_dict(encoder_state, strict=False)
    no_pooler = any(k.startswith("pooler.") for k in missing)  # RoBERTa's and MPNet's classifiers have none
    missing = [k for k in missing if not k.startswith("pooler.") and not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"--from-classifier {info.source}: encoder mismatch: missing {missing}, "
                         f"unexpected {unexpected}")
    model = EarlyExitModel(encoder, len(info.label_names) or 1, use_lte, pooling, classifier_activation(info.family))
    final = model.heads[-1]
    for layer, name in ((final.pooler, pooler_name), (final.classifier, out_name)):
        layer.load_state_dict({"weight": state[f"{name}.weight"], "bias": state[f"{name}.bias"]})
    # Exit poolers start from the head's dense layer; so does an encoder pooler the classifier has no
    # weights for (it is never run; filling it keeps the checkpoint's usual shape and contents defined).
    fill = [head.pooler for head in model.heads[:-1]]
    if no_pooler and model.stepper.pretrained_pooler() is not None:
        fill.append(model.stepper.pretrained_pooler())
    for layer in fill:
        layer.load_state_dict(final.pooler.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(info.source)
    return ImportedClassifier(model.eval(), original, tokenizer)
