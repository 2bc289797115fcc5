"""Task metrics, as the BERxiT reference code scores GLUE: accuracy (SST-2, RTE, QNLI), F1 and
accuracy (MRPC), Spearman and Pearson (STS-B), Matthews correlation (CoLA)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRICS = ("accuracy", "f1", "matthews", "spearman", "pearson")


def score(metric: str, predictions: Sequence[float], labels: Sequence[float]) -> float:
    """The headline metric, as a fraction (accuracy 0.91, not 91)."""
    preds, gold = np.asarray(predictions), np.asarray(labels)
    if metric == "accuracy":
        return float(accuracy_score(gold, preds))
    if metric == "f1":
        return float(f1_score(gold, preds))
    if metric == "matthews":
        return float(matthews_corrcoef(gold, preds))
    if metric in ("spearman", "pearson"):
        if np.ptp(preds) == 0:
            return 0.0  # a constant prediction has no correlation
        corr = spearmanr(preds, gold)[0] if metric == "spearman" else pearsonr(preds, gold)[0]
        return float(corr)
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def all_scores(metric: str, predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """The headline metric plus its usual companions (MRPC: accuracy; STS-B: Pearson)."""
    extra = {"f1": ["accuracy"], "spearman": ["pearson"], "pearson": ["spearman"]}.get(metric, [])
    return {m: score(m, predictions, labels) for m in [metric, *extra]}
