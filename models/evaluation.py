"""`exitserve evaluate`: layer-wise scores, a threshold sweep, measured wall-clock, and plots.

One pass records every exit's output for the whole split (`record_all_layers`); the layer-wise
curve and the sweep are computed from those outputs with the same decision rule the engine uses.
Wall-clock is measured separately by running the real layer-by-layer engine at a few thresholds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from exitserve.models.answers import answers
from exitserve.models.backends import Backend, create_backend
from exitserve.models.checkpoint import Checkpoint
from exitserve.models.criteria import ExitCriterion, expand_thresholds
from exitserve.models.data import ColumnOptions, Examples, load_examples
from exitserve.models.early_exit import AllExits
from exitserve.models.encoding import encode
from exitserve.models.inference import predict, record_all_layers, simulate_exits
from exitserve.models.scores import all_scores
from exitserve.models.tasks import TaskSpec

# The sweep is fine enough for calibration; the printed table and the timing use a few points.
SWEEP_GRID = [round(t, 3) for t in np.arange(0.0, 1.0, 0.01)] + [0.995, 0.999, 1.0]
TIMED_THRESHOLDS = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]


def per_layer_scores(recorded: AllExits, spec: TaskSpec, labels: Sequence[float]) -> list[dict]:
    """Every sample forced to exit at layer k, for k = 1..L."""
    rows = []
    for k in range(recorded.logits.shape[0]):
        scores = all_scores(spec.metric, answers(recorded.logits[k], spec.is_regression).tolist(), labels)
        rows.append({"layer": k + 1, "score": scores[spec.metric], "scores": scores})
    return rows


def sweep(
    recorded: AllExits,
    criterion: ExitCriterion,
    spec: TaskSpec,
    labels: Sequence[float],
    grid: Sequence[float] = SWEEP_GRID,
) -> list[dict]:
    """Score and mean exit layer at each threshold (one threshold for all layers)."""
    num_layers = recorded.logits.shape[0]
    final = all_scores(spec.metric, answers(recorded.logits[-1], spec.is_regression).tolist(), labels)[spec.metric]
    rows = []
    for threshold in grid:
        sim = simulate_exits(recorded, criterion, [threshold] * num_layers)
        value = all_scores(spec.metric, answers(sim.logits, spec.is_regression).tolist(), labels)[spec.metric]
        mean_exit = float(sim.exit_layer.float().mean())
        rows.append({
            "threshold": threshold,
            "score": value,
            "relative_score": value / final if final else float("nan"),
            "mean_exit_layer": mean_exit,
            "layers_saved": 1.0 - mean_exit / num_layers,
        })
    return rows


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
    backend: Backend | None = None,
) -> dict:
    """Layer-wise scores and the threshold sweep from one recorded pass, plus wall-clock runs; on the
    checkpoint's own torch model unless another `backend` is given."""
    cfg = checkpoint.exit_config
    backend = backend or create_backend(checkpoint)
    spec, rows = load_split_for(checkpoint, data, split, columns)
    rows = rows.subset(max_samples, seed=0)
    criterion = cfg.make_criterion(criterion_name)
    samples = encode(checkpoint.tokenizer, rows.texts, rows.pairs, cfg.max_length)
    with tqdm(total=len(samples), desc="recording all layers", unit="sample") as bar:
        recorded = record_all_layers(backend, samples, batch_size, bar)
    layers = per_layer_scores(recorded, spec, rows.labels)
    timings = wall_clock(backend, criterion, samples, timed_thresholds, batch_size) if timed_thresholds else []
    return {
        "checkpoint": str(checkpoint.path),
        "data": data,
        "split": split,
        "samples": len(rows),
        "metric": spec.metric,
        "criterion": criterion.name,
        "num_layers": cfg.num_layers,
        "final_layer_score": layers[-1]["score"],
        "final_layer_scores": layers[-1]["scores"],
        "per_layer": layers,
        "sweep": sweep(recorded, criterion, spec, rows.labels),
        "wall_clock": {"batch_size": batch_size, "backend": backend.name, "quantize": backend.quantize,
                       "device": str(backend.device),
                       "torch_threads": torch.get_num_threads(), "runs": timings},
    }


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
        f"{report['samples']} samples, metric {report['metric']}, criterion {report['criterion']}",
        f"final layer: {report['final_layer_scores']}",
        "",
        "layer  score",
        *(f"{r['layer']:>5}  {r['score']:.4f}" for r in report["per_layer"]),
        "",
        "threshold  score   relative  mean_exit  layers_saved",
    ]
    shown = set(TIMED_THRESHOLDS) | {0.0, 0.6}
    for r in report["sweep"]:
        if r["threshold"] in shown:
            lines.append(
                f"{r['threshold']:>9.3f}  {r['score']:.4f}  {r['relative_score']:.4f}    "
                f"{r['mean_exit_layer']:.2f}       {r['layers_saved']:.1%}"
            )
    runs = report["wall_clock"]["runs"]
    if runs:
        lines += ["", f"wall-clock (batch {report['wall_clock']['batch_size']}): "
                  "threshold  seconds  mean_exit  speed-up  ideal"]
        lines += [f"  {r['threshold']:>9.3f}  {r['seconds']:7.3f}  {r['mean_exit_layer']:9.2f}  "
                  f"{r['speedup_vs_full'] or 0:7.2f}x  {r['ideal_speedup']:.2f}x" for r in runs]
    return "\n".join(lines)
