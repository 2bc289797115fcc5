"""Risk control on synthetic losses with a known true risk: p-values, fixed-sequence testing, the guarantee."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exitserve.models.risk_control import (
    binomial_p_values,
    consistency_losses,
    hoeffding_bentkus_p_values,
    learn_then_test,
    quality_losses,
    risk_losses,
)

GRID = [1.0, *np.round(np.linspace(0.98, 0.0, 50), 3).tolist()]  # safest first, like the sweep grid
TRUE_RISK = np.linspace(0.0, 0.06, len(GRID))  # the risk grows as the threshold falls; 1.0 has none


def binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def test_binomial_p_value_is_the_exact_lower_tail():
    losses = np.zeros(100)
    losses[:3] = 1
    assert binomial_p_values(losses, 0.1)[0] == pytest.approx(binomial_cdf(3, 100, 0.1), rel=1e-9)
    assert binomial_p_values(losses, 0.1)[0] == pytest.approx(0.0078, abs=1e-4)  # a textbook value
    assert binomial_p_values(np.zeros(436), 0.01)[0] == pytest.approx(0.99**436)  # no loss at all
    with pytest.raises(ValueError, match="0/1"):
        binomial_p_values(np.full(10, 0.5), 0.1)


def test_hoeffding_bentkus_p_value():
    n, risk = 1000, 0.05
    losses = np.zeros(n)
    losses[:40] = 0.5  # mean 0.02, not 0/1
    kl = 0.02 * math.log(0.02 / risk) + 0.98 * math.log(0.98 / (1 - risk))
    expected = min(math.exp(-n * kl), math.e * binomial_cdf(20, n, risk))
    assert hoeffding_bentkus_p_values(losses, risk)[0] == pytest.approx(expected, rel=1e-9)
    assert hoeffding_bentkus_p_values(np.full(n, 0.06), risk)[0] == pytest.approx(1.0)  # above the bound
    zero = hoeffding_bentkus_p_values(np.zeros(n), risk)[0]
    assert zero == pytest.approx(min((1 - risk) ** n, math.e * (1 - risk) ** n))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        hoeffding_bentkus_p_values(np.full(10, 1.5), risk)


def nested_losses(rng: np.random.Generator, n: int) -> np.ndarray:
    """0/1 losses [T, n] whose true risk at GRID[j] is TRUE_RISK[j] (a sample lost at one threshold
    stays lost at every lower one, as with early exit)."""
    return (rng.random(n)[None, :] < TRUE_RISK[:, None]).astype(float)


def true_risk_of(threshold: float) -> float:
    return float(TRUE_RISK[GRID.index(threshold)])


def test_guarantee_holds_in_at_least_confidence_of_draws():
    rng = np.random.default_rng(0)
    max_risk, confidence, draws, n = 0.03, 0.9, 2000, 400
    chosen = [learn_then_test(GRID, nested_losses(rng, n), max_risk, confidence).threshold for _ in range(draws)]
    risks = np.array([true_risk_of(t) for t in chosen])
    violations = float(np.mean(risks > max_risk))
    # the promise; exactly, at most P(Binomial(400, 0.0312) <= 7) = 0.067 here (1 standard error: 0.006)
    assert violations <= 1 - confidence
    assert np.mean(np.array(chosen) < 1.0) > 0.95  # and it is not vacuous: it does exit early
    assert np.median(risks) > max_risk / 2

    # the same check catches a rule without the guarantee: the lowest threshold whose empirical risk fits
    naive = []
    for _ in range(500):
        ok = nested_losses(rng, n).mean(axis=1) <= max_risk
        naive.append(GRID[int(np.flatnonzero(ok).max())])
    assert np.mean([true_risk_of(t) > max_risk for t in naive]) > 1 - confidence


def test_guarantee_holds_for_bounded_losses_with_hoeffding_bentkus():
    rng = np.random.default_rng(1)
    max_risk, confidence, draws, n = 0.03, 0.9, 1000, 400
    chosen = []
    for _ in range(draws):
        losses = np.clip(2 * TRUE_RISK[:, None] * rng.random(n)[None, :], 0, 1)  # mean TRUE_RISK, in [0, 1]
        chosen.append(learn_then_test(GRID, losses, max_risk, confidence, "hoeffding-bentkus").threshold)
    risks = np.array([true_risk_of(t) for t in chosen])
    assert np.mean(risks > max_risk) <= 1 - confidence
    assert np.mean(risks > 0) > 0.95  # not vacuous (Hoeffding-Bentkus is conservative, but it exits early)


def test_a_lower_max_drop_never_gives_a_lower_threshold():
    rng = np.random.default_rng(2)
    for _ in range(50):
        losses = nested_losses(rng, 300)
        for kind, data in (("binomial", losses), ("hoeffding-bentkus", losses * rng.random(losses.shape))):
            chosen = [learn_then_test(GRID, data, eps, 0.9, kind).threshold for eps in (0.05, 0.03, 0.02, 0.01, 0.005)]
            assert chosen == sorted(chosen), (kind, chosen)


def test_fixed_sequence_stops_at_the_first_failure_and_falls_back_to_one():
    grid = [0.5, 1.0, 0.9, 0.7]  # any order: it is tested from the highest down
    n = 500
    losses = np.zeros((4, n))
    losses[3, :50] = 1  # 0.7 fails (risk 0.1); 0.5 would pass but comes after it
    result = learn_then_test(grid, losses, 0.05, 0.9)
    assert result.threshold == 0.9 and result.thresholds == [1.0, 0.9, 0.7, 0.5]
    assert (result.tested, result.certified) == (2, 1)
    assert [t["threshold"] for t in result.tests()] == [0.9, 0.7]
    assert result.tests()[1]["risk"] == pytest.approx(0.1) and result.tests()[1]["p_value"] > 0.1
    assert math.isnan(result.p_values[0])
    losses[2, :50] = 1  # now the first tested threshold fails too
    assert learn_then_test(grid, losses, 0.05, 0.9).threshold == 1.0
    assert learn_then_test(grid, np.zeros((4, 3)), 0.05, 0.9).threshold == 1.0  # too few samples to certify
    with pytest.raises(ValueError, match="max-drop"):
        learn_then_test(grid, losses, 0.0, 0.9)
    with pytest.raises(ValueError, match="confidence"):
        learn_then_test(grid, losses, 0.05, 1.0)


def test_losses():
    answers = np.array([[1, 0, 1, 0], [1, 1, 1, 1]])  # two thresholds x four samples
    final, labels = np.array([1, 1, 0, 0]), np.array([1, 1, 1, 0])
    assert quality_losses(answers, final, labels, False).tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]
    assert consistency_losses(answers, final, False).tolist() == [[0, 1, 1, 0], [0, 0, 1, 1]]
    values = np.array([[2.0, 3.0, 4.5]])
    final_v, gold = np.array([2.5, 3.0, 1.0]), np.array([2.0, 4.0, 0.0])
    # error change: |2-2|-|2.5-2| = -0.5 -> 0; |3-4|-|3-4| = 0; |4.5-0|-|1-0| = 3.5 -> 3.5/5
    assert quality_losses(values, final_v, gold, True, scale=5.0).tolist() == [[0.0, 0.0, pytest.approx(0.7)]]
    assert consistency_losses(values, final_v, True, tolerance=0.4).tolist() == [[1.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match="tolerance"):
        consistency_losses(values, final_v, True)
    with pytest.raises(ValueError, match="needs labels"):
        risk_losses("quality", answers, final, None, False)
