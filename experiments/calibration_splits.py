"""Does the calibrated threshold keep its promise on rows it was not chosen on? 100 random splits.

    python -m exitserve.experiments.calibration_splits --checkpoint server/default_model \\
        --data ../shared/data/glue/SST-2 [--splits 100] [--out docs/results/calibration]

Records every exit's output once over the split (dev) -- without the rows that fitted the checkpoint's
learned exit rule, if it was fitted on this data -- then for each of --splits seeded random
calibration/report splits (seed = split number, --calibration-fraction of the rows calibrate, as
`exitserve calibrate` does) chooses a threshold on the calibration rows with each method and scores
it on the report rows:
  risk-quality      Learn-then-Test, quality risk, --max-drop, --confidence (the default calibration)
  risk-consistency  Learn-then-Test, consistency risk (no labels), same settings
  point             the point estimate at --min-relative-score
Per method: the fraction of splits where the held-out drop against the final layer is <= max-drop,
where the held-out score is >= min-relative-score x the final layer's, the mean and worst held-out
relative score, and the mean layers saved. Writes JSON, a markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from exitserve.models.calibration import (
    CalibrationMethod,
    PointMethod,
    RiskMethod,
    Rows,
    load_rows,
    measure,
    record_rows,
    split,
)
from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.holdout import rule_rows, split_rows


def methods(max_drop: float, confidence: float, min_relative_score: float, tolerance: float | None,
            regression: bool) -> dict[str, CalibrationMethod]:
    found: dict[str, CalibrationMethod] = {"risk-quality": RiskMethod("quality", max_drop, confidence)}
    if not regression or tolerance is not None:
        found["risk-consistency"] = RiskMethod("consistency", max_drop, confidence, tolerance)
    found["point"] = PointMethod(min_relative_score)
    return found


def run_splits(rows: Rows, chosen_by: dict[str, CalibrationMethod], splits: int, fraction: float,
               tolerance: float | None) -> list[dict]:
    """One row per (split, method): the threshold and what it does on the split's report rows."""
    results = []
    for seed in tqdm(range(splits), desc="calibration/report splits", unit="split"):
        calibration, report = split(rows, *split_rows(len(rows), fraction, seed))
        if report is None:
            raise ValueError("--calibration-fraction leaves no report rows")
        for name, method in chosen_by.items():
            threshold = method.choose(calibration).threshold
            results.append({"split": seed, "method": name, "threshold": threshold,
                            **measure(report, threshold, tolerance)})
    return results


def summarise(results: list[dict], max_drop: float, min_relative_score: float) -> dict[str, dict]:
    summary = {}
    for name in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == name]
        relative = np.array([r["relative_score"] for r in rows])
        summary[name] = {
            "splits": len(rows),
            "median_threshold": float(np.median([r["threshold"] for r in rows])),
            "thresholds_range": [min(r["threshold"] for r in rows), max(r["threshold"] for r in rows)],
            "drop_within_max_drop": float(np.mean([r["drop"] <= max_drop for r in rows])),
            "relative_at_least_target": float(np.mean(relative >= min_relative_score)),
            "quality_risk_within_max_drop": float(np.mean([r["quality_risk"] <= max_drop for r in rows])),
            "mean_relative_score": float(relative.mean()),
            "min_relative_score": float(relative.min()),
            "mean_layers_saved": float(np.mean([r["layers_saved"] for r in rows])),
        }
    return summary


