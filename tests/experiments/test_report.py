"""The experiment report: tables relative to Raw, the seed's findings checked, plots written."""

from __future__ import annotations

import json

from exitserve.experiments.report import findings, write_report


def report(task: str, backbone: str, strategy: str, scores: list[float], sweep: list[dict] | None = None) -> dict:
    return {"task": task, "backbone": backbone, "strategy": strategy, "metric": "accuracy",
            "num_layers": len(scores), "train_samples": 100, "samples": 100, "epochs": 2,
            "final_layer_score": scores[-1],
            "per_layer": [{"layer": k + 1, "score": s} for k, s in enumerate(scores)], "sweep": sweep or []}


def test_findings_report_whether_the_seed_holds():
    runs = {"two-stage": report("SST-2", "b", "two-stage", [0.5, 0.5, 0.8, 0.9]),
            "joint": report("SST-2", "b", "joint", [0.7, 0.8, 0.85, 0.9]),
            "alternating": report("SST-2", "b", "alternating", [0.7, 0.75, 0.84, 0.88])}
    early, late, noise = findings(runs, 4)
    assert early.endswith("holds") and "two-stage 0.5000" in early
    assert late.endswith("does not hold") and "alternating 0.8600, joint 0.8750" in late
    assert "100 dev samples" in noise and "about 0.030" in noise  # sqrt(0.9 * 0.1 / 100)


def test_report_tables_are_relative_to_raw_and_come_with_plots(tmp_path):
    runs = {
        "sst-2-small-raw": report("SST-2", "small", "raw", [0.5, 0.8]),
        "sst-2-small-alternating": report("SST-2", "small", "alternating", [0.6, 0.8],
                                          [{"threshold": 0.9, "score": 0.76}]),
        "sst-2-big-raw": report("SST-2", "big", "raw", [0.5, 0.6, 0.7, 0.8]),
    }
    timings = {
        "sst-2-big-raw": [{"threshold": 1.0, "seconds": 8.0, "mean_exit_layer": 4.0,
                           "speedup_vs_full": 1.0, "ideal_speedup": 1.0}],
        "sst-2-small-alternating": [
            {"threshold": 0.9, "seconds": 2.0, "mean_exit_layer": 1.0, "speedup_vs_full": 2.0, "ideal_speedup": 2.0},
            {"threshold": 1.0, "seconds": 4.0, "mean_exit_layer": 2.0, "speedup_vs_full": 1.0, "ideal_speedup": 1.0}],
    }
    for name, data in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    for name, rows in timings.items():
        (tmp_path / f"{name}-timing.json").write_text(json.dumps(
            {"run": name, "calibrated_threshold": 0.9, "batch_size": 32, "samples": 10, "runs": rows}))
    text = write_report(tmp_path).read_text()
    assert "| raw | – | 1.000 |" in text  # Raw trains no exits: its early layers are not shown
    assert "| alternating | 0.750 | 1.000 |" in text
    assert "| alternating | 1.000 | 0.750 | none |" in text  # its only sweep point keeps 0.76 / 0.8 < 0.99
    # alternating small at 0.9: 0.76 / Raw big 0.8; mean exit 1 of big's 4 layers; 2x vs on/off; 4x vs Raw big
    assert "| alternating small | 0.9 (calibrated 0.99) | 0.950 | 1.00 | 75.0% | 2.00× | 2.00× | 100% | 4.00× |" in text
    assert "| raw big | 1.0 | 1.000 | 4.00 | 0.0% | 1.00× | 1.00× | 100% | 1.00× |" in text
    for png in ("exp1_sst-2_small_n100.png", "exp1_sst-2_big_n100.png", "exp2_tradeoff.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert "(experiment 3 not run yet)" in text


def test_regression_frontier_puts_fixed_depth_beside_the_criteria(tmp_path):
    def sts(criterion: str, sweep: list[dict]) -> dict:
        data = report("STS-B", "small", "alternating", [0.2, 0.80, 0.85, 0.86], sweep)
        return {**data, "metric": "spearman", "criterion": criterion, "run": "sts-b-small"}

    def point(threshold: float, score: float, mean_exit: float) -> dict:
        return {"threshold": threshold, "score": score, "mean_exit_layer": mean_exit, "layers_saved": 1 - mean_exit / 4}

    lte = sts("lte", [point(0.3, 0.70, 1.5), point(0.5, 0.853, 2.5), point(0.6, 0.858, 2.8), point(1.0, 0.86, 4)])
    patience = sts("patience", [point(0.3, 0.855, 3.5), point(1.0, 0.86, 4)])
    for name, data in (("sts-b-small-lte", lte), ("sts-b-small-patience", patience)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    text = write_report(tmp_path).read_text()
    # target 0.99 x 0.86 = 0.8514: layer 3 (0.85) misses it, so the best fixed depth is layer 4 (0 % saved);
    # LTE's best passing point is threshold 0.5 (0.853 at mean exit 2.5 = 37.5 % saved)
    assert ("| sts-b-small | 0.8600 | layer 4: 0.8600, **0.0%** saved | threshold 0.5: 0.8530, **37.5%** saved | "
            "threshold 0.3: 0.8550, **12.5%** saved |") in text
    assert "| fixed depth | layer 2 | 0.8000 | 0.930 | 2.00 | 50.0% |" in text
    assert (tmp_path / "exp3_sts-b-small.png").stat().st_size > 1000
