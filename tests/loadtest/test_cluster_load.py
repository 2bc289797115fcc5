"""What a load timeline shows (loadtest/cluster_load.py), on made-up answers: counts, the ok-rate per
second, when it recovered after an event, and what counts as the same answer."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install '.[ray]')")

from exitserve.loadtest.cluster_load import Answer, counts, parsed, recovered_after, same_answer, throughput


def steady(rate: int, start: float, end: float, **fields) -> list[Answer]:
    """`rate` ok answers per second completed between `start` and `end`."""
    n = int((end - start) * rate)
    return [Answer(start + i / rate, start + (i + 0.5) / rate, 200, "ok", **fields) for i in range(n)]


def test_counts_split_verdicts_and_name_only_the_failed_statuses():
    answers = [*steady(2, 0, 2, model="v1"), Answer(0, 1, 429, "failed"), Answer(0, 1, 0, "failed"),
               Answer(0, 1, 200, "wrong", model="v9"), Answer(0, 1, 200, "ok", model="v2", retries=1)]
    c = counts(answers)
    assert (c["requests"], c["ok"], c["wrong"], c["failed"], c["failed_pct"]) == (8, 5, 1, 2, 25.0)
    assert c["statuses"] == {"429": 1, "0": 1} and c["retried"] == 1 and c["models"] == {"v1": 4, "v2": 1}


def test_recovery_is_the_first_run_of_seconds_back_near_the_rate_before():
    # 10/s until the event at t=10, nothing for 3 s, 5/s (below 80 %) for 2 s, then 9/s again
    answers = steady(10, 0, 10) + steady(5, 13, 15) + steady(9, 15, 25)
    assert [r for t, r in throughput(answers)][8:16] == [10, 10, 0, 0, 0, 5, 5, 9]
    assert recovered_after(answers, event=10, baseline_from=2) == (10, 5.0)
    assert recovered_after(steady(10, 0, 10) + steady(5, 10, 20), event=10, baseline_from=2) == (10, None)


def test_the_same_answer_allows_float_rounding_only():
    want = {"prediction": "positive", "exit_layer": 2, "confidence": 0.9}
    assert same_answer({**want, "confidence": 0.90005}, want)
    assert not same_answer({**want, "confidence": 0.91}, want)
    assert not same_answer({**want, "exit_layer": 3}, want)
    assert not same_answer(parsed(b"not json"), want) and not same_answer(parsed(b"[1]"), want)
