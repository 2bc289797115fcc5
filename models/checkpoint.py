"""Checkpoints: a directory anyone can inspect, with no pickle anywhere.

    CHECKPOINT/
      config.json          the backbone's Hugging Face config
      model.safetensors    backbone + every exit head + the LTE module (fp32 or fp16)
      tokenizer files      as saved by the tokenizer (tokenizer.json, vocab, ...)
      exit_config.json     `ExitConfig`: task, labels, criterion, default threshold, calibration,
                           training strategy, dev scores, schema version

`load_checkpoint` validates everything and raises `CheckpointError` with a one-line reason for a
missing file, corrupt weights, a wrong schema version or shapes that do not match the backbone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from exitserve.models.criteria import CRITERIA, ExitCriterion, expand_thresholds
from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.tasks import CLASSIFICATION, REGRESSION, TaskSpec

SCHEMA_VERSION = 1
EXIT_CONFIG = "exit_config.json"
WEIGHTS = "model.safetensors"
# Without one of these, transformers builds a near-empty tokenizer from config.json and every word is unknown.
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model"
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says why in one line."""


@dataclass
class ExitConfig:
    task: str
    task_type: str  # classification | regression
    metric: str
    label_names: list[str]
    num_layers: int
    backbone: str
    criterion: str
    default_threshold: float | list[float]
    use_lte: bool
    max_length: int = 128
    pooling: str = "mean"
    patience_delta: float = 0.1
    strategy: str = "alternating"
    text_column: str = "text"
    pair_column: str | None = None
    calibration: dict[str, Any] | None = None
    dev_scores: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def regression(self) -> bool:
        return self.task_type == REGRESSION

    @property
    def num_outputs(self) -> int:
        return 1 if self.regression else len(self.label_names)

    def make_criterion(self, name: str | None = None) -> ExitCriterion:
        return ExitCriterion(name or self.criterion, self.num_layers, self.regression, self.patience_delta)

    def thresholds(self, threshold: float | list[float] | None = None) -> list[float]:
        return expand_thresholds(self.default_threshold if threshold is None else threshold, self.num_layers)

    def threshold_for(self, variant: str | None) -> float | list[float]:
        """The calibrated default for a runtime variant whose answers differ from the checkpoint's own
        (e.g. `onnxruntime-int8`, stored by `exitserve calibrate` under calibration["variants"]);
        `default_threshold` when there is none (or `variant` is None)."""
        stored = ((self.calibration or {}).get("variants") or {}).get(variant) if variant else None
        return stored["threshold"] if stored else self.default_threshold

    def task_spec(self) -> TaskSpec:
        return TaskSpec(
            self.task, self.task_type, self.metric, self.text_column, self.pair_column,
            label_names=tuple(self.label_names),
        )

    def validate(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise CheckpointError(
                f"exit config schema version {self.schema_version} is not supported (expected {SCHEMA_VERSION})"
            )
        if self.task_type not in (CLASSIFICATION, REGRESSION):
            raise CheckpointError(f"exit config: unknown task_type {self.task_type!r}")
        if self.criterion not in CRITERIA:
            raise CheckpointError(f"exit config: unknown criterion {self.criterion!r}")
        if self.task_type == CLASSIFICATION and len(self.label_names) < 2:
            raise CheckpointError("exit config: a classifier needs at least two label names")
        if self.criterion == "lte" and not self.use_lte:
            raise CheckpointError("exit config: criterion 'lte' but the model has no LTE module")
        try:
            self.thresholds()
            self.make_criterion()
        except ValueError as exc:
            raise CheckpointError(f"exit config: {exc}") from exc

    def save(self, directory: Path) -> None:
        (directory / EXIT_CONFIG).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> ExitConfig:
        path = directory / EXIT_CONFIG
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path} is missing: not an exitserve checkpoint") from exc
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} must hold a JSON object")
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise CheckpointError(
                f"{path}: schema version {raw.get('schema_version')!r} is not supported "
                f"(expected {SCHEMA_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        try:
            config = cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        config.validate()
        return config


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
    return directory


def load_checkpoint(directory: str | Path, device: str = "cpu") -> Checkpoint:
    """Load and validate a checkpoint; the model comes back in eval mode, fp32, on `device`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    for name in ("config.json", WEIGHTS):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {name}")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"checkpoint {directory} has no tokenizer vocabulary (none of {', '.join(TOKENIZER_FILES)})"
        )
    exit_config = ExitConfig.read(directory)
    try:
        backbone_config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory}/config.json cannot be read: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {directory} has no usable tokenizer: {exc}") from exc
    if len(tokenizer) > backbone_config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {len(tokenizer)} tokens but the backbone's vocabulary holds "
            f"{backbone_config.vocab_size}: they do not belong together"
        )
    try:
        state = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{directory}/{WEIGHTS} is corrupt or truncated: {exc}") from exc
    try:
        model = EarlyExitModel.from_config(
            backbone_config, exit_config.num_outputs, exit_config.use_lte, exit_config.pooling
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
