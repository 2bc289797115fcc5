"""The ONNX graphs the ONNX Runtime backend runs, written node by node from the model's weights.

Why written, not exported: `torch.onnx.export` of one layer followed by ORT's transformer optimizer
fuses LayerNorm and GELU but not attention in a lone layer, and cutting layers out of an optimised
whole-model graph leaves a dummy padding mask (../shared/reference/runtime.md). Writing the fused
graph directly uses exactly the kernels the optimiser would pick for a whole BERT graph, with the
padding mask in the form the fused op takes:

  embeddings:  input_ids [B, S] (+ token_type_ids) -> Gather words + positions (+ types) -> LayerNorm
  layer k:     hidden [B, S, H], lengths [B] int32 ->
               Attention (com.microsoft; mask_index = each row's length: right padding, keys past it
               are masked; MPNet: + its relative position bias, a constant sliced to S x S) -> MatMul ->
               SkipLayerNormalization -> MatMul -> BiasGelu|FastGelu -> MatMul -> SkipLayerNormalization
  exit k:      hidden, pool [B, 1, S] (1/length on real tokens, 0 on padding) -> mean (MatMul) or
               first token -> dense + tanh (relu) -> classifier: logits [B, C] (+ LTE: sigmoid -> [B])

A layer and its exit are two graphs so that a step at which no row can leave skips the exit
(`need_exit=False`) without a second copy of the layer's weights (ORT runs every node of a graph, whatever
outputs are asked for). The exit's session runs on one thread, so the extra call wakes no thread pool.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exitserve.models.backends.onnx_families import EmbeddingWeights, ExitWeights, LayerWeights

OPSET = 17  # LayerNormalization
MS_DOMAIN = "com.microsoft"
IR_VERSION = 9  # what onnxruntime >= 1.16 reads


class _Graph:
    """Collects nodes and initializers; `model` wraps them with typed inputs and outputs."""

    def __init__(self, name: str):
        self.name, self.nodes, self.weights = name, [], []

    def const(self, name: str, value: np.ndarray) -> str:
        self.weights.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, domain=domain, **attrs))
        return output

    def model(self, inputs: list, outputs: list) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, self.weights)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="exitserve")
        model.ir_version = IR_VERSION
        return model


def _tensor(name: str, elem: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def embeddings_graph(w: EmbeddingWeights) -> onnx.ModelProto:
    """input_ids [B, S] int64 (and token_type_ids for BERT) -> hidden [B, S, H]."""
    g = _Graph("embeddings")
    inputs = [_tensor("input_ids", TensorProto.INT64, ["B", "S"])]
    words = g.op("Gather", [g.const("word_embeddings", w.words), "input_ids"], "words")
    if w.padding_idx is None:  # positions 0..S-1, the same for every row
        width = g.op("Shape", ["input_ids"], "width", start=1, end=2)
        positions = g.op("Slice", [g.const("position_embeddings", w.positions), g.const("zero", np.array([0])), width,
                                   g.const("axis0", np.array([0]))], "positions")
    else:  # RoBERTa-style: real tokens count from padding_idx + 1, padding sits at padding_idx
        real = g.op("Not", [g.op("Equal", ["input_ids", g.const("pad_id", np.array(w.padding_idx))], "is_pad")], "real")
        real = g.op("Cast", [real], "real_int", to=TensorProto.INT64)
        count = g.op("CumSum", [real, g.const("axis", np.array(1))], "count")
        pos_ids = g.op("Add", [g.op("Mul", [count, real], "count_real"),
                               "pad_id"], "position_ids")
        positions = g.op("Gather", [g.const("position_embeddings", w.positions), pos_ids], "positions")
    total = g.op("Add", [words, positions], "words_positions")
    if w.token_types is not None:
        inputs.append(_tensor("token_type_ids", TensorProto.INT64, ["B", "S"]))
        types = g.op("Gather", [g.const("token_type_embeddings", w.token_types), "token_type_ids"], "types")
        total = g.op("Add", [total, types], "summed")
    elif w.type_zero is not None:
        total = g.op("Add", [total, g.const("token_type_zero", w.type_zero)], "summed")
    g.op("LayerNormalization", [total, g.const("ln_gamma", w.norm.gamma), g.const("ln_beta", w.norm.beta)],
         "hidden", axis=-1, epsilon=w.norm.eps)
    return g.model(inputs, [_tensor("hidden", TensorProto.FLOAT, ["B", "S", w.words.shape[1]])])


def layer_graph(
    w: LayerWeights, heads: int, activation: str, position_bias: np.ndarray | None = None
) -> onnx.ModelProto:
    """hidden [B, S, H], lengths [B] int32 -> hidden [B, S, H]. `position_bias` [N, P, P]: MPNet's relative
    position bias for inputs of up to P tokens (added to the attention scores)."""
    g = _Graph("layer")
    hidden_size = w.out.shape[0]
    inputs = [_tensor("hidden_in", TensorProto.FLOAT, ["B", "S", hidden_size]),
              _tensor("lengths", TensorProto.INT32, ["B"])]
    attention_inputs = ["hidden_in", g.const("qkv_weight", w.qkv), g.const("qkv_bias", w.qkv_bias), "lengths"]
    if position_bias is not None:  # its top-left S x S block: the bias depends only on the distance
        width = g.op("Shape", ["hidden_in"], "width", start=1, end=2)
        zeros, axes = g.const("bias_start", np.array([0, 0])), g.const("bias_axes", np.array([2, 3]))
        bias = g.op("Slice", [g.const("position_bias", position_bias[None]), zeros,
                              g.op("Concat", [width, width], "bias_end", axis=0), axes], "bias")
        attention_inputs += ["", bias]  # no past state; attention_bias is input 5
    context = g.op("Attention", attention_inputs, "context", domain=MS_DOMAIN, num_heads=heads)
    projected = g.op("MatMul", [context, g.const("out_weight", w.out)], "attention_out")
    h1 = g.op("SkipLayerNormalization",
              [projected, "hidden_in", g.const("ln1_gamma", w.norm1.gamma), g.const("ln1_beta", w.norm1.beta),
               g.const("out_bias", w.out_bias)], "attention_norm", domain=MS_DOMAIN, epsilon=w.norm1.eps)
    up = g.op("MatMul", [h1, g.const("ffn_in_weight", w.ffn_in)], "ffn_up")
    act = g.op(activation, [up, g.const("ffn_in_bias", w.ffn_in_bias)], "ffn_act", domain=MS_DOMAIN)
    down = g.op("MatMul", [act, g.const("ffn_out_weight", w.ffn_out)], "ffn_down")
    g.op("SkipLayerNormalization",
         [down, h1, g.const("ln2_gamma", w.norm2.gamma), g.const("ln2_beta", w.norm2.beta),
          g.const("ffn_out_bias", w.ffn_out_bias)], "hidden", domain=MS_DOMAIN, epsilon=w.norm2.eps)
    return g.model(inputs, [_tensor("hidden", TensorProto.FLOAT, ["B", "S", hidden_size])])


def _exit_nodes(g: _Graph, w: ExitWeights, hidden: str) -> tuple[list, list]:
    """Write exit `w` on `hidden` into `g`; returns the extra inputs it needs and its outputs."""
    inputs, outputs = [], [_tensor("logits", TensorProto.FLOAT, ["B", w.classifier.shape[1]])]
    if w.pooling == "mean":
        inputs.append(_tensor("pool", TensorProto.FLOAT, ["B", 1, "S"]))
        summed = g.op("MatMul", ["pool", hidden], "pooled_sum")  # [B, 1, H]
        summary = g.op("Squeeze", [summed, g.const("exit_axis1", np.array([1]))], "summary")
    else:
        # Slice + Squeeze rather than Gather with a scalar index, which ORT 1.32's optimiser turns into a
        # Slice that keeps the axis ([B, 1, H])
        first = g.op("Slice", [hidden, g.const("exit_zero", np.array([0])), g.const("exit_one", np.array([1])),
                               g.const("exit_axis1", np.array([1]))], "first_token")
        summary = g.op("Squeeze", [first, "exit_axis1"], "summary")
    dense = g.op("Add", [g.op("MatMul", [summary, g.const("pooler_weight", w.pooler)], "pooler_mm"),
                         g.const("pooler_bias", w.pooler_bias)], "pooler_dense")
    pooled = g.op({"tanh": "Tanh", "relu": "Relu"}[w.activation], [dense], "pooled")
    g.op("Add", [g.op("MatMul", [pooled, g.const("classifier_weight", w.classifier)], "classifier_mm"),
                 g.const("classifier_bias", w.classifier_bias)], "logits")
    if w.lte is not None:
        score = g.op("Add", [g.op("MatMul", [pooled, g.const("lte_weight", w.lte)], "lte_mm"),
                             g.const("lte_bias", w.lte_bias)], "lte_score")
        g.op("Squeeze", [g.op("Sigmoid", [score], "lte_sigmoid"), g.const("exit_axis_last", np.array([-1]))], "lte")
        outputs.append(_tensor("lte", TensorProto.FLOAT, ["B"]))
    return inputs, outputs


def exit_graph(w: ExitWeights) -> onnx.ModelProto:
    """hidden [B, S, H] (+ pool [B, 1, S] for mean pooling) -> logits [B, C] (+ lte [B])."""
    g = _Graph("exit")
    inputs, outputs = _exit_nodes(g, w, "hidden")
    return g.model([_tensor("hidden", TensorProto.FLOAT, ["B", "S", w.pooler.shape[0]]), *inputs], outputs)
