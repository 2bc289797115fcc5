"""A checkpoint's exit config and the checks that need no model: what a server reads before serving.

    exit_config.json     `ExitConfig`: task, labels, criterion, default threshold, calibration,
                         training strategy, dev scores, schema version
    exit_rule.json       optional: the learned exit rule (models/exit_rule.py), its own typed schema

`ExitConfig.read` validates it with a typed pydantic schema and raises `CheckpointError` with a one-line
reason. `read_backbone_config` and `max_tokens` read the backbone's config.json as plain JSON. Nothing
here imports torch or transformers (models/checkpoint.py loads the torch model; models/served.py loads
what serving on ONNX Runtime needs).
"""

from __future__ import annotations

import json
from dataclasses import asdict, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as typed_dataclass

from exitserve.models.bounded_files import UnsafeFile, check_readable, read_json
from exitserve.models.criteria import CRITERIA, ExitCriterion, expand_thresholds
from exitserve.models.encoding import TextEncoder
from exitserve.models.exit_rule import RULE_FILE, RULE_SCHEMA_VERSION, ExitRule
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


class BackboneError(RuntimeError):
    """A backbone that cannot be found or is of an unsupported family (models/backbones.py)."""


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
    exit_rule: ExitRule | None = None  # stored beside, in exit_rule.json

    @property
    def regression(self) -> bool:
        return self.task_type == REGRESSION

    @property
    def num_outputs(self) -> int:
        return 1 if self.regression else len(self.label_names)

    def make_criterion(self, name: str | None = None) -> ExitCriterion:
        return ExitCriterion(name or self.criterion, self.num_layers, self.regression, self.patience_delta,
                             self.exit_rule)

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
        rule = self.exit_rule
        if rule is not None and (rule.task_type, rule.num_layers, rule.num_outputs) != (
                self.task_type, self.num_layers, self.num_outputs):
            raise CheckpointError(f"{RULE_FILE}: fitted for a {rule.task_type} model with {rule.num_layers} layers "
                                  f"and {rule.num_outputs} outputs, not this one")
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
        config = asdict(self)
        del config["exit_rule"]
        (directory / EXIT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if self.exit_rule is not None:
            self.exit_rule.save(directory)

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
        known = {f.name for f in fields(cls)} - {"exit_rule"}
        try:
            config = cls(**{k: v for k, v in raw.items() if k in known}, exit_rule=read_exit_rule(directory))
        except ValidationError as exc:
            raise CheckpointError(f"{path}: {first_problem(exc)}") from exc
        config.validate()
        return config


def read_exit_rule(directory: Path) -> ExitRule | None:
    """The checkpoint's learned exit rule, validated; None when it has none (checkpoints before it)."""
    path = directory / RULE_FILE
    if not path.is_file():
        return None
    try:
        raw = read_json(path)
    except UnsafeFile as exc:
        raise CheckpointError(str(exc)) from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    if raw.get("schema_version") != RULE_SCHEMA_VERSION:
        raise CheckpointError(f"{path}: schema version {raw.get('schema_version')!r} is not supported")
    try:
        return ExitRule(**raw)
    except ValidationError as exc:
        raise CheckpointError(f"{path}: {first_problem(exc)}") from exc



# families whose position ids start after the padding index (so max_position_embeddings - pad - 1 are usable)
POSITIONS_AFTER_PADDING = ("roberta", "xlm-roberta", "camembert", "mpnet")


def read_backbone_config(directory: Path) -> dict:
    """The backbone's config.json as a dict (CheckpointError when it is missing or not a JSON object)."""
    path = directory / "config.json"
    try:
        config = read_json(path)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {directory} is missing config.json") from exc
    except (OSError, ValueError) as exc:  # UnsafeFile is a ValueError
        raise CheckpointError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return config


def max_tokens(config: dict) -> int | None:
    """The longest input (in tokens, special ones included) the backbone has position embeddings for;
    None when its config does not say."""
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return None
    if config.get("model_type") in POSITIONS_AFTER_PADDING:
        positions -= (config.get("pad_token_id") or 0) + 1
    return positions


def check_encoder(encoder: TextEncoder, vocab_size: int) -> None:
    """Refuse a tokenizer that does not belong to the backbone: one larger than its vocabulary (ids
    out of range), one much smaller (most words would become the unknown token: a model that starts
    and answers nonsense), or one that does not put the special tokens the model was trained with
    around every input (the first and last tokens of an encoded text: [CLS] ... [SEP], or <s> ... </s>)."""
    size = encoder.vocab_size
    if size > vocab_size:
        raise CheckpointError(
            f"tokenizer has {size} tokens but the backbone's vocabulary holds {vocab_size}: they do not belong together"
        )
    if size < MIN_VOCAB_SHARE * vocab_size:
        raise CheckpointError(
            f"tokenizer has only {size} tokens for the backbone's {vocab_size}: most words would be unknown tokens"
        )
    probe = encoder.plain.encode("the")
    if not (probe.special_tokens_mask and probe.special_tokens_mask[0] and probe.special_tokens_mask[-1]):
        raise CheckpointError(
            f"tokenizer does not put its special tokens around an input (it encodes 'the' as {probe.tokens})"
        )


def check_files(directory: Path) -> tuple[ExitConfig, dict]:
    """The checks that need no model: the files are there, the exit config is valid, and its max_length
    fits the backbone's position embeddings. Returns the exit config and the backbone's config.json."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    try:
        check_readable(directory)  # before any JSON is parsed, by us or by the tokenizer libraries
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
    backbone_config = read_backbone_config(directory)
    positions = max_tokens(backbone_config)
    if positions is not None and exit_config.max_length > positions:
        raise CheckpointError(
            f"exit config: max_length {exit_config.max_length} is more than the {positions} positions "
            "the backbone has embeddings for"
        )
    return exit_config, backbone_config
