"""The scheduling policies as pure functions: no threads, no model."""

from __future__ import annotations

import math

import pytest

from exitserve.server.policy import LAYER, RUN, Limits, View, Waiting, cut_batch, make_policy


def w(key: int, tokens: int = 10, arrival: float = 0.0, since: float | None = None, layer: int = 0,
      deadline: float = math.inf) -> Waiting:
    return Waiting(key, tokens, arrival, deadline, arrival if since is None else since, layer)


def test_cut_batch_is_length_aware_and_within_the_limits():
    rows = [w(0, 5), w(1, 50), w(2, 6), w(3, 7), w(4, 49), w(5, 8)]
    batch = cut_batch(rows, rows[0], Limits(max_batch_size=3))
    assert [r.key for r in batch] == [0, 2, 3]  # the closest lengths to the anchor
    batch = cut_batch(rows, rows[1], Limits(max_batch_size=8, max_batch_tokens=100))
    assert {r.key for r in batch} == {1, 4} and 1 in [r.key for r in batch]  # 2 x 50 tokens: the budget
    assert cut_batch(rows, rows[3], Limits(max_batch_size=1)) == [rows[3]]


def test_fcfs_runs_a_batch_around_the_oldest_queued_input():
    queue = [w(0, 30, arrival=2.0), w(1, 12, arrival=1.0), w(2, 11, arrival=3.0), w(3, 90, arrival=4.0)]
    step = make_policy("fcfs").choose(View(5.0, queue), Limits(max_batch_size=2))
    assert step.mode == RUN and step.keys[0] in (1, 2) and set(step.keys) == {1, 2} and not step.audit


def test_edf_runs_the_earliest_deadline_first():
    queue = [w(0, 10, arrival=1.0, deadline=9.0), w(1, 100, arrival=2.0, deadline=3.0)]
    step = make_policy("edf").choose(View(2.5, queue), Limits(max_batch_size=1))
    assert step.keys == (1,)
    assert make_policy("fcfs").choose(View(2.5, queue), Limits(max_batch_size=1)).keys == (0,)


def test_slo_grows_a_batch_only_while_every_row_still_makes_its_deadline():
    cost = lambda tokens: 0.001 * sum(tokens)  # noqa: E731 - 1 ms per token
    queue = [w(i, 10, arrival=0.0, deadline=0.035) for i in range(6)]
    step = make_policy("slo", cost).choose(View(0.0, queue), Limits())
    assert len(step.keys) == 3  # 30 ms <= 35 ms; a 4th row would make it 40 ms
    late = [w(0, 10, arrival=0.0, deadline=0.001)]  # already lost: still run alone (admission sheds, not the policy)
    assert make_policy("slo", cost).choose(View(0.0, late), Limits()).keys == (0,)
    with pytest.raises(ValueError, match="needs a cost model"):
        make_policy("slo")


def test_audits_run_only_when_nothing_unanswered_waits():
    audits = [w(7, 10), w(8, 12)]
    fcfs = make_policy("fcfs")
    assert fcfs.choose(View(1.0, [w(0)], audits=audits), Limits()).keys == (0,)
    step = fcfs.choose(View(1.0, [], audits=audits), Limits())
    assert step.audit and step.mode == RUN and set(step.keys) == {7, 8}
    assert fcfs.choose(View(1.0, []), Limits()) is None
    layered = make_policy("layered")
    groups = [[], [w(3, layer=1)]]
    assert not layered.choose(View(1.0, [], groups, audits), Limits()).audit


def test_layered_advances_the_least_recently_advanced_group():
    queue = [w(0, since=5.0)]
    groups = [[], [w(1, arrival=0.0, since=3.0, layer=1)], [w(2, arrival=1.0, since=4.0, layer=2)]]
    step = make_policy("layered").choose(View(6.0, queue, groups), Limits())
    assert (step.mode, step.layer, step.keys) == (LAYER, 1, (1,))


def test_oldest_finishes_what_started():
    queue = [w(0, arrival=4.0, since=4.0)]
    groups = [[], [w(1, arrival=2.0, since=3.5, layer=1)], [w(2, arrival=1.0, since=5.0, layer=2)]]
    step = make_policy("oldest").choose(View(6.0, queue, groups), Limits())
    assert (step.layer, step.keys) == (2, (2,))  # the oldest request, though its group advanced most recently


def test_a_run_policy_finishes_samples_left_between_layers_first():
    groups = [[], [], [w(5, layer=2)]]
    step = make_policy("fcfs").choose(View(1.0, [w(0)], groups), Limits())
    assert (step.mode, step.layer, step.keys) == (LAYER, 2, (5,))


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown scheduling policy 'magic'"):
        make_policy("magic")
