"""Each supported encoder family's weights, read out of the torch model into one neutral form that the
ONNX graph builder (onnx_graphs.py) writes: embeddings, and per layer the fused-attention weights
(Q, K, V packed into one `[H, 3H]` matrix), the attention output, two LayerNorms and the feed-forward.

All four families (BERT/MiniLM, RoBERTa/XLM-R/CamemBERT, DistilBERT, MPNet) share the post-LayerNorm
layer shape  `x -> LN(x + Attn(x) Wo) -> LN(h + act(h W1) W2)`; they differ in their embeddings (token
types, where positions start) and MPNet's relative position bias, which the backend adds to the
attention scores. A model whose config the graphs cannot reproduce raises `UnsupportedModel` with the
reason (the caller serves it on torch instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from exitserve.models.backends.onnx_store import UnsupportedModel
from exitserve.models.early_exit import EarlyExitModel

# Hugging Face activation name -> the fused ORT op that computes act(x + bias)
ACTIVATIONS = {"gelu": "BiasGelu", "gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu"}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def _linear(module: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    """`(W^T [in, out], b [out])`: the layout MatMul and Attention take."""
    return _np(module.weight).T.copy(), _np(module.bias)


@dataclass
class LayerNormWeights:
    gamma: np.ndarray
    beta: np.ndarray
    eps: float


def _ln(module: nn.LayerNorm) -> LayerNormWeights:
    return LayerNormWeights(_np(module.weight), _np(module.bias), float(module.eps))


@dataclass
class EmbeddingWeights:
    words: np.ndarray  # [V, H]
    positions: np.ndarray  # [P, H]
    token_types: np.ndarray | None  # [T, H]; BERT adds the row of each token's type
    type_zero: np.ndarray | None  # [H]; RoBERTa-style families always add type row 0
    norm: LayerNormWeights
    # None: positions 0..S-1; else the config's padding_idx: positions count the non-padding tokens from
    # padding_idx + 1, and a padding token sits at padding_idx (RoBERTa, XLM-R, CamemBERT, MPNet)
    padding_idx: int | None


@dataclass
class LayerWeights:
    qkv: np.ndarray  # [H, 3H]
    qkv_bias: np.ndarray  # [3H]
    out: np.ndarray  # [H, H]
    out_bias: np.ndarray
    norm1: LayerNormWeights
    ffn_in: np.ndarray  # [H, I]
    ffn_in_bias: np.ndarray
    ffn_out: np.ndarray  # [I, H]
    ffn_out_bias: np.ndarray
    norm2: LayerNormWeights


@dataclass
class ExitWeights:
    pooling: str  # mean | cls
    pooler: np.ndarray  # [H, H]
    pooler_bias: np.ndarray
    classifier: np.ndarray  # [H, C]
    classifier_bias: np.ndarray
    lte: np.ndarray | None  # [H, 1]
    lte_bias: np.ndarray | None
    activation: str = "tanh"  # after the dense layer: tanh, or relu (a DistilBERT-style final head)


@dataclass
class ModelWeights:
    family: str
    hidden: int
    heads: int
    activation: str  # the ORT op: BiasGelu | FastGelu
    embeddings: EmbeddingWeights
    layers: list[LayerWeights]
    exits: list[ExitWeights]
    # MPNet: the relative position bias for the widest batch, [N, P, P] (P = the checkpoint's max_length): a
    # batch of width S uses its top-left S x S block (the bias depends only on the distance between positions)
    position_bias: np.ndarray | None


def _qkv(q: nn.Linear, k: nn.Linear, v: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    parts = [_linear(m) for m in (q, k, v)]
    return np.concatenate([w for w, _ in parts], axis=1), np.concatenate([b for _, b in parts])


def _bert_layer(block: nn.Module) -> LayerWeights:
    """BERT, RoBERTa, XLM-R, CamemBERT (`BertLayer` and its copies)."""
    att = block.attention
    qkv, qkv_bias = _qkv(att.self.query, att.self.key, att.self.value)
    return LayerWeights(qkv, qkv_bias, *_linear(att.output.dense), _ln(att.output.LayerNorm),
                        *_linear(block.intermediate.dense), *_linear(block.output.dense), _ln(block.output.LayerNorm))


def _distilbert_layer(block: nn.Module) -> LayerWeights:
    att = block.attention
    qkv, qkv_bias = _qkv(att.q_lin, att.k_lin, att.v_lin)
    return LayerWeights(qkv, qkv_bias, *_linear(att.out_lin), _ln(block.sa_layer_norm),
                        *_linear(block.ffn.lin1), *_linear(block.ffn.lin2), _ln(block.output_layer_norm))


def _mpnet_layer(block: nn.Module) -> LayerWeights:
    att = block.attention
    qkv, qkv_bias = _qkv(att.attn.q, att.attn.k, att.attn.v)
    return LayerWeights(qkv, qkv_bias, *_linear(att.attn.o), _ln(att.LayerNorm),
                        *_linear(block.intermediate.dense), *_linear(block.output.dense), _ln(block.output.LayerNorm))


def _embeddings(family: str, emb: nn.Module) -> EmbeddingWeights:
    types = getattr(emb, "token_type_embeddings", None)
    return EmbeddingWeights(
        words=_np(emb.word_embeddings.weight),
        positions=_np(emb.position_embeddings.weight),
        token_types=_np(types.weight) if family == "bert" else None,
        type_zero=_np(types.weight[0]) if types is not None and family != "bert" else None,
        norm=_ln(emb.LayerNorm),
        padding_idx=None if family in ("bert", "distilbert") else int(emb.padding_idx),
    )


def _activation(family: str, config) -> str:
    name = config.activation if family == "distilbert" else config.hidden_act
    if not isinstance(name, str) or name not in ACTIVATIONS:
        supported = ", ".join(ACTIVATIONS)
        raise UnsupportedModel(f"activation {name!r} has no fused ONNX Runtime op (supported: {supported})")
    return ACTIVATIONS[name]


def check_exportable(model: EarlyExitModel) -> None:
    """Raise UnsupportedModel unless the graphs reproduce this model exactly."""
    family, config = model.stepper.family, model.config
    _activation(family, config)
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise UnsupportedModel(f"position embeddings {config.position_embedding_type!r} are not supported")
    if getattr(config, "is_decoder", False):
        raise UnsupportedModel("decoder (causal) configurations are not supported")


def _position_bias(model: EarlyExitModel, width: int) -> np.ndarray | None:
    if model.stepper.family != "mpnet":
        return None
    with torch.inference_mode():
        return _np(model.encoder.encoder.compute_position_bias(torch.zeros(1, width, 1))[0])


def model_weights(model: EarlyExitModel, max_length: int) -> ModelWeights:
    """The neutral weights of `model`, for inputs of up to `max_length` tokens (raises UnsupportedModel,
    see check_exportable)."""
    check_exportable(model)
    family, encoder, config = model.stepper.family, model.encoder, model.config
    layer_of = {"distilbert": _distilbert_layer, "mpnet": _mpnet_layer}.get(family, _bert_layer)
    hidden = config.dim if family == "distilbert" else config.hidden_size
    heads = config.n_heads if family == "distilbert" else config.num_attention_heads
    lte = _linear(model.lte) if model.lte is not None else (None, None)
    exits = [ExitWeights(head.pooling, *_linear(head.pooler), *_linear(head.classifier), *lte, head.activation)
             for head in model.heads]
    return ModelWeights(
        family=family, hidden=hidden, heads=heads, activation=_activation(family, config),
        embeddings=_embeddings(family, encoder.embeddings),
        layers=[layer_of(block) for block in model.stepper.layers], exits=exits,
        position_bias=_position_bias(model, max_length),
    )