def markdown(study: dict) -> str:
    s = study["settings"]
    lines = [
        f"# Calibration on one part, report on the other: {s['splits']} random splits",
        "",
        f"Checkpoint `{s['checkpoint']}`, data `{s['data']}` ({s['split']}, {s['samples']} rows): "
        f"{s['calibration_fraction']:.0%} calibrate, the rest report. Metric {s['metric']}, "
        f"criterion {s['criterion']}; max-drop {s['max_drop']}, confidence {s['confidence']}, "
        f"point target {s['min_relative_score']}.",
        "",
        f"Command: `{s['command']}`  ",
        f"Machine: {s['machine']}; {s['date']}.",
        "",
        f"| method | median threshold (range) | held-out drop ≤ {s['max_drop']} | held-out relative ≥ "
        f"{s['min_relative_score']} | held-out quality risk ≤ {s['max_drop']} | mean relative | worst relative "
        "| mean layers saved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in study["summary"].items():
        low, high = m["thresholds_range"]
        lines.append(
            f"| {name} | {m['median_threshold']:.3f} ({low:.3f}–{high:.3f}) | {m['drop_within_max_drop']:.0%} | "
            f"{m['relative_at_least_target']:.0%} | {m['quality_risk_within_max_drop']:.0%} | "
            f"{m['mean_relative_score']:.4f} | {m['min_relative_score']:.4f} | {m['mean_layers_saved']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def plot(study: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = study["settings"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    everything = [r["relative_score"] for r in study["results"]]
    bins = np.linspace(min(everything), max(everything), 41)
    for name in study["summary"]:
        rows = [r for r in study["results"] if r["method"] == name]
        relative = [r["relative_score"] for r in rows]
        left.hist(relative, bins=bins, alpha=0.5, label=name)
        right.scatter([r["layers_saved"] for r in rows], relative, s=10, alpha=0.6, label=name)
    for ax in (left, right):
        (ax.axvline if ax is left else ax.axhline)(s["min_relative_score"], color="grey", ls="--",
                                                    label=f"{s['min_relative_score']} × final")
        ax.grid(alpha=0.3)
    left.set(xlabel=f"held-out {s['metric']} / final layer's", ylabel="splits",
             title=f"{s['splits']} calibration/report splits")
    right.set(xlabel="held-out layers saved", ylabel=f"held-out {s['metric']} / final layer's",
              title="one point per split")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {memory:.0f} GiB, {gpu}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.experiments.calibration_splits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="labelled data (GLUE task dir, CSV/TSV/JSONL)")
    p.add_argument("--split", default="dev")
    p.add_argument("--splits", type=int, default=100)
    p.add_argument("--calibration-fraction", type=float, default=0.5)
    p.add_argument("--max-drop", type=float, default=0.01)
    p.add_argument("--confidence", type=float, default=0.9)
    p.add_argument("--min-relative-score", type=float, default=0.99)
    p.add_argument("--tolerance", type=float, default=None, help="regression consistency risk (output units)")
    p.add_argument("--criterion", default=None, help="default: the checkpoint's")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="docs/results/calibration")
    p.add_argument("--name", default=None, help="file stem (default: <task>-<checkpoint directory name>)")
    args = p.parse_args(argv)

    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt.exit_config
    metric, examples = load_rows(ckpt, args.data, args.split, None, needs_labels=True)
    fitted = rule_rows(cfg.exit_rule.fitted if cfg.exit_rule else None, examples)  # never calibrate or report on them
    examples = examples.take(np.setdiff1d(np.arange(len(examples)), fitted).tolist())
    criterion = args.criterion or cfg.criterion
    rows = record_rows(ckpt, examples, metric, criterion, args.batch_size)
    chosen_by = methods(args.max_drop, args.confidence, args.min_relative_score, args.tolerance, cfg.regression)
    results = run_splits(rows, chosen_by, args.splits, args.calibration_fraction, args.tolerance)
    settings = {
        "checkpoint": args.checkpoint, "data": args.data, "split": args.split, "samples": len(rows),
        "metric": metric, "criterion": criterion, "rule_rows_left_out": len(fitted), "splits": args.splits,
        "calibration_fraction": args.calibration_fraction, "max_drop": args.max_drop,
        "confidence": args.confidence, "min_relative_score": args.min_relative_score, "tolerance": args.tolerance,
        "command": "python -m exitserve.experiments.calibration_splits "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    study = {"settings": settings, "summary": summarise(results, args.max_drop, args.min_relative_score),
             "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (args.name or f"{cfg.task}-{Path(args.checkpoint).resolve().name}")
    Path(f"{stem}.json").write_text(json.dumps(study, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(study))
    plot(study, Path(f"{stem}.png"))
    print(markdown(study))
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")


if __name__ == "__main__":
    main()
