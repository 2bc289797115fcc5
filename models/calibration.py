"""`exitserve calibrate`: choose the default threshold on calibration rows, measure it on the others,
and store both in the checkpoint.

The rows given (a split of labelled data, or a text file) are split with a fixed seed
(models/holdout.py): a fraction chooses the threshold, the rest reports it. One pass records every
exit's output for all rows; every threshold of the sweep grid is replayed from it (`ExitTable`).

Methods, the seam: anything with `name`, `needs_labels`, `settings()` and `choose(rows) -> Choice`.
  risk   (default) Learn-then-Test (models/risk_control.py): the fastest threshold whose risk —
         quality (labels) or consistency (no labels) — is certified <= max_drop with probability
         >= confidence over the calibration draw, for new inputs from the same distribution.
  point  the lowest threshold whose calibration score, and the score at every higher threshold, stays
         >= min_relative_score x the final layer's (requiring it of every higher threshold too keeps a
         lucky dip in the noisy score curve from being picked). A point estimate: no guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import ClassVar, Protocol

import numpy as np

from exitserve.models.backends import Backend, create_backend
from exitserve.models.canaries import record_variant
from exitserve.models.checkpoint import Checkpoint
from exitserve.models.data import ColumnOptions, Examples, load_texts
from exitserve.models.encoding import encode
from exitserve.models.evaluation import ExitTable, exit_table, load_split_for, record_outputs, sweep_rows
from exitserve.models.exit_config import ExitConfig
from exitserve.models.holdout import available_rows, selection, split_rows
from exitserve.models.risk_control import RISKS, learn_then_test, p_value_kind, risk_losses
from exitserve.models.scores import score


@dataclass
class Rows:
    """Some rows of one recorded pass: their exit table and, when the data has them, their labels."""

    table: ExitTable
    labels: np.ndarray | None
    metric: str
    scale: float | None = None  # the regression quality loss's label range (from the calibration rows)

    def __len__(self) -> int:
        return len(self.table.final)

    def take(self, rows: np.ndarray) -> Rows:
        labels = self.labels[rows] if self.labels is not None else None
        return Rows(self.table.rows(rows), labels, self.metric, self.scale)


def split(rows: Rows, calibration: np.ndarray, report: np.ndarray) -> tuple[Rows, Rows | None]:
    """Calibration rows and report rows (None if empty); the loss scale comes from the calibration rows."""
    chosen = rows.take(calibration)
    if chosen.labels is not None and chosen.table.regression:
        chosen.scale = float(np.ptp(chosen.labels)) or 1.0
    held_out = rows.take(report) if len(report) else None
    if held_out is not None:
        held_out.scale = chosen.scale
    return chosen, held_out


@dataclass
class Choice:
    threshold: float
    details: dict = field(default_factory=dict)  # method-specific, for the record


class CalibrationMethod(Protocol):
    name: ClassVar[str]

    @property
    def needs_labels(self) -> bool: ...

    def settings(self) -> dict: ...

    def choose(self, rows: Rows) -> Choice: ...


def choose_threshold(sweep: list[dict], final_score: float, min_relative_score: float) -> dict:
    """The point method's sweep row (module docstring); threshold 1.0 is on the grid and always qualifies."""
    target = min_relative_score * final_score
    chosen = None
    for row in sorted(sweep, key=lambda r: r["threshold"], reverse=True):
        if row["score"] < target and row["threshold"] < 1.0:
            break
        chosen = row
    assert chosen is not None  # threshold 1.0 is on the grid
    return chosen


@dataclass(frozen=True)
class PointMethod:
    """Today's rule, reported as the point estimate it is."""

    min_relative_score: float = 0.99
    name: ClassVar[str] = "point"
    needs_labels: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 < self.min_relative_score <= 1.0:
            raise ValueError("--min-relative-score must lie in (0, 1]")

    def settings(self) -> dict:
        return {"min_relative_score": self.min_relative_score}

    def choose(self, rows: Rows) -> Choice:
        assert rows.labels is not None
        final = score(rows.metric, rows.table.final, rows.labels)
        return Choice(choose_threshold(sweep_rows(rows.table, rows.metric, rows.labels), final,
                                       self.min_relative_score)["threshold"])


