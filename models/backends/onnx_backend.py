"""The ONNX Runtime backend: the early-exit model as ONNX graphs (onnx_graphs.py, onnx_compose.py) found
or built by onnx_store.py. Hidden states are numpy arrays `[B, S, H]` float32. Serving on it needs
neither torch nor transformers: the graphs carry the weights.

`run` (a batch, each row to its exit) is ONE `session.run` of the composed graph, whose `If` nodes
decide the exits inside ONNX Runtime; it is built for the checkpoint's criterion (another criterion is
composed in memory at start). The layer-level calls (`embed`, `layer`, ...) run the per-layer graphs,
whose sessions are only opened when first used (a server that never re-batches between layers never
holds their weights).

Threads: in a server every session shares ONE process-wide intra-op thread pool (`share_one_thread_pool`,
`threads` threads: ORT's default is one per physical core). Per-session pools were measured to fight:
seven spinning pools on 2 cores ran 1.6x slower than one, and non-spinning ones wake their threads for
every op (../shared/reference/runtime.md). A library user's process keeps per-session, non-spinning
pools (ORT refuses any other session once a global pool exists).

Memory: the CPU arena grows to the largest batch seen and keeps it; `arena=False` returns each run's
buffers to the allocator instead (jemalloc then gives them back to the system).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors

from exitserve.models.backends.base import Backend, BatchResult, ExitOutput
from exitserve.models.backends.onnx_store import COMPOSED, MANIFEST, compose_stored, save_composed
from exitserve.models.bounded_files import read_json
from exitserve.models.criteria import ExitCriterion
from exitserve.models.encoding import Encoded, mean_pool_weights, pad_tokens

log = logging.getLogger("exitserve")

# what onnxruntime raises for graph files it cannot load (their hashes may still check out)
ORT_LOAD_ERRORS = (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail, ort_errors.NoSuchFile,
                   ort_errors.RuntimeException, ort_errors.InvalidArgument, ort_errors.NotImplemented)

_shared: dict[str, int | None] = {}  # the process-wide pool, once created: {"threads": n}


def share_one_thread_pool(threads: int | None) -> None:
    """Run every ONNX Runtime session of this process on ONE intra-op pool of `threads` threads (None:
    ORT's default, one per physical core). Only for a process exitserve owns (`exitserve serve`, a Ray
    replica): once the pool exists ORT refuses sessions with pools of their own, so a library user's other
    sessions would fail. Call it before the first session is created; a second call changes nothing."""
    if not _shared:
        ort.capi._pybind_state.set_global_thread_pool_sizes(threads or 0, 1)
        _shared["threads"] = threads


def pool_is_shared() -> bool:
    """Whether this process runs its ONNX Runtime sessions on one shared pool (share_one_thread_pool)."""
    return bool(_shared)


def session(model: Path, threads: int | None = None, arena: bool = True) -> ort.InferenceSession:
    """A CPU session: on the process-wide pool when there is one (share_one_thread_pool), else on a pool
    of its own that does not spin (spinning pools of several sessions fight over the cores)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = arena
    if _shared:
        options.use_per_session_threads = False
    else:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


@dataclass
class OnnxAttention:
    lengths: np.ndarray  # [B] int32: the fused Attention's mask_index (right padding)
    pool: np.ndarray  # [B, 1, S] float32: 1/length on real tokens, what mean-pooling exits multiply by


