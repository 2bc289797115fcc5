"""Risk control for the exit threshold: Learn-then-Test with fixed-sequence testing (numpy/scipy only).

The question a threshold must answer: "on new inputs from the same distribution, how much worse is
the early-exit model than running every layer?" Each calibration sample i gets a loss
l_i(lambda) in [0, 1] at every threshold lambda of a grid; the risk R(lambda) is its expectation.

Two risks (see `risk_losses`):

  quality      needs labels. Classification: 1 when the exit's answer is wrong where the final
               layer's is right, else 0. Its mean bounds the accuracy drop against the final layer
               (acc_final - acc_exit <= R). Regression: the per-sample error increase against the
               final layer, clip((|exit - y| - |final - y|) / scale, 0, 1), with `scale` the label
               range (max - min of the calibration labels; STS-B: 5). Its mean bounds the increase
               of the mean absolute error, as a fraction of the label range, not the drop of a
               rank correlation such as Spearman.
  consistency  needs no labels. Classification: 1 when the exit's answer differs from the final
               layer's. Regression: 1 when |exit - final| > tolerance (in the model's output units).
               It bounds quality too: where the answers agree nothing can get worse.

Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021; used for early exit by CALM,
Schuster et al. 2022, and "Fast yet Safe", arXiv 2405.20915): for each lambda test the null
"R(lambda) > max_risk" with a valid p-value, p = P(Binomial(n, max_risk) <= n R_hat) for 0/1
losses, Hoeffding-Bentkus for bounded ones. Walk the grid from the safest threshold (1.0: every
layer runs, loss 0 by construction) towards the fastest, rejecting while p <= 1 - confidence, and
stop at the first failure. With probability >= confidence over the draw of the calibration set,
every rejected threshold has R <= max_risk at once; the fastest of them is chosen (1.0 if none).
The guarantee is marginal over inputs drawn from the calibration distribution; drift breaks it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import xlogy
from scipy.stats import binom

RISKS = ("quality", "consistency")
BINOMIAL = "binomial"
HOEFFDING_BENTKUS = "hoeffding-bentkus"
P_VALUES = (BINOMIAL, HOEFFDING_BENTKUS)


def quality_losses(
    exit_answers: np.ndarray, final: np.ndarray, labels: np.ndarray, regression: bool, scale: float | None = None
) -> np.ndarray:
    """Per-sample quality loss `[T, N]` from the answers `[T, N]` at each threshold (module docstring)."""
    exit_answers, final, labels = np.asarray(exit_answers), np.asarray(final), np.asarray(labels)
    if regression:
        if scale is None or not scale > 0:
            raise ValueError("the regression quality risk needs a positive label range (scale)")
        increase = np.abs(exit_answers - labels) - np.abs(final - labels)
        return np.clip(increase / scale, 0.0, 1.0)
    return ((exit_answers != labels) & (final == labels)).astype(float)


def consistency_losses(
    exit_answers: np.ndarray, final: np.ndarray, regression: bool, tolerance: float | None = None
) -> np.ndarray:
    """Per-sample consistency loss `[T, N]`: the exit disagrees with the final layer (no labels)."""
    exit_answers, final = np.asarray(exit_answers), np.asarray(final)
    if regression:
        if tolerance is None or tolerance < 0:
            raise ValueError("the regression consistency risk needs a tolerance >= 0 (in output units)")
        return (np.abs(exit_answers - final) > tolerance).astype(float)
    return (exit_answers != final).astype(float)


def risk_losses(
    risk: str,
    exit_answers: np.ndarray,
    final: np.ndarray,
    labels: np.ndarray | None,
    regression: bool,
    tolerance: float | None = None,
    scale: float | None = None,
) -> np.ndarray:
    """The losses of `risk` (one of RISKS)."""
    if risk == "quality":
        if labels is None:
            raise ValueError("the quality risk needs labels; use the consistency risk for unlabelled text")
        return quality_losses(exit_answers, final, labels, regression, scale)
    if risk == "consistency":
        return consistency_losses(exit_answers, final, regression, tolerance)
    raise ValueError(f"unknown risk {risk!r}; choose one of {', '.join(RISKS)}")


def p_value_kind(risk: str, regression: bool) -> str:
    """Exact binomial for 0/1 losses; Hoeffding-Bentkus for the bounded regression quality loss."""
    return HOEFFDING_BENTKUS if risk == "quality" and regression else BINOMIAL


def binomial_p_values(losses: np.ndarray, max_risk: float) -> np.ndarray:
    """P(Binomial(n, max_risk) <= sum of losses), per row of 0/1 losses `[T, N]` (or `[N]`)."""
    losses = np.atleast_2d(losses)
    if not np.isin(losses, (0.0, 1.0)).all():
        raise ValueError("the binomial p-value needs 0/1 losses; use Hoeffding-Bentkus for bounded ones")
    return binom.cdf(losses.sum(axis=1), losses.shape[1], max_risk)


def _kl_bernoulli(a: np.ndarray, b: float) -> np.ndarray:
    """h1(a, b) = a log(a/b) + (1 - a) log((1 - a)/(1 - b)), the Bernoulli KL divergence."""
    return xlogy(a, a / b) + xlogy(1.0 - a, (1.0 - a) / (1.0 - b))


def hoeffding_bentkus_p_values(losses: np.ndarray, max_risk: float) -> np.ndarray:
    """Hoeffding-Bentkus p-values (Bates et al. 2021, RCPS) per row of losses in [0, 1] `[T, N]`:
    min(exp(-n h1(min(R_hat, max_risk), max_risk)), e P(Binomial(n, max_risk) <= ceil(n R_hat)))."""
    losses = np.atleast_2d(losses)
    if losses.min(initial=0.0) < 0 or losses.max(initial=0.0) > 1:
        raise ValueError("Hoeffding-Bentkus needs losses in [0, 1]")
    n = losses.shape[1]
    mean = losses.mean(axis=1)
    hoeffding = np.exp(-n * _kl_bernoulli(np.minimum(mean, max_risk), max_risk))
    # the 1e-9 keeps a float sum such as 3.0000000001 from rounding up to 4
    bentkus = math.e * binom.cdf(np.ceil(n * mean - 1e-9), n, max_risk)
    return np.minimum(hoeffding, bentkus)


@dataclass
class RiskControlResult:
    threshold: float  # the fastest certified threshold, or 1.0
    thresholds: list[float]  # the grid, safest (highest) first
    risks: list[float]  # the empirical risk at each grid threshold
    p_values: list[float]  # at each grid threshold (1.0 itself is not tested: nan)
    tested: int  # how many thresholds fixed-sequence testing looked at (the last one failed unless all passed)
    certified: int  # how many of them were certified (rejected the null)
    p_value: str  # binomial | hoeffding-bentkus

    def tests(self) -> list[dict]:
        """The thresholds fixed-sequence testing looked at, in order, for the record."""
        rows = zip(self.thresholds, self.risks, self.p_values, strict=True)
        tested = [(t, r, p) for t, r, p in rows if t < 1.0][: self.tested]
        return [{"threshold": t, "risk": r, "p_value": p} for t, r, p in tested]


def learn_then_test(
    thresholds: Sequence[float],
    losses: np.ndarray,
    max_risk: float,
    confidence: float,
    p_value: str = BINOMIAL,
) -> RiskControlResult:
    """The fastest threshold certified to have risk <= `max_risk` with probability >= `confidence`.

    `losses[j, i]` is sample i's loss at `thresholds[j]`; a lower threshold exits earlier. The grid
    is tested from the highest threshold down (fixed-sequence testing); 1.0 is never tested and is
    returned when nothing else is certified."""
    if not 0.0 < max_risk < 1.0:
        raise ValueError("the maximum risk (--max-drop) must lie in (0, 1)")
    if not 0.0 < confidence < 1.0:
        raise ValueError("--confidence must lie in (0, 1)")
    if p_value not in P_VALUES:
        raise ValueError(f"unknown p-value {p_value!r}; choose one of {', '.join(P_VALUES)}")
    losses = np.atleast_2d(np.asarray(losses, dtype=float))
    if losses.shape[0] != len(thresholds) or losses.shape[1] == 0:
        raise ValueError(f"losses must be [{len(thresholds)} thresholds, n >= 1 samples], got {losses.shape}")
    order = np.argsort(-np.asarray(thresholds, dtype=float), kind="stable")
    grid = [float(thresholds[j]) for j in order]
    losses = losses[order]
    compute = binomial_p_values if p_value == BINOMIAL else hoeffding_bentkus_p_values
    p_values = np.where(np.asarray(grid) < 1.0, compute(losses, max_risk), np.nan)
    chosen, tested, certified = 1.0, 0, 0
    for threshold, p in zip(grid, p_values, strict=True):
        if threshold >= 1.0:
            continue
        tested += 1
        if p > 1.0 - confidence:
            break
        certified += 1
        chosen = threshold
    return RiskControlResult(
        chosen, grid, losses.mean(axis=1).tolist(), p_values.tolist(), tested, certified, p_value
    )
