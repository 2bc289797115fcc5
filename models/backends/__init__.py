"""Runtime backends behind one seam (base.py): `torch` (torch_backend.py) and `onnxruntime`
(onnx_backend.py, with its graphs from onnx_graphs.py / onnx_compose.py / onnx_families.py, stored by
onnx_store.py). `create_backend` builds the one a caller names for a loaded torch checkpoint (the
library); a server opens its backend without the torch model (models/served.py). The engines only ever
see the `Backend` interface. Nothing here imports torch until a torch backend or a graph build needs it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from exitserve.models.backends.base import QUANTIZATIONS, Backend, BatchResult, ExitOutput
from exitserve.models.criteria import ExitCriterion
from exitserve.models.exit_config import ExitConfig

if TYPE_CHECKING:
    from exitserve.models.backends.onnx_backend import OnnxBackend
    from exitserve.models.backends.onnx_store import ModelLoader
    from exitserve.models.checkpoint import Checkpoint

BACKENDS = ("torch", "onnxruntime")

log = logging.getLogger("exitserve")


def default_backend(device: str) -> str:
    """onnxruntime on the CPU (faster there), torch on a GPU."""
    return "onnxruntime" if device == "cpu" else "torch"


def check_choice(name: str, quantize: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if name == "torch" and quantize != "none":
        raise ValueError(f"quantize={quantize} needs backend=onnxruntime")


def open_onnx(
    directory: Path, exit_config: ExitConfig, pad_id: int, load_model: ModelLoader,
    criterion: ExitCriterion | None = None, quantize: str = "none", threads: int | None = None, arena: bool = True,
    rebuild: str | None = None,
) -> OnnxBackend:
    """The ONNX Runtime backend of the checkpoint in `directory`: its stored graphs, or graphs built now
    from the torch model `load_model` returns (raises onnx_families.UnsupportedModel when they cannot be);
    rebuilt first when `rebuild` says why (graphs that failed the self-test), and rebuilt when onnxruntime
    cannot load them."""
    from exitserve.models.backends.onnx_backend import ORT_LOAD_ERRORS, OnnxBackend
    from exitserve.models.backends.onnx_store import ensure_graphs, rebuild_graphs

    def rebuilt(why: str) -> Path:
        return rebuild_graphs(directory, exit_config, load_model, quantize, why)

    graphs = rebuilt(rebuild) if rebuild else ensure_graphs(directory, exit_config, load_model, quantize)
    args = (pad_id, criterion or exit_config.make_criterion(), threads, quantize, arena)
    try:
        return OnnxBackend(graphs, *args)
    except ORT_LOAD_ERRORS as exc:  # their hashes check out, yet onnxruntime cannot parse them
        reason = str(exc).strip().splitlines()[0][:200]
        return OnnxBackend(rebuilt(f"onnxruntime cannot load them: {reason}"), *args)


def create_backend(
    checkpoint: Checkpoint, name: str = "torch", quantize: str = "none", threads: int | None = None,
    criterion: ExitCriterion | None = None,
) -> Backend:
    """The named backend for a loaded checkpoint. `quantize` (none | int8) and `threads` (intra-op) are
    ONNX Runtime's; `criterion` the one its composed graph decides with (default: the checkpoint's). A
    model the ONNX graphs cannot reproduce is served on torch, with the reason logged."""
    from exitserve.models.backends.onnx_families import check_exportable
    from exitserve.models.backends.onnx_store import UnsupportedModel
    from exitserve.models.backends.torch_backend import TorchBackend

    check_choice(name, quantize)
    torch_backend = TorchBackend(checkpoint.model, checkpoint.tokenizer.pad_token_id)
    if name == "torch":
        return torch_backend
    if torch_backend.device.type != "cpu":
        raise ValueError(f"backend=onnxruntime computes on the CPU; use backend=torch on {torch_backend.device}")
    try:
        check_exportable(checkpoint.model)
    except UnsupportedModel as exc:
        log.warning("%s: serving on torch instead of onnxruntime: %s", checkpoint.path, exc)
        return torch_backend
    return open_onnx(checkpoint.path, checkpoint.exit_config, checkpoint.tokenizer.pad_token_id,
                     lambda: checkpoint.model, criterion, quantize, threads)


__all__ = ["BACKENDS", "QUANTIZATIONS", "Backend", "BatchResult", "ExitOutput", "create_backend", "default_backend",
           "open_onnx"]
