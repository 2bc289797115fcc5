"""Runtime backends behind one seam (base.py): `torch` (torch_backend.py) and `onnxruntime`
(onnx_backend.py, with its graphs from onnx_graphs.py / onnx_families.py, stored by onnx_store.py).
`create_backend` builds the one a caller names for a loaded checkpoint; the engines only ever see the
`Backend` interface."""

from __future__ import annotations

import logging

from exitserve.models.backends.base import QUANTIZATIONS, Backend, ExitOutput
from exitserve.models.backends.torch_backend import TorchBackend
from exitserve.models.checkpoint import Checkpoint

BACKENDS = ("torch", "onnxruntime")

log = logging.getLogger("exitserve")


def default_backend(device: str) -> str:
    """onnxruntime on the CPU (faster there), torch on a GPU."""
    return "onnxruntime" if device == "cpu" else "torch"


def create_backend(
    checkpoint: Checkpoint, name: str = "torch", quantize: str = "none", threads: int | None = None
) -> Backend:
    """The named backend for a loaded checkpoint. `quantize` (none | int8) and `threads` (intra-op) are
    ONNX Runtime's. A model the ONNX graphs cannot reproduce is served on torch, with the reason logged."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    torch_backend = TorchBackend(checkpoint.model, checkpoint.tokenizer.pad_token_id)
    if name == "torch":
        if quantize != "none":
            raise ValueError(f"quantize={quantize} needs backend=onnxruntime")
        return torch_backend
    if torch_backend.device.type != "cpu":
        raise ValueError(f"backend=onnxruntime computes on the CPU; use backend=torch on {torch_backend.device}")
    from exitserve.models.backends.onnx_backend import OnnxBackend
    from exitserve.models.backends.onnx_families import UnsupportedModel, check_exportable

    try:
        check_exportable(checkpoint.model)
    except UnsupportedModel as exc:
        log.warning("%s: serving on torch instead of onnxruntime: %s", checkpoint.path, exc)
        return torch_backend
    return OnnxBackend.for_checkpoint(checkpoint, quantize, threads)


__all__ = ["BACKENDS", "QUANTIZATIONS", "Backend", "ExitOutput", "TorchBackend", "create_backend", "default_backend"]
