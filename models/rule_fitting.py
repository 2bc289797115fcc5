"""`exitserve fit-exit-rule`: fit the learned exit rule (models/exit_rule.py) on text, without labels.

One recorded pass over the rule's rows gives every exit's output; the rule's own step replays them
layer by layer (the same code that serves, so fitting and serving cannot disagree on a feature), and
each layer k < L gets a logistic regression whose target is "exit k's answer equals the final layer's"
(regression: within `tolerance` of it) -- labels are never read. The rows are a seeded `fraction` of
the data given; they are recorded in the rule (models/holdout.py), so `exitserve calibrate` on the
same data leaves them out, and `evaluate` reports on rows that neither fitted the rule nor chose the
threshold.

A rule refitted on a checkpoint whose criterion is `learned` invalidates its threshold: the threshold
is reset to 1.0 (every layer runs) until `exitserve calibrate` chooses a new one.
"""

from __future__ import annotations

from datetime import date

import numpy as np

from exitserve.models.answers import answers
from exitserve.models.backends import Backend, create_backend
from exitserve.models.checkpoint import Checkpoint, ExitConfig
from exitserve.models.data import ColumnOptions
from exitserve.models.early_exit import AllExits
from exitserve.models.encoding import encode
from exitserve.models.evaluation import record_outputs
from exitserve.models.exit_rule import ExitRule, feature_names, initial_memory, rule_features
from exitserve.models.holdout import rule_selection, split_rows

REGULARISATION = 1.0  # the inverse L2 strength of each layer's logistic regression (scikit-learn's C)


def agreement(recorded: AllExits, regression: bool, tolerance: float | None) -> np.ndarray:
    """`[L, N]` booleans: each exit's answer is the final layer's (regression: within `tolerance`)."""
    values = answers(recorded.logits, regression)
    if regression:
        return np.abs(values - values[-1]) <= tolerance
    return values == values[-1]


def replay_features(recorded: AllExits, regression: bool, tolerance: float | None) -> np.ndarray:
    """Every layer's rule features for every row, `[L, N, F + 1]`, from one recorded pass."""
    logits = recorded.logits
    num_layers, rows, outputs = logits.shape
    memory = initial_memory(rows, outputs, regression)
    out = []
    for k in range(num_layers):
        lte = recorded.lte[k] if recorded.lte is not None else None
        x, memory = rule_features(logits[k], lte, memory, num_layers, regression, tolerance)
        out.append(x)
    return np.stack(out)


def fit_layer(x: np.ndarray, target: np.ndarray) -> tuple[list[float], float]:
    """One layer's logistic regression (weights, bias) on unscaled features; a layer whose rows all
    agree (or all disagree) gets the smoothed rate as a constant."""
    if target.all() or not target.any():
        rate = (target.sum() + 0.5) / (len(target) + 1.0)
        return [0.0] * x.shape[1], float(np.log(rate / (1.0 - rate)))
    from sklearn.linear_model import LogisticRegression

    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    model = LogisticRegression(C=REGULARISATION, max_iter=2000).fit((x - mean) / scale, target)
    weights = model.coef_[0] / scale
    return weights.tolist(), float(model.intercept_[0] - (weights * mean).sum())


def fit_rule(recorded: AllExits, regression: bool, tolerance: float | None, fitted: dict) -> ExitRule:
    """A rule fitted on the recorded outputs of its rows (the bias column of the features is the intercept)."""
    x = replay_features(recorded, regression, tolerance)[..., :-1]
    target = agreement(recorded, regression, tolerance)
    layers = [fit_layer(x[k], target[k]) for k in range(x.shape[0] - 1)]
    num_layers, _, outputs = recorded.logits.shape
    return ExitRule(
        task_type="regression" if regression else "classification", num_layers=num_layers, num_outputs=outputs,
        features=list(feature_names(regression)), weights=[w for w, _ in layers], bias=[b for _, b in layers],
        tolerance=tolerance,
        fitted={**fitted, "agreement_per_layer": target.mean(axis=1).round(4).tolist()},
    )


def fit_exit_rule(
    checkpoint: Checkpoint,
    data: str,
    split_name: str = "dev",
    fraction: float = 0.25,
    seed: int = 0,
    tolerance: float | None = None,
    columns: ColumnOptions | None = None,
    batch_size: int = 32,
    backend: Backend | None = None,
) -> ExitConfig:
    """Fit the rule on a seeded `fraction` of the rows (labels, if any, unused), store it in the
    checkpoint, and return the updated exit config."""
    from exitserve.models.calibration import load_rows

    cfg = checkpoint.exit_config
    if cfg.regression and (tolerance is None or tolerance <= 0):
        raise ValueError("a regression model's rule needs --tolerance > 0: how far (in output units) an exit "
                         "may be from the final layer and still count as the same answer")
    if not cfg.regression and tolerance is not None:
        raise ValueError("--tolerance is for regression models; a classifier's exit agrees or it does not")
    backend = backend or create_backend(checkpoint)
    _, examples = load_rows(checkpoint, data, split_name, columns, needs_labels=False)
    rows, _ = split_rows(len(examples), fraction, seed)
    picked = examples.take(rows.tolist())
    samples = encode(checkpoint.tokenizer, picked.texts, picked.pairs, cfg.max_length)
    fitted = {
        "data": data, "split": None if data.endswith(".txt") else split_name,
        **rule_selection(examples, fraction, seed),
        "rows": len(rows), "target": "agreement with the final layer (no labels)", "backend": backend.name,
        "date": date.today().isoformat(),
    }
    cfg.exit_rule = fit_rule(record_outputs(backend, samples, batch_size), cfg.regression, tolerance, fitted)
    if cfg.criterion == "learned":  # the old threshold belongs to the old rule
        cfg.default_threshold, cfg.calibration = 1.0, None
    cfg.save(checkpoint.path)
    return cfg
