"""`exitserve evaluate`: layer-wise scores, a threshold sweep, measured wall-clock, and plots.

One pass records every exit's output for the whole split (`record_all_layers`); the layer-wise
curve and the sweep are computed from those outputs with the same decision rule the engine uses.
Wall-clock is measured separately by running the real layer-by-layer engine at a few thresholds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from exitserve.models.answers import AllExits, answers
from exitserve.models.backends import Backend, create_backend
from exitserve.models.checkpoint import Checkpoint
from exitserve.models.criteria import ExitCriterion, exits_now, expand_thresholds
from exitserve.models.data import ColumnOptions, Examples, load_examples
from exitserve.models.encoding import Encoded, encode
from exitserve.models.holdout import report_rows
from exitserve.models.inference import predict, record_all_layers
from exitserve.models.scores import all_scores, score
from exitserve.models.tasks import TaskSpec

# The sweep is fine enough for calibration; the printed table and the timing use a few points.
SWEEP_GRID = [round(t, 3) for t in np.arange(0.0, 1.0, 0.01)] + [0.995, 0.999, 1.0]
# The learned rule's score is a probability of agreeing with the final layer: the thresholds that keep
# a 1 % risk crowd into [0.9, 1), so its grid is ten times finer there.
LEARNED_GRID = [round(t, 3) for t in np.arange(0.0, 0.9, 0.01)] + [round(t, 4) for t in np.arange(0.9, 1.0, 0.001)] \
    + [0.9995, 0.9999, 1.0]


def threshold_grid(criterion: ExitCriterion) -> list[float]:
    """The thresholds a sweep and calibration consider for this criterion."""
    return LEARNED_GRID if criterion.name == "learned" else SWEEP_GRID
TIMED_THRESHOLDS = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]


def per_layer_scores(recorded: AllExits, spec: TaskSpec, labels: Sequence[float]) -> list[dict]:
    """Every sample forced to exit at layer k, for k = 1..L."""
    rows = []
    for k in range(recorded.logits.shape[0]):
        scores = all_scores(spec.metric, answers(recorded.logits[k], spec.is_regression).tolist(), labels)
        rows.append({"layer": k + 1, "score": scores[spec.metric], "scores": scores})
    return rows


@dataclass
class ExitTable:
    """Every sample's answer and exit layer at every threshold of a grid, replayed from one recorded
    pass with the engine's decision rule: what the sweep and calibration need, any rows one index away."""

    thresholds: list[float]
    answers: np.ndarray  # [T, N]: the answering exit's answer (label id, or the regression value)
    exit_layer: np.ndarray  # [T, N], 1-based
    final: np.ndarray  # [N]: the final layer's answer
    num_layers: int
    regression: bool

    def rows(self, rows: np.ndarray | Sequence[int]) -> ExitTable:
        """The same table for these rows only."""
        rows = np.asarray(rows, dtype=int)
        return replace(self, answers=self.answers[:, rows], exit_layer=self.exit_layer[:, rows],
                       final=self.final[rows])

    def column(self, threshold: float) -> int:
        """The grid index of `threshold`."""
        return self.thresholds.index(threshold)


def layer_confidences(recorded: AllExits, criterion: ExitCriterion) -> np.ndarray:
    """Every exit's confidence for every sample, `[L, N]`. A criterion's memory follows the layers, not
    the exits, so one replay serves every threshold."""
    memory = criterion.initial_memory(recorded.logits.shape[1])
    out = []
    for k in range(recorded.logits.shape[0]):
        conf, memory = criterion.confidence(recorded.logits[k], recorded.lte[k] if recorded.lte is not None else None,
                                            memory)
        out.append(np.asarray(conf, np.float32))
    return np.stack(out)


