"""The ONNX Runtime backend: the same early-exit model as one ORT session per graph (onnx_graphs.py),
found or built by onnx_store.py. Hidden states are numpy arrays `[B, S, H]` float32.

Threads: every ORT session owns an intra-op thread pool whose threads, by default, spin after each run;
with one session per layer those spinning pools fight over the cores (the split ran 2x slower than the
whole-model graph on 2 cores, ../shared/reference/runtime.md). So the layer sessions never spin
(`session.intra_op.allow_spinning=0`) and use `threads` intra-op threads (None: ORT's choice, one per
physical core), and the small embedding and exit sessions run on the calling thread alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors
import torch

from exitserve.models.backends.base import Backend, ExitOutput
from exitserve.models.backends.onnx_store import MANIFEST, ensure_graphs, rebuild_graphs
from exitserve.models.checkpoint import Checkpoint
from exitserve.models.encoding import Encoded, attention_mask, pad_tokens

ORT_LOAD_ERRORS = (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail, ort_errors.NoSuchFile,
                   ort_errors.RuntimeException, ort_errors.InvalidArgument, ort_errors.NotImplemented)


@dataclass
class OnnxAttention:
    lengths: np.ndarray  # [B] int32: the fused Attention's mask_index (right padding)
    pool: np.ndarray  # [B, 1, S] float32: 1/length on real tokens, what mean-pooling exits multiply by
    position_bias: np.ndarray | None  # MPNet: [1, N, S, S]


def _session(path: Path, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def mpnet_position_bias(checkpoint: Checkpoint) -> np.ndarray | None:
    """MPNet's relative position bias for the widest batch, `[N, P, P]` (P = max_length): a batch of
    width S uses its top-left S x S block (the bias depends only on the distance between positions)."""
    model = checkpoint.model
    if model.stepper.family != "mpnet":
        return None
    width = checkpoint.exit_config.max_length
    with torch.inference_mode():
        bias = model.encoder.encoder.compute_position_bias(torch.zeros(1, width, 1))
    return bias[0].float().numpy().copy()


class OnnxBackend(Backend):
    name = "onnxruntime"
    device = "cpu"

    def __init__(
        self, directory: Path, pad_id: int, position_bias: np.ndarray | None = None, threads: int | None = None,
        quantize: str = "none",
    ):
        manifest = json.loads((directory / MANIFEST).read_text())
        self.directory, self.pad_id, self.quantize = directory, pad_id, quantize
        self.num_layers = manifest["exit_config"]["num_layers"]
        self.num_outputs = manifest["exit_config"]["num_outputs"]
        self.calibration_key = None if quantize == "none" else f"{self.name}-{quantize}"
        self.position_bias = position_bias
        self.embeddings = _session(directory / "embeddings.onnx", 1)
        self.layers = [_session(directory / f"layer_{k:02d}.onnx", threads) for k in range(self.num_layers)]
        self.exits = [_session(directory / f"exit_{k:02d}.onnx", 1) for k in range(self.num_layers)]
        self.with_types = any(i.name == "token_type_ids" for i in self.embeddings.get_inputs())
        self.pooled = [any(i.name == "pool" for i in s.get_inputs()) for s in self.exits]
        self.has_lte = [len(s.get_outputs()) > 1 for s in self.exits]

    @classmethod
    def for_checkpoint(cls, checkpoint: Checkpoint, quantize: str = "none", threads: int | None = None,
                       rebuild: str | None = None) -> OnnxBackend:
        """The checkpoint's graphs (found valid, else built and cached: see onnx_store.ensure_graphs);
        rebuilt first when `rebuild` says why, and rebuilt when onnxruntime cannot load them."""
        directory = rebuild_graphs(checkpoint, quantize, rebuild) if rebuild else ensure_graphs(checkpoint, quantize)
        args = (checkpoint.tokenizer.pad_token_id, mpnet_position_bias(checkpoint), threads, quantize)
        try:
            return cls(directory, *args)
        except ORT_LOAD_ERRORS as exc:  # their hashes check out, yet onnxruntime cannot parse them
            reason = str(exc).strip().splitlines()[0][:200]
            directory = rebuild_graphs(checkpoint, quantize, f"onnxruntime cannot load them: {reason}")
            return cls(directory, *args)

    def embed(self, samples: Sequence[Encoded]) -> np.ndarray:
        tokens = pad_tokens(samples, self.pad_id)
        feeds = {"input_ids": tokens.input_ids}
        if self.with_types:
            types = tokens.token_type_ids
            feeds["token_type_ids"] = types if types is not None else np.zeros_like(tokens.input_ids)
        return self.embeddings.run(None, feeds)[0]

    def attention(self, lengths: np.ndarray) -> OnnxAttention:
        lengths = np.asarray(lengths)
        width = int(lengths.max())
        pool = (attention_mask(lengths, width) / lengths[:, None]).astype(np.float32)[:, None, :]
        bias = None
        if self.position_bias is not None:
            if width > self.position_bias.shape[-1]:
                raise ValueError(f"a batch of {width} tokens is wider than the model's {self.position_bias.shape[-1]}")
            bias = np.ascontiguousarray(self.position_bias[None, :, :width, :width])
        return OnnxAttention(lengths.astype(np.int32), pool, bias)

    def layer(
        self, index: int, hidden: np.ndarray, attention: OnnxAttention, need_exit: bool = True
    ) -> tuple[np.ndarray, ExitOutput | None]:
        feeds = {"hidden_in": hidden, "lengths": attention.lengths}
        if attention.position_bias is not None:
            feeds["position_bias"] = attention.position_bias
        hidden = self.layers[index].run(None, feeds)[0]
        if not need_exit:
            return hidden, None
        exit_feeds = {"hidden": hidden, "pool": attention.pool} if self.pooled[index] else {"hidden": hidden}
        outputs = self.exits[index].run(None, exit_feeds)
        lte = torch.from_numpy(outputs[1]) if self.has_lte[index] else None
        return hidden, ExitOutput(torch.from_numpy(outputs[0]), lte)

    def select(self, hidden: np.ndarray, keep: np.ndarray, width: int) -> np.ndarray:
        return np.ascontiguousarray(hidden[np.asarray(keep), :width])

    def rows(self, hidden: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
        return [hidden[i, :n] for i, n in enumerate(lengths)]

    def stack(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(rows), max(len(r) for r in rows), rows[0].shape[-1]), dtype=np.float32)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out
