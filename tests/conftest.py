"""Shared fixtures: a tiny random BERT backbone (fast), the real MiniLM tokenizer, GLUE excerpts, and
every runtime backend over a test model (`backend_name` x `backend_for`)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    CamembertConfig,
    DistilBertConfig,
    MPNetConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from exitserve.models.backbones import resolve_backbone
from exitserve.models.backends import BACKENDS, Backend, create_backend
from exitserve.models.backends.torch_backend import TorchBackend
from exitserve.models.checkpoint import load_checkpoint, save_checkpoint
from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.exit_config import ExitConfig

FIXTURES = Path(__file__).parent / "fixtures"
GLUE = FIXTURES / "glue"
TINY_LAYERS = 4


@pytest.fixture(autouse=True)
def per_session_ort_pools(monkeypatch):
    """ONNX Runtime allows one process-wide thread pool, and no session with a pool of its own once it
    exists. A server owns its process (`PredictionService.own_process` shares the pool); the tests run
    many servers and peers in one process, so here every session keeps its own pool. Servers started
    as subprocesses (loadtest.servers) still share theirs."""
    from exitserve.models.backends import onnx_backend

    monkeypatch.setattr(onnx_backend, "share_one_thread_pool", lambda threads: None)



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

# a tiny random model of every supported family (the ONNX graphs are tested on each)
SIZE = dict(hidden_size=64, num_hidden_layers=TINY_LAYERS, num_attention_heads=4, intermediate_size=128,
            vocab_size=30522)  # the test tokenizer's (the load check compares them)
FAMILIES = {
    "bert": BertConfig(**SIZE, max_position_embeddings=128),
    "bert-gelu-tanh": BertConfig(**SIZE, max_position_embeddings=128, hidden_act="gelu_new"),
    "roberta": RobertaConfig(**SIZE, max_position_embeddings=132),
    "xlm-roberta": XLMRobertaConfig(**SIZE, max_position_embeddings=132),
    "camembert": CamembertConfig(**SIZE, max_position_embeddings=132),
    "distilbert": DistilBertConfig(dim=64, n_layers=TINY_LAYERS, n_heads=4, hidden_dim=128, vocab_size=30522),
    "mpnet": MPNetConfig(**SIZE, max_position_embeddings=132),
}



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
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sst2"
    return save_checkpoint(path, make_model(seed=7), tokenizer, make_exit_config(default_threshold=0.55))


@pytest.fixture(scope="session")
def tiny_other_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A second SST-2-style classifier whose answers differ from tiny_checkpoint's (another version)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-other"
    return save_checkpoint(path, make_model(seed=11), tokenizer, make_exit_config(default_threshold=0.55))


@pytest.fixture(scope="session")
def tiny_pair_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A saved STS-B-style pair regressor with the LTE module."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-stsb"
    model = make_model(num_outputs=1, use_lte=True, seed=8)
    return save_checkpoint(path, model, tokenizer, make_exit_config(regression=True, default_threshold=0.5))


@pytest.fixture(params=BACKENDS)
def backend_name(request) -> str:
    """Each runtime backend in turn: tests taking it run on torch and on ONNX Runtime."""
    return request.param


def model_checkpoint(model: EarlyExitModel, directory: Path, tokenizer, **config) -> Path:
    """Save a test model as a checkpoint (an SST-2-style classifier unless `config` says otherwise)."""
    config.setdefault("num_layers", model.num_layers)
    config.setdefault("use_lte", model.lte is not None)
    if model.num_outputs == 1:
        config.setdefault("regression", True)
    return save_checkpoint(directory, model, tokenizer, make_exit_config(**config))


@pytest.fixture(scope="session")
def backend_for(tmp_path_factory, tokenizer) -> Callable[[str, EarlyExitModel], Backend]:
    """`backend_for(name, model)`: runtime `name`'s backend over `model`. For onnxruntime the model is
    saved as a checkpoint and its graphs built, once per distinct model in the session."""
    built: dict[str, Backend] = {}

    def make(name: str, model: EarlyExitModel) -> Backend:
        if name == "torch":
            return torch_backend(model)
        digest = hashlib.sha256(type(model.encoder).__name__.encode())
        for tensor in model.state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes())
        key = digest.hexdigest()[:16]
        if key not in built:
            path = model_checkpoint(model, tmp_path_factory.mktemp("onnx-model") / key, tokenizer)
            built[key] = create_backend(load_checkpoint(path), name)
        return built[key]

    return make


class RecordingBackend(Backend):
    """Wraps a backend: records every layer call (index, rows, width, need_exit), can sleep in each layer
    (so interleavings are observable) and fail on batches of one width -- whatever runtime is inside."""

    def __init__(self, inner: Backend, delay: float = 0.0, fail_width: int | None = None):
        self.inner, self.delay, self.fail_width = inner, delay, fail_width
        self.name, self.device, self.pad_id = inner.name, inner.device, inner.pad_id
        self.num_layers, self.num_outputs = inner.num_layers, inner.num_outputs
        self.log: list[tuple[int, int, int, bool]] = []

    def embed(self, samples):
        return self.inner.embed(samples)

    def attention(self, lengths):
        return self.inner.attention(lengths)

    def layer(self, index, hidden, attention, need_exit=True):
        self.log.append((index, hidden.shape[0], hidden.shape[1], need_exit))  # on entry: tests can wait for it
        time.sleep(self.delay)
        if self.fail_width is not None and hidden.shape[1] == self.fail_width:
            raise RuntimeError("boom")
        return self.inner.layer(index, hidden, attention, need_exit)

    def select(self, hidden, keep, width):
        return self.inner.select(hidden, keep, width)

    def rows(self, hidden, lengths):
        return self.inner.rows(hidden, lengths)

    def stack(self, rows):
        return self.inner.stack(rows)
