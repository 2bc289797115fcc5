"""Shared fixtures: a tiny random BERT backbone (fast), the real MiniLM tokenizer, GLUE excerpts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from exitserve.models.backbones import resolve_backbone
from exitserve.models.backends import TorchBackend
from exitserve.models.checkpoint import ExitConfig
from exitserve.models.early_exit import EarlyExitModel

FIXTURES = Path(__file__).parent / "fixtures"
GLUE = FIXTURES / "glue"
TINY_LAYERS = 4


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    return resolve_backbone("minilm-l6")


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    return AutoTokenizer.from_pretrained(minilm_dir)


def tiny_bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=TINY_LAYERS, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128,
    )


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory, tokenizer) -> str:
    """A directory holding a random 4-layer BERT and the MiniLM tokenizer: a backbone `train` loads."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


PAD_ID = 0  # the MiniLM tokenizer's [PAD]


def torch_backend(model: EarlyExitModel) -> TorchBackend:
    """The torch runtime backend over a test model (MiniLM tokenizer's padding)."""
    return TorchBackend(model, PAD_ID)


def make_model(num_outputs: int = 2, use_lte: bool = False, seed: int = 0) -> EarlyExitModel:
    torch.manual_seed(seed)
    return EarlyExitModel(BertModel(tiny_bert_config()), num_outputs, use_lte).eval()


def make_exit_config(regression: bool = False, **overrides) -> ExitConfig:
    fields = dict(
        task="stsb" if regression else "sst2",
        task_type="regression" if regression else "classification",
        metric="spearman" if regression else "accuracy",
        label_names=[] if regression else ["negative", "positive"],
        num_layers=TINY_LAYERS, backbone="tiny", criterion="lte" if regression else "max-prob",
        default_threshold=0.9, use_lte=regression,
        text_column="sentence1" if regression else "sentence",
        pair_column="sentence2" if regression else None,
    )
    fields.update(overrides)
    return ExitConfig(**fields)


@pytest.fixture
def sst2_texts() -> list[str]:
    lines = (GLUE / "SST-2" / "dev.tsv").read_text().splitlines()[1:]
    return [line.split("\t")[0] for line in lines]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A saved SST-2-style classifier on the tiny random backbone."""
    from exitserve.models.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny-sst2"
    return save_checkpoint(path, make_model(seed=7), tokenizer, make_exit_config(default_threshold=0.55))


@pytest.fixture(scope="session")
def tiny_pair_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A saved STS-B-style pair regressor with the LTE module."""
    from exitserve.models.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny-stsb"
    model = make_model(num_outputs=1, use_lte=True, seed=8)
    return save_checkpoint(path, model, tokenizer, make_exit_config(regression=True, default_threshold=0.5))
