"""The whole early-exit model as ONE ONNX graph: the exit decision runs inside ONNX Runtime.

Composed from the per-layer graphs of the store (onnx_graphs.py: embeddings, layer k, exit k), with
nothing of torch: their nodes are inlined, their weights become the composed graph's initializers (one
copy each), and after every layer an `If` node decides:

    level k (the rows still running: hidden [b, S, H], lengths [b], thresholds [b, L], criterion memory):
        layer k -> exit k -> logits [b, C] -> the criterion's confidence [b] (onnx_criteria.py)
        leave = confidence >= threshold[:, k] and threshold[:, k] < 1        (the last level: every row)
        If every row leaves:  these rows' answers are exit k's
        else:                 keep the rows that stay (Gather), trimmed to the padding they still need
                              (Slice to their longest), run level k + 1 on them, and scatter its answers
                              back over exit k's (ScatterND)

So one `session.run` answers a batch whose rows exit at different layers, and a row that exits at
layer k costs exactly k layers: the same rule, the same kernels and the same compaction as the
layer-by-layer path (models/inference.py), without a Python round trip per layer. Besides each row's
answering exit (logits, confidence, exit layer), the graph returns what every layer it ran said
(`trace_*` outputs, NaN where a row did not run): traces and shadow audits read them.

Inputs: input_ids [B, S] int64 (+ token_type_ids for BERT-style models), lengths [B] int32 (each row's
real tokens, right-padded), thresholds [B, L] float32. Outputs: logits [B, C], confidence [B],
exit_layer [B] int64 (1-based), trace_confidence [B, L], trace_logits [B, L, C] (+ trace_lte [B, L]).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exitserve.models.backends.onnx_criteria import CriterionNodes, memory_init, write_criterion
from exitserve.models.backends.onnx_graphs import IR_VERSION, MS_DOMAIN, OPSET
from exitserve.models.criteria import ExitCriterion

FLOAT, INT64, INT32, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL


COMMON = {"axes0": np.array([0]), "axes1": np.array([1]), "one": np.array(1.0, np.float32),
          "zero": np.array(0.0, np.float32), "nan": np.array(np.nan, np.float32)}


class _Scope:
    """The nodes of one graph body being written, with unique tensor names (`tag` suffixes them)."""

    def __init__(self, builder: _Builder, tag: str):
        self.builder, self.tag, self.nodes = builder, tag, []
        self.weights: list[onnx.TensorProto] = []  # initializers local to this body

    def op(self, op_type: str, inputs: Sequence[str], name: str, domain: str = "", **attrs) -> str:
        return self.ops(op_type, inputs, name, 1, domain, **attrs)[0]

    def ops(self, op_type: str, inputs: Sequence[str], name: str, outputs: int, domain: str = "",
            **attrs) -> list[str]:
        """A node with several outputs (`name` + this scope's tag + `_i`)."""
        out = [f"{name}{self.tag}" if outputs == 1 else f"{name}{self.tag}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), out, name=out[0], domain=domain, **attrs))
        return out

    def const(self, name: str, value: np.ndarray) -> str:
        return self.builder.const(name, value)

    def inline(self, graph: onnx.GraphProto, prefix: str, inputs: dict[str, str]) -> dict[str, str]:
        """Copy `graph`'s nodes into this body: its inputs read `inputs`, its initializers become the
        composed graph's (`prefix` + name, once), its tensors get `prefix` and this scope's tag.
        Returns the names its outputs got."""
        for init in graph.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(init)
            copy.name = prefix + init.name
            self.weights.append(copy)
        rename = {i.name: inputs[i.name] for i in graph.input if i.name in inputs}
        rename.update({init.name: prefix + init.name for init in graph.initializer})

        def name(tensor: str) -> str:
            if tensor == "":
                return ""
            return rename.setdefault(tensor, f"{prefix}{tensor}{self.tag}")

        for node in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = f"{prefix}{node.name}{self.tag}"
            copy.input[:] = [name(t) for t in node.input]
            copy.output[:] = [name(t) for t in node.output]
            self.nodes.append(copy)
        return {o.name: rename[o.name] for o in graph.output}


class _Builder:
    """The composed graph's initializers (shared by every nested body) and constants."""

    def __init__(self):
        self.initializers: dict[str, onnx.TensorProto] = {}
        for name, value in COMMON.items():  # used by name wherever needed
            self.const(name, value)

    def initializer(self, name: str, tensor: onnx.TensorProto) -> None:
        if name not in self.initializers:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = name
            self.initializers[name] = copy

    def const(self, name: str, value: np.ndarray) -> str:
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.array(value, order="C"), name)
        return name


def _inputs_used(nodes: Sequence[onnx.NodeProto]) -> set[str]:
    """Every tensor name the nodes read, in nested bodies too (unused constants are left out of the graph)."""
    used = set()
    for node in nodes:
        used.update(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used |= _inputs_used(attr.g.node)
    return used


def _info(name: str, elem: int, rank: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, [None] * rank)


class EarlyExitComposer:
    """Writes the composed graph for one criterion from the store's per-layer graphs."""

    def __init__(
        self, embeddings: onnx.ModelProto, layers: Sequence[onnx.ModelProto], exits: Sequence[onnx.ModelProto],
        criterion: ExitCriterion, num_outputs: int,
    ):
        self.embeddings, self.layers, self.exits = embeddings.graph, [m.graph for m in layers], [m.graph for m in exits]
        self.criterion, self.num_outputs = criterion, num_outputs
        self.num_layers = len(layers)
        self.has_lte = len(self.exits[0].output) > 1
        self.b = _Builder()

    # ---- the per-level pieces ----------------------------------------------------------------------
    def _pool(self, s: _Scope, hidden: str, lengths: str) -> str:
        """[b, 1, S] float32: 1/length on each row's real tokens, 0 on padding (what mean-pooling exits
        multiply by); the same float32 arithmetic as the layer-by-layer backend's."""
        width = s.op("Shape", [hidden], "width", start=1, end=2)
        positions = s.op("Range", [s.const("i64_0", np.array(0, np.int64)),
                                   s.op("Squeeze", [width], "width_scalar"),
                                   s.const("i64_1", np.array(1, np.int64))], "positions")
        lengths64 = s.op("Cast", [lengths], "lengths64", to=INT64)
        real = s.op("Less", [s.op("Unsqueeze", [positions, s.const("axes0", np.array([0]))], "positions_row"),
                             s.op("Unsqueeze", [lengths64, s.const("axes1", np.array([1]))], "lengths_col")],
                    "real")
        mask = s.op("Cast", [real], "real_float", to=FLOAT)
        lengths_f = s.op("Cast", [s.op("Unsqueeze", [lengths, "axes1"], "lengths_col32")], "lengths_float", to=FLOAT)
        return s.op("Unsqueeze", [s.op("Div", [mask, lengths_f], "pool_rows"), "axes1"], "pool")

    def _answer(self, s: _Scope, logits: str) -> str:
        """[b] float: the exit's answer (models/answers.py's rule)."""
        if self.criterion.regression:
            return s.op("Squeeze", [logits, s.const("axes_last", np.array([-1]))], "answer")
        return s.op("Cast", [s.op("ArgMax", [logits], "argmax", axis=-1, keepdims=0)], "answer", to=FLOAT)

    def _level(self, s: _Scope, k: int, hidden: str, lengths: str, thresholds: str, memory: list[str]) -> list[str]:
        """Write level k into `s`; returns its outputs: logits [b, C], confidence [b], exit_layer [b] int64,
        trace_confidence [b, L], trace_logits [b, L, C] (+ trace_lte [b, L])."""
        last = k == self.num_layers - 1
        layer_inputs = {"hidden_in": hidden, "lengths": lengths}
        out = s.inline(self.layers[k], f"layer{k}/", layer_inputs)
        new_hidden = out["hidden"]
        exit_inputs = {"hidden": new_hidden}
        if any(i.name == "pool" for i in self.exits[k].input):
            exit_inputs["pool"] = self._pool(s, new_hidden, lengths)
        exit_out = s.inline(self.exits[k], f"exit{k}/", exit_inputs)
        logits, lte = exit_out["logits"], exit_out.get("lte")
        answer = self._answer(s, logits)
        crit: CriterionNodes = write_criterion(s, self.criterion, k, logits, lte, answer, memory, self.num_outputs)
        conf = crit.confidence

        # this level's rows' trace: column k = what exit k said, NaN elsewhere
        column = np.zeros((1, self.num_layers), dtype=bool)
        column[0, k] = True
        col2 = s.const(f"column{k}", column)
        col3 = s.const(f"column{k}_3d", column[:, :, None])
        nan = s.const("nan", np.array(np.nan, np.float32))
        traces = [s.op("Where", [col2, s.op("Unsqueeze", [conf, "axes1"], "conf_col"), nan], "trace_conf"),
                  s.op("Where", [col3, s.op("Unsqueeze", [logits, "axes1"], "logits_col"), nan], "trace_logits")]
        if self.has_lte:
            traces.append(s.op("Where", [col2, s.op("Unsqueeze", [lte, "axes1"], "lte_col"), nan], "trace_lte"))
        rows = s.op("Shape", [conf], "rows")
        layer = s.op("Expand", [s.const(f"layer{k}_number", np.array(k + 1, np.int64)), rows], "exit_layer")
        here = [logits, conf, layer, *traces]
        if last:
            return here

        threshold = s.op("Gather", [thresholds, s.const(f"k{k}", np.array(k, np.int64))], "threshold", axis=1)
        can_leave = s.op("Less", [threshold, s.const("one", np.array(1.0, np.float32))], "can_leave")
        leave = s.op("And", [s.op("GreaterOrEqual", [conf, threshold], "confident"), can_leave], "leave")
        all_leave = s.op("Cast", [s.op("ReduceMin", [s.op("Cast", [leave], "leave_int", to=INT32)], "min_leave",
                                       keepdims=0)], "all_leave", to=BOOL)

        outputs = ["logits", "confidence", "exit_layer", "trace_confidence", "trace_logits", "trace_lte"]
        kinds = [(FLOAT, 2), (FLOAT, 1), (INT64, 1), (FLOAT, 2), (FLOAT, 3), (FLOAT, 2)][: len(here)]

        # then: every row leaves here
        done = _Scope(self.b, f"{s.tag}_d")
        done_out = [done.op("Identity", [t], f"{outputs[i]}_here") for i, t in enumerate(here)]

        # else: the staying rows run on, and their answers replace exit k's
        go = _Scope(self.b, f"{s.tag}_g")
        stay = go.op("Squeeze", [go.op("NonZero", [go.op("Not", [leave], "stay_mask")], "stay_nz"),
                                 go.const("axes0", np.array([0]))], "stay")
        sub_lengths = go.op("Gather", [lengths, stay], "sub_lengths", axis=0)
        width = go.op("Cast", [go.op("ReduceMax", [sub_lengths], "sub_width32", keepdims=1)], "sub_width", to=INT64)
        sub_hidden = go.op("Slice", [go.op("Gather", [new_hidden, stay], "kept_hidden", axis=0),
                                     go.const("i64_0_1d", np.array([0], np.int64)), width, "axes1"], "sub_hidden")
        sub_thresholds = go.op("Gather", [thresholds, stay], "sub_thresholds", axis=0)
        sub_memory = [go.op("Gather", [m, stay], f"sub_memory{i}", axis=0) for i, m in enumerate(crit.memory)]
        inner = _Scope(self.b, f"_{k + 1}")
        inner.nodes, inner.weights = go.nodes, go.weights  # level k + 1 is written into this branch's body
        sub = self._level(inner, k + 1, sub_hidden, sub_lengths, sub_thresholds, sub_memory)
        index = go.op("Unsqueeze", [stay, "axes1"], "stay_index")
        merged = [go.op("ScatterND", [here[i], index, sub[i]], f"merged_{outputs[i]}") for i in range(3)]
        for i, column_mask in zip(range(3, len(here)), (col2, col3, col2), strict=False):
            scattered = go.op("ScatterND", [here[i], index, sub[i]], f"scattered_{outputs[i]}")
            merged.append(go.op("Where", [column_mask, here[i], scattered], f"merged_{outputs[i]}"))

        def body(scope: _Scope, results: list[str], name: str) -> onnx.GraphProto:
            infos = [_info(r, elem, rank) for r, (elem, rank) in zip(results, kinds, strict=True)]
            return helper.make_graph(scope.nodes, name, [], infos, scope.weights)

        return s.ops("If", [all_leave], f"level{k}_out", len(here),
                     then_branch=body(done, done_out, f"exit_at_{k + 1}"),
                     else_branch=body(go, merged, f"continue_after_{k + 1}"))

    # ---- the whole graph ---------------------------------------------------------------------------
    def model(self) -> onnx.ModelProto:
        s = _Scope(self.b, "_0")
        emb_inputs = {i.name: i.name for i in self.embeddings.input}
        hidden = s.inline(self.embeddings, "embeddings/", emb_inputs)["hidden"]
        inputs = [_info(i.name, INT64, 2) for i in self.embeddings.input]
        inputs += [_info("lengths", INT32, 1), _info("thresholds", FLOAT, 2)]
        rows = s.op("Shape", ["lengths"], "batch_rows")
        memory = []
        for i, value in enumerate(memory_init(self.criterion, self.num_outputs)):  # [b] or [b, C] each
            shape = s.op("Concat", [rows, s.const(f"memory_dims{i}", np.array(value.shape, np.int64))],
                         f"memory_shape{i}", axis=0)
            memory.append(s.op("Expand", [s.const(f"memory_init{i}", value[None]), shape], f"memory{i}"))
        results = self._level(s, 0, hidden, "lengths", "thresholds", memory)
        names = ["logits", "confidence", "exit_layer", "trace_confidence", "trace_logits", "trace_lte"]
        kinds = [(FLOAT, 2), (FLOAT, 1), (INT64, 1), (FLOAT, 2), (FLOAT, 3), (FLOAT, 2)]
        outputs = []
        for result, name, (elem, rank) in zip(results, names, kinds, strict=False):
            s.nodes.append(helper.make_node("Identity", [result], [name], name=f"output_{name}"))
            outputs.append(_info(name, elem, rank))
        used = _inputs_used(s.nodes)
        weights = [w for w in (*self.b.initializers.values(), *s.weights) if w.name in used]
        graph = helper.make_graph(s.nodes, "early_exit", inputs, outputs, weights)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="exitserve")
        model.ir_version = IR_VERSION
        return model


def compose(
    embeddings: onnx.ModelProto, layers: Sequence[onnx.ModelProto], exits: Sequence[onnx.ModelProto],
    criterion: ExitCriterion, num_outputs: int,
) -> onnx.ModelProto:
    """The composed early-exit graph (see the module docstring)."""
    return EarlyExitComposer(embeddings, layers, exits, criterion, num_outputs).model()
