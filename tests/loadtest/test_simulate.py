"""The scheduler simulator: its cost model's arithmetic, its clock, and that it runs the real policies."""

from __future__ import annotations

import random

import pytest

from exitserve.loadtest.scheduling import compare
from exitserve.loadtest.simulate import StepModel, arrivals, capacity, run_load, simulate
from exitserve.server.policy import Limits

MODEL = StepModel(run=(0.001, 1e-5, 0.0), layer=(0.0005, 1e-5, 0.0))  # seconds: a + b x token-layers


def test_a_run_step_costs_the_compacted_token_layers():
    # rows (tokens, exit layer): layer 1 runs 3 rows of width 30, layer 2 two rows of width 30, layer 3 one of 10
    assert StepModel.terms([(10, 3), (30, 2), (20, 1)]) == (3 * 30 + 2 * 30 + 1 * 10, 3 * 900 + 2 * 900 + 100)
    assert MODEL.run_seconds([(10, 3), (30, 2), (20, 1)]) == pytest.approx(0.001 + 1e-5 * 160)
    assert MODEL.layer_seconds([10, 30]) == pytest.approx(0.0005 + 1e-5 * 60)


def test_alone_an_input_costs_its_own_step_and_the_overhead():
    workload = [(20, 3)]
    model = StepModel(MODEL.run, MODEL.layer, overhead=0.002)
    fcfs = run_load("fcfs", model, workload, Limits(), 6, rate=1.0, load=0.01, seconds=200)
    assert fcfs.summary()["p50_ms"] == pytest.approx((0.001 + 1e-5 * 60 + 0.002) * 1000)
    layered = run_load("layered", model, workload, Limits(), 6, rate=1.0, load=0.01, seconds=200)
    assert layered.summary()["p50_ms"] == pytest.approx((3 * (0.0005 + 1e-5 * 20) + 0.002) * 1000)


def test_closed_loop_capacity_of_full_batches():
    workload = [(10, 2)]  # every input: 10 tokens, exits at layer 2
    cap = capacity("fcfs", MODEL, workload, Limits(max_batch_size=32), 6, seconds=10)
    assert cap == pytest.approx(32 / MODEL.run_seconds([(10, 2)] * 32), rel=0.02)


def test_layer_steps_answer_each_input_at_its_exit_layer():
    workload = [(10, 1), (10, 4)]
    samples, _ = simulate("layered", MODEL, workload, [0.0] * 20, Limits(), 6, seed=1)
    assert all(s.finished is not None for s in samples)
    easy = [s.finished for s in samples if s.exit_layer == 1]
    hard = [s.finished for s in samples if s.exit_layer == 4]
    assert max(easy) < min(hard)  # all arrived together: the easy ones leave after layer 1


def test_poisson_and_bursty_arrivals_keep_the_rate():
    rng = random.Random(0)
    assert len(arrivals(100.0, 100.0, False, rng)) == pytest.approx(10_000, rel=0.05)
    bursty = arrivals(100.0, 100.0, True, rng)
    assert len(bursty) == pytest.approx(10_000, rel=0.1) and len(set(bursty)) < len(bursty) / 2


def test_compare_runs_every_policy_on_the_same_traffic():
    costs = {"run": list(MODEL.run), "layer": list(MODEL.layer), "num_layers": 6,
             "workload": [[12, 1], [25, 2], [40, 6], [18, 3]]}
    report = compare(costs, [0.5], ["fcfs", "layered"], 20.0, Limits(), False, 3.0)
    assert {r["policy"] for r in report["results"]} == {"fcfs", "layered"}
    rates = {r["rate_rps"] for r in report["results"]}
    assert len(rates) == 1  # the same arrival rate for both
    for r in report["results"]:
        assert r["throughput_rps"] == pytest.approx(r["rate_rps"], rel=0.1) and 0 <= r["within_slo"] <= 1
        assert len(r["cdf_ms"]) == 99
