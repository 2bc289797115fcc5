"""Runtime backends behind one seam (base.py): `torch` (torch_backend.py). `create_backend` builds the
one a caller names for a loaded checkpoint; the engines only ever see the `Backend` interface."""

from __future__ import annotations

from exitserve.models.backends.base import Backend, ExitOutput
from exitserve.models.backends.torch_backend import TorchBackend
from exitserve.models.checkpoint import Checkpoint

BACKENDS = ("torch",)


def create_backend(checkpoint: Checkpoint, name: str = "torch") -> Backend:
    """The named backend for a loaded checkpoint."""
    if name == "torch":
        return TorchBackend(checkpoint.model, checkpoint.tokenizer.pad_token_id)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "ExitOutput", "TorchBackend", "create_backend"]
