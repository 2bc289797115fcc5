"""Checkpoints: a directory anyone can inspect, with no pickle anywhere.

    CHECKPOINT/
      config.json          the backbone's Hugging Face config
      model.safetensors    backbone + every exit head + the LTE module (fp32 or fp16)
      tokenizer files      as saved by the tokenizer (tokenizer.json, vocab, ...)
      exit_config.json     `ExitConfig` (models/exit_config.py)
      exit_rule.json       optional: the learned exit rule (models/exit_rule.py), its own typed schema
      canaries.json        what the load-time self-test checks (models/canaries.py), recorded on save

`load_checkpoint` loads the torch model (training, evaluation, the torch backend, building ONNX graphs)
and validates everything, raising `CheckpointError` with a one-line reason for a missing file, a file that
is not a regular one, too large or (JSON) nested too deeply (models/bounded_files.py), corrupt or
non-finite weights, an exit config of the wrong types or ranges (a typed pydantic schema), a
tokenizer that does not cover the backbone's vocabulary, a `max_length` beyond the backbone's position
embeddings, or shapes that do not match the backbone. `check_files` is the part of it that needs no
model, shared with the serving loader (models/served.py); it lives in models/exit_config.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.encoding import TextEncoder
from exitserve.models.exit_config import (
    SCHEMA_VERSION,
    WEIGHTS,
    CheckpointError,
    ExitConfig,
    check_encoder,
    check_files,
)


@dataclass
class Checkpoint:
    model: EarlyExitModel
    tokenizer: PreTrainedTokenizerBase
    exit_config: ExitConfig
    path: Path


def save_checkpoint(
    directory: str | Path,
    model: EarlyExitModel,
    tokenizer: PreTrainedTokenizerBase,
    exit_config: ExitConfig,
    fp16: bool = False,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    state = {
        k: (v.half() if fp16 and v.is_floating_point() else v).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt", "exitserve_schema": str(SCHEMA_VERSION)})
    exit_config.save(directory)
    from exitserve.models.canaries import record_canaries  # it runs the backends, which import this module

    record_canaries(load_checkpoint(directory))  # the model as saved (fp16 weights rounded) is the reference
    return directory


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, backbone_config: PretrainedConfig) -> None:
    """`check_encoder` for a Hugging Face tokenizer (which must name its padding token)."""
    if tokenizer.pad_token_id is None:
        raise CheckpointError("tokenizer has no pad_token")
    check_encoder(TextEncoder.from_hf(tokenizer, 512), backbone_config.vocab_size)


def load_hf_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {directory} has no usable tokenizer: {exc}") from exc


def load_checkpoint(directory: str | Path, device: str = "cpu") -> Checkpoint:
    """Load and validate a checkpoint; the model comes back in eval mode, fp32, on `device`."""
    directory = Path(directory)
    exit_config, _ = check_files(directory)
    try:
        backbone_config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory}/config.json cannot be read: {exc}") from exc
    tokenizer = load_hf_tokenizer(directory)
    check_tokenizer(tokenizer, backbone_config)
    try:
        state = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{directory}/{WEIGHTS} is corrupt or truncated: {exc}") from exc
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{directory}/{WEIGHTS}: {name} holds {bad} non-finite values (NaN or infinity)")
    try:
        model = EarlyExitModel.from_config(
            backbone_config, exit_config.num_outputs, exit_config.use_lte, exit_config.pooling,
            exit_config.final_activation,
        )
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {directory}: {exc}") from exc
    if model.num_layers != exit_config.num_layers:
        raise CheckpointError(
            f"exit config says {exit_config.num_layers} layers but the backbone has {model.num_layers}"
        )
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        reason = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(f"{directory}/{WEIGHTS} does not match the backbone: {reason}") from exc
    model.to(torch.device(device)).eval()
    return Checkpoint(model, tokenizer, exit_config, directory)