class OnnxBackend(Backend):
    name = "onnxruntime"
    device = "cpu"

    def __init__(
        self, directory: Path, pad_id: int, criterion: ExitCriterion, threads: int | None = None,
        quantize: str = "none", arena: bool = True,
    ):
        manifest = read_json(directory / MANIFEST)
        self.directory, self.pad_id, self.quantize = directory, pad_id, quantize
        self.threads, self.arena = threads, arena
        stored = manifest["exit_config"]
        self.num_layers, self.num_outputs = stored["num_layers"], stored["num_outputs"]
        self.max_length = stored["max_length"]
        self.calibration_key = None if quantize == "none" else f"{self.name}-{quantize}"
        self.criterion = criterion
        if (criterion.name, criterion.delta) == (stored["criterion"], stored["patience_delta"]):
            self.composed = session(directory / COMPOSED, threads, arena)
        else:  # a criterion other than the checkpoint's (the `criterion` setting): composed now, not stored
            log.info("composing the early-exit graph for criterion %s", criterion.name)
            with tempfile.TemporaryDirectory() as scratch:
                self.composed = session(save_composed(compose_stored(directory, criterion, self.num_outputs),
                                                      Path(scratch)), threads, arena)
        self.inputs = {i.name for i in self.composed.get_inputs()}
        self.outputs = [o.name for o in self.composed.get_outputs()]
        self._layer_sessions: tuple | None = None

    def run(
        self, samples: Sequence[Encoded], thresholds: np.ndarray, criterion: ExitCriterion, trace: bool = False
    ) -> BatchResult:
        if criterion != self.criterion:
            return super().run(samples, thresholds, criterion, trace)
        tokens = pad_tokens(samples, self.pad_id)
        self._check_width(int(tokens.lengths.max()))
        feeds = {"input_ids": tokens.input_ids, "lengths": tokens.lengths.astype(np.int32),
                 "thresholds": np.ascontiguousarray(thresholds, dtype=np.float32)}
        if "token_type_ids" in self.inputs:
            types = tokens.token_type_ids
            feeds["token_type_ids"] = types if types is not None else np.zeros_like(tokens.input_ids)
        out = dict(zip(self.outputs, self.composed.run(None, feeds), strict=True))
        return BatchResult(out["logits"], out["confidence"], out["exit_layer"], out["trace_confidence"],
                           out["trace_logits"], out.get("trace_lte"))

    def release_checks(self) -> None:
        self._layer_sessions = None  # the self-test's per-layer sessions: serving runs the composed graph

    # ---- the layer-level calls: the per-layer graphs, opened on first use ------------------------
    def _sessions(self) -> tuple:
        if self._layer_sessions is None:
            open_ = lambda name: session(self.directory / name, self.threads, self.arena)  # noqa: E731
            embeddings = open_("embeddings.onnx")
            exits = [open_(f"exit_{k:02d}.onnx") for k in range(self.num_layers)]
            self._layer_sessions = (
                embeddings, [open_(f"layer_{k:02d}.onnx") for k in range(self.num_layers)], exits,
                any(i.name == "token_type_ids" for i in embeddings.get_inputs()),
                [any(i.name == "pool" for i in s.get_inputs()) for s in exits],
                [len(s.get_outputs()) > 1 for s in exits],
            )
        return self._layer_sessions

    def embed(self, samples: Sequence[Encoded]) -> np.ndarray:
        embeddings, _, _, with_types, _, _ = self._sessions()
        tokens = pad_tokens(samples, self.pad_id)
        feeds = {"input_ids": tokens.input_ids}
        if with_types:
            types = tokens.token_type_ids
            feeds["token_type_ids"] = types if types is not None else np.zeros_like(tokens.input_ids)
        return embeddings.run(None, feeds)[0]

    def _check_width(self, width: int) -> None:
        if width > self.max_length:  # the graphs hold position data (MPNet's bias) for max_length tokens only
            raise ValueError(f"a batch of {width} tokens is wider than the model's {self.max_length}")

    def attention(self, lengths: np.ndarray) -> OnnxAttention:
        lengths = np.asarray(lengths)
        self._check_width(int(lengths.max()))
        return OnnxAttention(lengths.astype(np.int32), mean_pool_weights(lengths, int(lengths.max())))

    def layer(
        self, index: int, hidden: np.ndarray, attention: OnnxAttention, need_exit: bool = True
    ) -> tuple[np.ndarray, ExitOutput | None]:
        _, layers, exits, _, pooled, has_lte = self._sessions()
        hidden = layers[index].run(None, {"hidden_in": hidden, "lengths": attention.lengths})[0]
        if not need_exit:
            return hidden, None
        exit_feeds = {"hidden": hidden, "pool": attention.pool} if pooled[index] else {"hidden": hidden}
        outputs = exits[index].run(None, exit_feeds)
        return hidden, ExitOutput(outputs[0], outputs[1] if has_lte[index] else None)

    def select(self, hidden: np.ndarray, keep: np.ndarray, width: int) -> np.ndarray:
        return np.ascontiguousarray(hidden[np.asarray(keep), :width])

    def rows(self, hidden: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
        return [hidden[i, :n] for i, n in enumerate(lengths)]

    def stack(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(rows), max(len(r) for r in rows), rows[0].shape[-1]), dtype=np.float32)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out
