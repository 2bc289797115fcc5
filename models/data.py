"""Load labelled text for training and evaluation.

`--data` may be:
  - a GLUE task directory (SST-2, MRPC, STS-B, RTE, CoLA, QNLI as distributed: `train.tsv`,
    `dev.tsv`; MRPC's UTF-8 BOM, CoLA's missing header and STS-B's ten columns are handled);
  - a CSV, TSV or JSONL file, with `--text-column`, `--pair-column`, `--label-column`;
  - a Hugging Face dataset name such as `glue/sst2` or `user/dataset` (needs `pip install
    exitserve[hub]` and internet; the split `dev` maps to `validation`).

`load_texts` reads unlabelled text (a `.txt` file: one input per line, a pair as two tab-separated
columns) for what needs no labels: consistency calibration and exits distilled from the final layer.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from exitserve.models.tasks import CLASSIFICATION, REGRESSION, TaskSpec, align_labels, glue_task

# Quirks of the GLUE TSV files, per task: renamed columns, or the columns of a headerless file.
GLUE_RENAME = {
    "mrpc": {"Quality": "label", "#1 String": "sentence1", "#2 String": "sentence2"},
    "stsb": {"score": "label"},
}
GLUE_HEADERLESS = {"cola": ["source", "label", "original_label", "sentence"]}
SPLIT_FILES = {"dev": ("dev", "validation"), "validation": ("validation", "dev"), "train": ("train",)}
# Where the GLUE task directories are (../shared/data/glue beside the repository), unless EXITSERVE_GLUE_DIR says.
GLUE_DIR = os.environ.get("EXITSERVE_GLUE_DIR", "../shared/data/glue")
DEFAULT_DATA = f"{GLUE_DIR}/SST-2"
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".txt")


@dataclass
class Examples:
    texts: list[str]
    pairs: list[str] | None
    labels: list[int] | list[float] | None  # None: unlabelled text (`load_texts`)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int | None, seed: int) -> Examples:
        """A random subset of n rows (all rows when n is None or too large)."""
        if n is None or n >= len(self):
            return self
        return self.take(subset_rows(len(self), n, seed))

    def take(self, rows: Sequence[int]) -> Examples:
        """These rows, in this order."""
        return Examples(
            [self.texts[i] for i in rows],
            [self.pairs[i] for i in rows] if self.pairs is not None else None,
            [self.labels[i] for i in rows] if self.labels is not None else None,  # type: ignore[misc]
        )


def subset_rows(total: int, n: int | None, seed: int) -> list[int]:
    """The rows `Examples.subset(n, seed)` keeps out of `total` (all of them when n is None or too large)."""
    if n is None or n >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), n))


@dataclass(frozen=True)
class ColumnOptions:
    """For generic files and datasets; GLUE tasks know their columns."""

    text_column: str = "text"
    pair_column: str | None = None
    label_column: str = "label"
    task_type: str | None = None  # classification | regression; None: guess from the labels


def _read_table(path: Path, delimiter: str, fieldnames: list[str] | None) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        return list(csv.DictReader(fh, fieldnames=fieldnames, delimiter=delimiter, quoting=quoting))


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".txt":
        raise ValueError(f"{path} is unlabelled text (one input per line); this command needs labelled data "
                         "(a GLUE directory, CSV/TSV/JSONL with a label column)")
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    return _read_table(path, "\t" if path.suffix == ".tsv" else ",", None)


def _glue_file(directory: Path, split: str) -> Path:
    for stem in SPLIT_FILES.get(split, (split,)):
        if (directory / f"{stem}.tsv").exists():
            return directory / f"{stem}.tsv"
    raise FileNotFoundError(f"no {split} split (e.g. {split}.tsv) in {directory}")


def looks_local(data: str) -> bool:
    """A path the user meant as a local file or directory (a hub name is `name` or `owner/name`)."""
    return (
        data.startswith(("/", ".", "~"))
        or data.endswith(FILE_SUFFIXES)
        or (os.sep in data and Path(data.split(os.sep)[0]).is_dir())
    )


def _hub_rows(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(f"{name!r} is not a local file or directory; as a Hugging Face dataset name it needs "
                         "pip install 'exitserve[hub]' (and internet)") from exc
    hf_split = "validation" if split == "dev" else split
    parts = name.split("/")
    config = parts[1] if parts[0] == "glue" and len(parts) == 2 else None
    path = "nyu-mll/glue" if config else name
    return list(datasets.load_dataset(path, config, split=hf_split))


def _spec_for(name: str, rows: list[dict], options: ColumnOptions) -> TaskSpec:
    glue = glue_task(name)
    if glue is not None:
        return glue
    if not rows:
        raise ValueError(f"{name}: no rows")
    for column in (options.text_column, options.pair_column, options.label_column):
        if column is not None and column not in rows[0]:
            raise ValueError(f"{name}: no column {column!r}; columns are {sorted(rows[0])}")
    raw = [str(r[options.label_column]) for r in rows]
    task_type = options.task_type
    if task_type is None:
        task_type = REGRESSION if any(_is_fractional(v) for v in raw) else CLASSIFICATION
    names = tuple(sorted(set(raw))) if task_type == CLASSIFICATION else ()
    metric = "accuracy" if task_type == CLASSIFICATION else "spearman"
    return TaskSpec(
        Path(name).stem, task_type, metric, options.text_column, options.pair_column,
        options.label_column, names,
    )


def _is_fractional(value: str) -> bool:
    try:
        return float(value) != int(float(value))
    except ValueError:
        return False


def load_examples(
    data: str,
    split: str = "train",
    options: ColumnOptions | None = None,
    label_names: tuple[str, ...] | None = None,
) -> tuple[TaskSpec, Examples]:
    """Read one split. `label_names` (from a checkpoint) fixes the label -> id mapping."""
    options = options or ColumnOptions()
    path = Path(data)
    if path.is_dir():
        file = _glue_file(path, split)
        glue = glue_task(path.name)
        key = glue.name if glue else ""
        rows = _read_table(file, "\t", GLUE_HEADERLESS.get(key))
        rename = GLUE_RENAME.get(key, {})
        rows = [{rename.get(k, k): v for k, v in row.items()} for row in rows]
        rows_name = glue.name if glue else path.name
    elif path.is_file():
        rows, rows_name = _read_file(path), path.name
    elif looks_local(data):
        raise FileNotFoundError(f"--data {data}: no such file or directory")
    else:
        rows, rows_name = _hub_rows(data, split), data
    spec = _spec_for(rows_name, rows, options)
    if label_names and not spec.is_regression:
        spec = align_labels(spec, label_names, (str(r[spec.label_column]) for r in _labelled(spec, rows)))
    return spec, _examples(spec, rows)


def _labelled(spec: TaskSpec, rows: list[dict]) -> list[dict]:
    """The rows with a text and a label (hub test splits, for one, carry -1 or nothing)."""
    return [
        row for row in rows
        if row.get(spec.text_column) is not None and str(row.get(spec.label_column, "")) not in ("", "-1", "None")
    ]


def _examples(spec: TaskSpec, rows: list[dict]) -> Examples:
    texts, pairs, labels = [], [], []
    for row in _labelled(spec, rows):
        texts.append(str(row[spec.text_column]))
        if spec.pair_column:
            pairs.append(str(row.get(spec.pair_column) or ""))
        raw = str(row[spec.label_column])
        labels.append(float(raw) if spec.is_regression else spec.label_id(raw))
    return Examples(texts, pairs if spec.pair_column else None, labels)


def load_texts(data: str) -> Examples:
    """Unlabelled inputs from a `.txt` file: one per line (blank lines skipped); a line with a tab is a
    pair (text, second text). Every line must have the same shape."""
    path = Path(data).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--data {data}: no such file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{data}: no text")
    columns = {line.count("\t") for line in lines}
    if columns not in ({0}, {1}):
        raise ValueError(f"{data}: every line must be one text, or two tab-separated texts (a pair)")
    if columns == {0}:
        return Examples(lines, None, None)
    texts, pairs = zip(*(line.split("\t") for line in lines), strict=True)
    return Examples(list(texts), list(pairs), None)
