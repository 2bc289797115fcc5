"""Checkpoints: a directory anyone can inspect, with no pickle anywhere.

    CHECKPOINT/
      config.json          the backbone's Hugging Face config
      model.safetensors    backbone + every exit head + the LTE module (fp32 or fp16)
      tokenizer files      as saved by the tokenizer (tokenizer.json, vocab, ...)
      exit_config.json     `ExitConfig`: task, labels, criterion, default threshold, calibration,
                           training strategy, dev scores, schema version
      canaries.json        what the load-time self-test checks (models/canaries.py), recorded on save

`load_checkpoint` validates everything and raises `CheckpointError` with a one-line reason for a
missing file, a file that is not a regular one, too large or (JSON) nested too deeply
(models/bounded_files.py), corrupt or non-finite weights, an exit config of the wrong types or ranges
(a typed pydantic schema; every calibrated variant's threshold too), a tokenizer that does not cover
the backbone's vocabulary, a `max_length` beyond the backbone's position embeddings, or shapes that
do not match the backbone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as typed_dataclass
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from exitserve.models.backbones import max_tokens
from exitserve.models.bounded_files import UnsafeFile, check_files, read_json
from exitserve.models.criteria import CRITERIA, ExitCriterion, expand_thresholds
from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.problems import first_problem
from exitserve.models.tasks import CLASSIFICATION, REGRESSION, TaskSpec

SCHEMA_VERSION = 1
EXIT_CONFIG = "exit_config.json"
WEIGHTS = "model.safetensors"
# Without one of these, transformers builds a near-empty tokenizer from config.json and every word is unknown.
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model"
)


MIN_MAX_LENGTH = 8  # tokens: room for the special tokens of a pair and a few words of each text
# a tokenizer with fewer tokens than this share of the backbone's vocabulary maps most words to [UNK]
MIN_VOCAB_SHARE = 0.9


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says why in one line."""


Name = Annotated[str, Field(min_length=1)]
Threshold = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
THRESHOLD = TypeAdapter(Threshold | list[Threshold], config=ConfigDict(strict=True))


# A typed schema: constructing one checks every field's type (strictly: "6" is not a number) and range.
@typed_dataclass(config=ConfigDict(strict=True))
class ExitConfig:
    task: Name
    task_type: Literal["classification", "regression"]
    metric: Name
    label_names: list[Name]
    num_layers: Annotated[int, Field(ge=1)]
    backbone: Name
    criterion: Literal[CRITERIA]
    default_threshold: Threshold | list[Threshold]
    use_lte: bool
    max_length: Annotated[int, Field(ge=MIN_MAX_LENGTH)] = 128
    pooling: Literal["mean", "cls"] = "mean"
    final_activation: Literal["tanh", "relu"] = "tanh"  # relu for a DistilBERT-style final head
    patience_delta: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.1
    strategy: Name = "alternating"
    text_column: Name = "text"
    pair_column: Name | None = None
    calibration: dict[str, Any] | None = None
    dev_scores: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    schema_version: Literal[1] = SCHEMA_VERSION

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
        if len(set(self.label_names)) != len(self.label_names):
            raise CheckpointError(f"exit config: label_names repeat a name: {self.label_names}")
        if self.criterion == "lte" and not self.use_lte:
            raise CheckpointError("exit config: criterion 'lte' but the model has no LTE module")
        try:
            self.thresholds()
            self.make_criterion()
        except ValueError as exc:
            raise CheckpointError(f"exit config: {exc}") from exc
        self._validate_variants()

    def _validate_variants(self) -> None:
        """Every runtime variant's calibrated threshold is one a server could serve with (threshold_for)."""
        variants = (self.calibration or {}).get("variants")
        if variants is None:
            return
        if not isinstance(variants, dict):
            raise CheckpointError("exit config: calibration.variants must be an object")
        for key, record in variants.items():
            where = f"calibration.variants[{key!r}].threshold"
            if not isinstance(record, dict) or "threshold" not in record:
                raise CheckpointError(f"exit config: {where}: missing")
            try:
                self.thresholds(THRESHOLD.validate_python(record["threshold"]))
            except ValueError as exc:  # pydantic's ValidationError is one too
                got = repr(record["threshold"])
                raise CheckpointError(
                    f"exit config: {where}: not a finite threshold in [0, 1] (or one per layer: "
                    f"{self.num_layers}): got {got if len(got) <= 60 else got[:57] + '...'}"
                ) from exc

    def save(self, directory: Path) -> None:
        (directory / EXIT_CONFIG).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> ExitConfig:
        path = directory / EXIT_CONFIG
        try:
            raw = read_json(path)
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path} is missing: not an exitserve checkpoint") from exc
        except UnsafeFile as exc:
            raise CheckpointError(str(exc)) from exc
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
        except ValidationError as exc:
            raise CheckpointError(f"{path}: {first_problem(exc)}") from exc
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
    from exitserve.models.canaries import record_canaries  # it runs the backends, which import this module

    record_canaries(load_checkpoint(directory))  # the model as saved (fp16 weights rounded) is the reference
    return directory


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, backbone_config: PretrainedConfig) -> None:
    """Refuse a tokenizer that does not belong to the backbone: one larger than its vocabulary (ids
    out of range), one much smaller (most words would become the unknown token: a model that starts
    and answers nonsense), or one without the special tokens the model was trained with around every
    input (the first and last tokens of an encoded text: [CLS] ... [SEP], or <s> ... </s>)."""
    size, vocab = len(tokenizer), backbone_config.vocab_size
    if size > vocab:
        raise CheckpointError(
            f"tokenizer has {size} tokens but the backbone's vocabulary holds {vocab}: they do not belong together"
        )
    if size < MIN_VOCAB_SHARE * vocab:
        raise CheckpointError(
            f"tokenizer has only {size} tokens for the backbone's {vocab}: most words would be unknown tokens"
        )
    missing = [name for name in ("cls_token", "sep_token", "pad_token", "unk_token")
               if getattr(tokenizer, name) is None or getattr(tokenizer, f"{name}_id") is None]
    if missing:
        raise CheckpointError(f"tokenizer has no {', '.join(missing)}")
    ids = tokenizer("the")["input_ids"]
    if ids[0] != tokenizer.cls_token_id or ids[-1] != tokenizer.sep_token_id:
        raise CheckpointError(
            f"tokenizer does not put {tokenizer.cls_token} and {tokenizer.sep_token} around an input "
            f"(it encodes 'the' as {ids})"
        )


def load_checkpoint(directory: str | Path, device: str = "cpu") -> Checkpoint:
    """Load and validate a checkpoint; the model comes back in eval mode, fp32, on `device`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    try:
        check_files(directory)  # before any JSON is parsed, by us or by transformers
    except UnsafeFile as exc:
        raise CheckpointError(str(exc)) from exc
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
    check_tokenizer(tokenizer, backbone_config)
    positions = max_tokens(backbone_config)
    if positions is not None and exit_config.max_length > positions:
        raise CheckpointError(
            f"exit config: max_length {exit_config.max_length} is more than the {positions} positions "
            "the backbone has embeddings for"
        )
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
