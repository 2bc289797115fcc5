"""What a task is: its columns, labels, type and metric. GLUE tasks are predefined.

A `TaskSpec` travels with the data and, through the checkpoint's exit config, with the model, so
evaluation maps raw labels to the same ids that training used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

CLASSIFICATION = "classification"
REGRESSION = "regression"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    task_type: str  # classification | regression
    metric: str  # accuracy | f1 | spearman | matthews | pearson
    text_column: str
    pair_column: str | None = None
    label_column: str = "label"
    label_names: tuple[str, ...] = ()  # classification: id -> name
    raw_labels: dict[str, str] = field(default_factory=dict)  # raw value in the file -> label name

    @property
    def is_regression(self) -> bool:
        return self.task_type == REGRESSION

    @property
    def num_outputs(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    def label_id(self, raw: str) -> int:
        name = self.raw_labels.get(raw, raw)
        try:
            return self.label_names.index(name)
        except ValueError as exc:
            raise ValueError(f"label {raw!r} is not one of {list(self.label_names)}") from exc


def align_labels(spec: TaskSpec, label_names: Sequence[str], raw_values: Iterable[str]) -> TaskSpec:
    """`spec` with a model's label names, each raw label of the data mapped to one of them by name.

    A raw label (or the name its task gives it, e.g. GLUE SST-2's 0 -> negative) matches a model label
    of the same name, exactly or else ignoring case (SST-2's negative/positive reach a model's
    NEGATIVE/POSITIVE); an integer k matches Hugging Face's unnamed default LABEL_k. A raw label that
    matches nothing is a ValueError naming both sides, raised before any model work.
    """
    names = tuple(label_names)
    folded: dict[str, str] = {}
    for name in names:
        folded[name.lower()] = name if name.lower() not in folded else ""  # "": ambiguous
    mapping = {}
    for raw in sorted(set(raw_values)):
        candidates = [raw] + ([spec.raw_labels[raw]] if raw in spec.raw_labels else [])
        found = next((c for c in candidates if c in names), None)
        found = found or next((folded[c.lower()] for c in candidates if folded.get(c.lower())), None)
        if found is None and raw.isdigit() and int(raw) < len(names) and names[int(raw)] == f"LABEL_{raw}":
            found = names[int(raw)]
        if found is None:
            shown = raw if len(candidates) == 1 else f"{raw} ({candidates[1]})"
            raise ValueError(
                f"data label {shown!r} matches none of the model's labels {list(names)}: rename the labels "
                "in the data (by name, case ignored)"
            )
        mapping[raw] = found
    return replace(spec, label_names=names, raw_labels=mapping)


def _binary(zero: str, one: str) -> dict[str, str]:
    return {"0": zero, "1": one}


ENTAILMENT = ("entailment", "not_entailment")

# GLUE tasks: the column names used by both the GLUE TSV files and the Hugging Face `glue` dataset
# (loaders rename the few that differ). Metrics as in the BERxiT reference code.
GLUE_TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        "sst2", CLASSIFICATION, "accuracy", "sentence",
        label_names=("negative", "positive"), raw_labels=_binary("negative", "positive"),
    ),
    "mrpc": TaskSpec(
        "mrpc", CLASSIFICATION, "f1", "sentence1", "sentence2",
        label_names=("not_equivalent", "equivalent"), raw_labels=_binary("not_equivalent", "equivalent"),
    ),
    "stsb": TaskSpec("stsb", REGRESSION, "spearman", "sentence1", "sentence2"),
    "rte": TaskSpec(
        "rte", CLASSIFICATION, "accuracy", "sentence1", "sentence2",
        label_names=ENTAILMENT, raw_labels=_binary(*ENTAILMENT),
    ),
    "cola": TaskSpec(
        "cola", CLASSIFICATION, "matthews", "sentence",
        label_names=("unacceptable", "acceptable"), raw_labels=_binary("unacceptable", "acceptable"),
    ),
    "qnli": TaskSpec(
        "qnli", CLASSIFICATION, "accuracy", "question", "sentence",
        label_names=ENTAILMENT, raw_labels=_binary(*ENTAILMENT),
    ),
}

# Directory names in the GLUE distribution -> task key.
GLUE_DIRS = {"sst-2": "sst2", "mrpc": "mrpc", "sts-b": "stsb", "rte": "rte", "cola": "cola", "qnli": "qnli"}


def glue_task(name: str) -> TaskSpec | None:
    key = name.lower().replace("glue/", "").replace("glue-", "")
    key = GLUE_DIRS.get(key, key).replace("-", "")
    return GLUE_TASKS.get(key)