@dataclass(frozen=True)
class RiskMethod:
    """Learn-then-Test with fixed-sequence testing over the sweep grid (models/risk_control.py)."""

    risk: str = "quality"
    max_drop: float = 0.01
    confidence: float = 0.9
    tolerance: float | None = None  # regression consistency: |exit - final| above this is a disagreement
    name: ClassVar[str] = "risk"

    def __post_init__(self) -> None:
        if self.risk not in RISKS:
            raise ValueError(f"unknown risk {self.risk!r}; choose one of {', '.join(RISKS)}")
        if not 0.0 < self.max_drop < 1.0:
            raise ValueError("--max-drop must lie in (0, 1)")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError("--confidence must lie in (0, 1)")
        if self.tolerance is not None and self.tolerance < 0:
            raise ValueError("--tolerance must be >= 0")

    @property
    def needs_labels(self) -> bool:
        return self.risk == "quality"

    def settings(self) -> dict:
        return {"risk": self.risk, "max_drop": self.max_drop, "confidence": self.confidence,
                "tolerance": self.tolerance}

    def choose(self, rows: Rows) -> Choice:
        table = rows.table
        if self.risk == "consistency" and table.regression and self.tolerance is None:
            raise ValueError("--risk consistency on a regression model needs --tolerance (in output units, "
                             "e.g. 0.25 on STS-B's 0-5 scale)")
        losses = risk_losses(self.risk, table.answers, table.final, rows.labels, table.regression,
                             self.tolerance, rows.scale)
        result = learn_then_test(table.thresholds, losses, self.max_drop, self.confidence,
                                 p_value_kind(self.risk, table.regression))
        return Choice(result.threshold, {"p_value": result.p_value, "certified_thresholds": result.certified,
                                         "tests": result.tests()})


def measure(rows: Rows, threshold: float, tolerance: float | None = None) -> dict:
    """What `threshold` does on these rows: exits and layers saved; with labels, the score against
    the final layer's and the quality risk; the consistency risk where it is defined."""
    table = rows.table
    j = table.column(threshold)
    mean_exit = float(table.exit_layer[j].mean())
    out: dict = {"samples": len(rows), "mean_exit_layer": mean_exit,
                 "layers_saved": 1.0 - mean_exit / table.num_layers}
    answers = table.answers[j : j + 1]
    if rows.labels is not None:
        value, final = score(rows.metric, answers[0], rows.labels), score(rows.metric, table.final, rows.labels)
        out.update(score=value, final_layer_score=final, relative_score=value / final if final else float("nan"),
                   drop=final - value)
        out["quality_risk"] = float(risk_losses("quality", answers, table.final, rows.labels, table.regression,
                                                scale=rows.scale).mean())
    if not table.regression or tolerance is not None:
        out["consistency_risk"] = float(risk_losses("consistency", answers, table.final, None, table.regression,
                                                    tolerance).mean())
    return out


def load_rows(checkpoint: Checkpoint, data: str, split_name: str, columns: ColumnOptions | None,
              needs_labels: bool) -> tuple[str, Examples]:
    """(metric, rows) of labelled data, or of a `.txt` file of unlabelled inputs."""
    if data.endswith(".txt"):
        if needs_labels:
            raise ValueError(f"{data} is unlabelled text: this method needs labels "
                             "(use --method risk --risk consistency, or labelled data)")
        return checkpoint.exit_config.metric, load_texts(data)
    spec, rows = load_split_for(checkpoint, data, split_name, columns)
    return spec.metric, rows