def exit_index(confidence: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Each sample's 0-based exit layer under per-layer `thresholds`, from every layer's confidence
    `[L, N]`: the engine's rule (models/criteria.exits_now), compared in float32 as the engine does."""
    limits = np.asarray(thresholds, np.float32)
    last = len(limits) - 1
    leave = np.stack([exits_now(confidence[k], limits[k], k == last) for k in range(len(limits))])
    return leave.argmax(axis=0)  # the first layer that lets the sample go


def decision_table(confidence: np.ndarray, layer_answers: np.ndarray, grid: Sequence[float],
                   regression: bool) -> ExitTable:
    """The table of exits under each threshold of `grid` (one for all layers), from every layer's
    confidence and answer `[L, N]`."""
    num_layers, num = confidence.shape
    exits = np.stack([exit_index(confidence, [threshold] * num_layers) for threshold in grid])
    return ExitTable(
        thresholds=[float(t) for t in grid],
        answers=layer_answers[exits, np.arange(num)].astype(float),
        exit_layer=exits + 1,
        final=layer_answers[-1].astype(float),
        num_layers=num_layers,
        regression=regression,
    )


def exit_table(recorded: AllExits, criterion: ExitCriterion, grid: Sequence[float] | None = None) -> ExitTable:
    layer_answers = answers(recorded.logits, criterion.regression)
    return decision_table(layer_confidences(recorded, criterion), layer_answers,
                          threshold_grid(criterion) if grid is None else grid, criterion.regression)


def sweep_rows(table: ExitTable, metric: str, labels: Sequence[float]) -> list[dict]:
    """Score, relative score, mean exit layer and layers saved at each threshold of the table."""
    final = score(metric, table.final, labels)
    rows = []
    for threshold, answered, exit_layer in zip(table.thresholds, table.answers, table.exit_layer, strict=True):
        value = score(metric, answered, labels)
        mean_exit = float(exit_layer.mean())
        rows.append({
            "threshold": threshold,
            "score": value,
            "relative_score": value / final if final else float("nan"),
            "mean_exit_layer": mean_exit,
            "layers_saved": 1.0 - mean_exit / table.num_layers,
        })
    return rows


def sweep(
    recorded: AllExits,
    criterion: ExitCriterion,
    spec: TaskSpec,
    labels: Sequence[float],
    grid: Sequence[float] | None = None,
) -> list[dict]:
    """Score and mean exit layer at each threshold (one threshold for all layers)."""
    return sweep_rows(exit_table(recorded, criterion, grid), spec.metric, labels)


def wall_clock(
    backend: Backend,
    criterion: ExitCriterion,
    samples: list,
    thresholds: Sequence[float],
    batch_size: int,
) -> list[dict]:
    """Seconds for the real engine to answer the whole split at each threshold (best of 2 runs),
    with the mean exit layer of those runs."""
    num_layers = backend.num_layers
    predict(backend, criterion, samples[:batch_size], expand_thresholds(1.0, num_layers), batch_size)  # warm-up
    rows = []
    for threshold in tqdm(thresholds, desc=f"wall-clock (batch {batch_size})", unit="threshold"):
        times = []
        for _ in range(2):
            start = time.perf_counter()
            results = predict(backend, criterion, samples, expand_thresholds(threshold, num_layers), batch_size)
            times.append(time.perf_counter() - start)
        mean_exit = sum(r.exit_layer for r in results) / len(results)
        rows.append({"threshold": threshold, "seconds": min(times), "mean_exit_layer": mean_exit})
    full = next((r["seconds"] for r in rows if r["threshold"] >= 1.0), None)
    for row in rows:
        row["speedup_vs_full"] = full / row["seconds"] if full else None
        row["ideal_speedup"] = num_layers / row["mean_exit_layer"]
    return rows


def evaluate(
    checkpoint: Checkpoint,
    data: str,
    split: str = "dev",
    columns: ColumnOptions | None = None,
    criterion_name: str | None = None,
    max_samples: int | None = None,
    batch_size: int = 32,
    timed_thresholds: Sequence[float] = TIMED_THRESHOLDS,
    include_calibration_rows: bool = False,
    backend: Backend | None = None,
) -> dict:
    """Layer-wise scores and the threshold sweep from one recorded pass, plus wall-clock runs, on the
    checkpoint's own torch model unless another `backend` is given; without the rows the checkpoint's
    threshold was calibrated on when its calibration record names these rows (models/holdout.py),
    unless asked to include them."""
    cfg = checkpoint.exit_config
    backend = backend or create_backend(checkpoint)
    spec, rows = load_split_for(checkpoint, data, split, columns)
    rows, selection = report_rows(cfg.calibration, rows, include_calibration_rows)
    if max_samples is not None and max_samples < len(rows):
        selection["note"] += f"; a random {max_samples} of them (--max-samples)"
    rows = rows.subset(max_samples, seed=0)
    criterion = cfg.make_criterion(criterion_name)
    samples = encode(checkpoint.tokenizer, rows.texts, rows.pairs, cfg.max_length)
    recorded = record_outputs(backend, samples, batch_size)
    layers = per_layer_scores(recorded, spec, rows.labels)
    timings = wall_clock(backend, criterion, samples, timed_thresholds, batch_size) if timed_thresholds else []
    return {
        "checkpoint": str(checkpoint.path),
        "data": data,
        "split": split,
        "rows": selection,
        "samples": len(rows),
        "metric": spec.metric,
        "criterion": criterion.name,
        **({"rule": criterion.rule.describe()} if criterion.name == "learned" and criterion.rule else {}),
        "calibrated_threshold": cfg.default_threshold,
        "num_layers": cfg.num_layers,
        "final_layer_score": layers[-1]["score"],
        "final_layer_scores": layers[-1]["scores"],
        "per_layer": layers,
        "sweep": sweep(recorded, criterion, spec, rows.labels),
        "wall_clock": {"batch_size": batch_size, "backend": backend.name, "quantize": backend.quantize,
                       "device": str(backend.device),
                       "torch_threads": torch.get_num_threads(), "runs": timings},
    }


def record_outputs(backend: Backend, samples: list[Encoded], batch_size: int = 32) -> AllExits:
    """`record_all_layers` over encoded samples, with a progress bar."""
    with tqdm(total=len(samples), desc="recording all layers", unit="sample") as bar:
        return record_all_layers(backend, samples, batch_size, bar)


def load_split_for(
    checkpoint: Checkpoint, data: str, split: str, columns: ColumnOptions | None = None
) -> tuple[TaskSpec, Examples]:
    """A split with the checkpoint's label mapping (and its text columns unless given)."""
    cfg = checkpoint.exit_config
    columns = columns or ColumnOptions(cfg.text_column, cfg.pair_column, "label", cfg.task_type)
    return load_examples(data, split, columns, tuple(cfg.label_names) or None)


def write_report(report: dict, json_path: Path) -> list[Path]:
    """The JSON report plus two PNG plots beside it; returns the written paths."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    return [json_path, *plot_report(report, json_path.with_suffix(""))]


def plot_report(report: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["metric"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    layers = report["per_layer"]
    ax.plot([r["layer"] for r in layers], [r["score"] for r in layers], marker="o")
    ax.set(xlabel="exit layer (all samples forced)", ylabel=metric, title="Layer-wise score")
    ax.grid(alpha=0.3)
    layer_png = Path(f"{stem}_layers.png")
    fig.tight_layout()
    fig.savefig(layer_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    pts = report["sweep"]
    ax.plot([r["mean_exit_layer"] for r in pts], [r["score"] for r in pts], marker=".", label="threshold sweep")
    ax.axhline(report["final_layer_score"], color="grey", ls="--", label="final layer")
    ax.set(xlabel="mean exit layer", ylabel=metric, title=f"Trade-off ({report['criterion']})")
    ax.grid(alpha=0.3)
    ax.legend()
    sweep_png = Path(f"{stem}_tradeoff.png")
    fig.tight_layout()
    fig.savefig(sweep_png, dpi=120)
    plt.close(fig)
    return [layer_png, sweep_png]


def format_report(report: dict) -> str:
    lines = [
        *([f"rows: {report['rows']['note']}"] if "rows" in report else []),
        f"{report['samples']} samples, metric {report['metric']}, criterion {report['criterion']}",
        *([f"exit rule: {report['rule']['kind']} on {', '.join(report['rule']['features'])}; fitted on "
           f"{report['rule']['fitted'].get('rows')} rows of {report['rule']['fitted'].get('data')}"]
          if "rule" in report else []),
        f"final layer: {report['final_layer_scores']}",
        "",
        "layer  score",
        *(f"{r['layer']:>5}  {r['score']:.4f}" for r in report["per_layer"]),
        "",
        "threshold  score   relative  mean_exit  layers_saved",
    ]
    calibrated = report.get("calibrated_threshold")
    shown = set(TIMED_THRESHOLDS) | {0.0, 0.6, calibrated if isinstance(calibrated, float) else 1.0}
    for r in report["sweep"]:
        if r["threshold"] in shown:
            lines.append(
                f"{r['threshold']:>9.3f}  {r['score']:.4f}  {r['relative_score']:.4f}    "
                f"{r['mean_exit_layer']:.2f}       {r['layers_saved']:.1%}"
                + ("   <- the checkpoint's calibrated threshold" if r["threshold"] == calibrated else "")
            )
    runs = report["wall_clock"]["runs"]
    if runs:
        lines += ["", f"wall-clock (batch {report['wall_clock']['batch_size']}): "
                  "threshold  seconds  mean_exit  speed-up  ideal"]
        lines += [f"  {r['threshold']:>9.3f}  {r['seconds']:7.3f}  {r['mean_exit_layer']:9.2f}  "
                  f"{r['speedup_vs_full'] or 0:7.2f}x  {r['ideal_speedup']:.2f}x" for r in runs]
    return "\n".join(lines)
