"""What a server loads to serve a checkpoint: its exit config, its tokenizer and its runtime backend.

On ONNX Runtime (the CPU default) nothing here imports torch or transformers when the checkpoint's
graphs are in the store: the tokenizer runs from tokenizer.json (models/encoding.py) and the graphs
carry the weights (models/backends/onnx_store.py). The torch model is loaded only to build missing or
stale graphs (the first start; `exitserve export-onnx` does it ahead), and dropped once they are built.
The torch backend, and a model the ONNX graphs cannot reproduce, load it as the library does.

Every check `load_checkpoint` makes that needs no model is made here too (models/exit_config.py): a
broken checkpoint raises `CheckpointError` with a one-line reason before anything is served. Then the
backend is self-tested on the checkpoint's canaries (models/self_test.py): a tokenizer or a graph that
does not reproduce them is refused (graphs are rebuilt once first), so what is served is the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exitserve.models.backends import Backend, check_choice, open_onnx
from exitserve.models.criteria import ExitCriterion
from exitserve.models.encoding import TextEncoder
from exitserve.models.exit_config import CheckpointError, ExitConfig, check_encoder, check_files
from exitserve.models.self_test import verified

log = logging.getLogger("exitserve")


@dataclass
class LoadedCheckpoint:
    """What serving a checkpoint needs, loaded and checked."""

    path: Path
    exit_config: ExitConfig
    encoder: TextEncoder
    backend: Backend


def _encoder(directory: Path, exit_config: ExitConfig, backbone_config: dict) -> TextEncoder:
    """The checkpoint's tokenizer, checked against the backbone (check_encoder)."""
    if (directory / "tokenizer.json").is_file():
        try:
            encoder = TextEncoder.from_directory(directory, exit_config.max_length)
        except Exception as exc:  # the tokenizers library raises plain Exceptions for files it cannot parse
            raise CheckpointError(f"checkpoint {directory} has no usable tokenizer: {exc}") from exc
    else:  # only a slow tokenizer's vocabulary files: transformers converts them
        from exitserve.models.checkpoint import load_hf_tokenizer

        encoder = TextEncoder.from_hf(load_hf_tokenizer(directory), exit_config.max_length)
    vocab = backbone_config.get("vocab_size")
    if not isinstance(vocab, int):
        raise CheckpointError(f"{directory}/config.json has no vocab_size")
    check_encoder(encoder, vocab)
    return encoder


def load_served(
    directory: str | Path, backend: str = "onnxruntime", quantize: str = "none", threads: int | None = None,
    device: str = "cpu", criterion: str | None = None, arena: bool = True,
) -> LoadedCheckpoint:
    """Load and validate what serving the checkpoint in `directory` needs (see the module docstring).
    `criterion` overrides the checkpoint's exit criterion; `threads` and `arena` are ONNX Runtime's."""
    directory = Path(directory)
    check_choice(backend, quantize)
    exit_config, backbone_config = check_files(directory)
    try:
        chosen = exit_config.make_criterion(criterion)
    except ValueError as exc:
        raise CheckpointError(f"criterion: {exc}") from exc
    if backend == "onnxruntime" and device != "cpu":
        raise ValueError(f"backend=onnxruntime computes on the CPU; use backend=torch on {device}")
    encoder = _encoder(directory, exit_config, backbone_config)
    backend, rebuild = _backend(directory, exit_config, encoder, backend, chosen, quantize, threads, device, arena)
    thresholds = exit_config.thresholds(exit_config.threshold_for(backend.calibration_key))
    backend = verified(directory, encoder, backend, chosen, thresholds, rebuild)
    return LoadedCheckpoint(directory, exit_config, encoder, backend)


def _backend(directory: Path, exit_config: ExitConfig, encoder: TextEncoder, name: str, criterion: ExitCriterion,
             quantize: str,
             threads: int | None, device: str, arena: bool) -> tuple[Backend, Callable[[str], Backend] | None]:
    """The named backend, and how to open it again on graphs rebuilt (ONNX Runtime; None for torch)."""
    if name == "torch":
        return _torch_backend(directory, device), None
    from exitserve.models.backends.onnx_store import UnsupportedModel

    def onnx(rebuild: str | None = None) -> Backend:
        return open_onnx(directory, exit_config, encoder.pad_id, lambda: _load_model(directory), criterion,
                         quantize, threads, arena, rebuild)

    try:
        return onnx(), onnx
    except UnsupportedModel as exc:
        log.warning("%s: serving on torch instead of onnxruntime: %s", directory, exc)
        return _torch_backend(directory, device), None


def _load_model(directory: Path):
    from exitserve.models.checkpoint import load_checkpoint

    return load_checkpoint(directory).model


def _torch_backend(directory: Path, device: str) -> Backend:
    from exitserve.models.backends.torch_backend import TorchBackend
    from exitserve.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(directory, device)
    return TorchBackend(checkpoint.model, checkpoint.tokenizer.pad_token_id)
