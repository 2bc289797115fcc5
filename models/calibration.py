"""`exitserve calibrate`: pick the default threshold from dev data and store it in the checkpoint.

The chosen threshold is the lowest one on the sweep grid such that the dev score at that threshold
AND at every higher threshold stays >= `min_relative_score` x the final layer's score. (Requiring it
of every higher threshold too keeps a lucky dip in the noisy score-vs-threshold curve from being
picked.) Threshold 1.0 (no early exit) always qualifies, so a threshold is always found.
"""

from __future__ import annotations

from datetime import date

from exitserve.models.backends import Backend
from exitserve.models.checkpoint import Checkpoint, ExitConfig
from exitserve.models.evaluation import evaluate


def choose_threshold(sweep_rows: list[dict], final_score: float, min_relative_score: float) -> dict:
    """The calibrated sweep row (see the module docstring)."""
    target = min_relative_score * final_score
    chosen = None
    for row in sorted(sweep_rows, key=lambda r: r["threshold"], reverse=True):
        if row["score"] < target and row["threshold"] < 1.0:
            break
        chosen = row
    assert chosen is not None  # threshold 1.0 is on the grid
    return chosen


def calibrate(
    checkpoint: Checkpoint, data: str, split: str = "dev", min_relative_score: float = 0.99,
    max_samples: int | None = None, backend: Backend | None = None,
) -> ExitConfig:
    """Calibrate on `backend` (default: the checkpoint's torch model), update the checkpoint's exit config
    on disk, and return it. A backend whose answers differ from the checkpoint's own (`calibration_key`:
    quantised weights) gets its threshold under calibration["variants"][key] (ExitConfig.threshold_for);
    otherwise the default threshold is set."""
    if not 0.0 < min_relative_score <= 1.0:
        raise ValueError("--min-relative-score must lie in (0, 1]")
    report = evaluate(checkpoint, data, split, max_samples=max_samples, timed_thresholds=(), backend=backend)
    row = choose_threshold(report["sweep"], report["final_layer_score"], min_relative_score)
    cfg = checkpoint.exit_config
    result = {
        "data": data,
        "split": split,
        "samples": report["samples"],
        "criterion": report["criterion"],
        "metric": report["metric"],
        "min_relative_score": min_relative_score,
        "threshold": row["threshold"],
        "score": row["score"],
        "final_layer_score": report["final_layer_score"],
        "relative_score": row["relative_score"],
        "mean_exit_layer": row["mean_exit_layer"],
        "layers_saved": row["layers_saved"],
        "date": date.today().isoformat(),
        "backend": report["wall_clock"]["backend"],
        "quantize": report["wall_clock"]["quantize"],
    }
    previous = cfg.calibration or {}
    variants = dict(previous.get("variants") or {})
    key = backend.calibration_key if backend is not None else None
    if key is None:
        cfg.default_threshold = row["threshold"]
        cfg.calibration = {**result, **({"variants": variants} if variants else {})}
    else:
        cfg.calibration = {**previous, "variants": {**variants, key: result}}
    cfg.save(checkpoint.path)
    return cfg