def record_rows(checkpoint: Checkpoint, examples: Examples, metric: str, criterion_name: str | None = None,
                batch_size: int = 32, backend: Backend | None = None) -> Rows:
    """One recorded pass over `examples` on `backend` (default: the checkpoint's torch model), replayed at
    every threshold of the sweep grid."""
    cfg = checkpoint.exit_config
    samples = encode(checkpoint.tokenizer, examples.texts, examples.pairs, cfg.max_length)
    table = exit_table(record_outputs(backend or create_backend(checkpoint), samples, batch_size),
                       cfg.make_criterion(criterion_name))
    labels = np.asarray(examples.labels, dtype=float) if examples.labels is not None else None
    return Rows(table, labels, metric)


def calibrate(
    checkpoint: Checkpoint,
    data: str,
    method: CalibrationMethod,
    split_name: str = "dev",
    fraction: float = 0.5,
    seed: int = 0,
    max_samples: int | None = None,
    columns: ColumnOptions | None = None,
    batch_size: int = 32,
    backend: Backend | None = None,
    criterion: str | None = None,
) -> ExitConfig:
    """Choose the threshold of `criterion` (default: the checkpoint's; another one becomes the
    checkpoint's criterion) on a `fraction` of the rows on `backend` (default: the checkpoint's torch
    model), measure it on the rest, update the checkpoint's exit config on disk, and return it. Rows that
    fitted the checkpoint's exit rule are left out first (models/holdout.py). A backend whose answers differ
    from the checkpoint's own (`calibration_key`: quantised weights) gets its record under
    calibration["variants"][key] (ExitConfig.threshold_for) and its canaries are recorded (the self-test
    checks a variant against its own record); otherwise the default threshold is set."""
    backend = backend or create_backend(checkpoint)
    cfg = checkpoint.exit_config
    criterion = criterion or cfg.criterion
    if criterion != cfg.criterion and backend.calibration_key is not None:
        raise ValueError(f"calibrate --criterion {criterion} on the checkpoint's own weights first "
                         f"(the {backend.calibration_key} variant keeps the checkpoint's criterion, {cfg.criterion})")
    metric, examples = load_rows(checkpoint, data, split_name, columns, method.needs_labels)
    picked = selection(examples, max_samples, fraction, seed, cfg.exit_rule.fitted if cfg.exit_rule else None)
    examples = examples.take(available_rows(picked, examples).tolist())
    calibration_idx, report_idx = split_rows(len(examples), fraction, seed)
    rows = record_rows(checkpoint, examples, metric, criterion, batch_size, backend)
    chosen, held_out = split(rows, calibration_idx, report_idx)
    choice = method.choose(chosen)
    tolerance = method.settings().get("tolerance")
    result = {
        "method": method.name,
        **method.settings(),
        "criterion": criterion,
        "metric": metric if rows.labels is not None else None,
        "data": data,
        "split": None if data.endswith(".txt") else split_name,
        **picked,
        "samples": len(examples),
        **({"rule": cfg.exit_rule.describe()} if criterion == "learned" and cfg.exit_rule else {}),
        "calibration_samples": len(chosen),
        "report_samples": len(held_out) if held_out is not None else 0,
        "loss_scale": chosen.scale,
        "threshold": choice.threshold,
        **choice.details,
        "calibration_rows": measure(chosen, choice.threshold, tolerance),
        "report": measure(held_out, choice.threshold, tolerance) if held_out is not None else None,
        "date": date.today().isoformat(),
        "backend": backend.name,
        "quantize": backend.quantize,
    }
    previous = cfg.calibration or {}
    variants = dict(previous.get("variants") or {})
    if backend.calibration_key is None:
        cfg.criterion = criterion
        cfg.default_threshold = choice.threshold
        cfg.calibration = {**result, **({"variants": variants} if variants else {})}
    else:
        cfg.calibration = {**previous, "variants": {**variants, backend.calibration_key: result}}
        record_variant(checkpoint, backend.quantize)  # so the load-time self-test checks this variant too
    cfg.save(checkpoint.path)
    return cfg
