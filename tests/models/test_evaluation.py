"""Evaluation report, plots, and the CLI around them (tiny model, real SST-2 rows); calibration: test_calibration."""

from __future__ import annotations

import json

import pytest

from exitserve.cli import main
from exitserve.models.checkpoint import save_checkpoint
from exitserve.models.criteria import ExitCriterion
from exitserve.models.encoding import encode
from exitserve.models.evaluation import exit_table
from exitserve.models.inference import record_all_layers, simulate_exits
from exitserve.models.rule_fitting import fit_rule
from tests.conftest import GLUE, TINY_LAYERS, make_exit_config, make_model, torch_backend

DATA = str(GLUE / "SST-2")


@pytest.fixture
def ckpt(tmp_path, tokenizer):
    return save_checkpoint(tmp_path / "ckpt", make_model(seed=5), tokenizer, make_exit_config())


def test_evaluate_cli_writes_json_and_plots(ckpt, tmp_path, capsys):
    out = tmp_path / "report" / "sst2.json"
    assert main(["evaluate", str(ckpt), "--data", DATA, "--max-samples", "64", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["metric"] == "accuracy" and report["samples"] == 64
    assert report["rows"]["rows"] == "all"  # this checkpoint was never calibrated on these rows
    assert [r["layer"] for r in report["per_layer"]] == list(range(1, TINY_LAYERS + 1))
    assert report["final_layer_score"] == report["per_layer"][-1]["score"]
    by_t = {r["threshold"]: r for r in report["sweep"]}
    assert by_t[1.0]["mean_exit_layer"] == TINY_LAYERS and by_t[1.0]["layers_saved"] == 0.0
    assert by_t[1.0]["score"] == report["final_layer_score"]
    assert by_t[0.0]["mean_exit_layer"] == 1.0
    assert by_t[0.0]["score"] == report["per_layer"][0]["score"]
    assert {"threshold", "score", "mean_exit_layer", "layers_saved"} <= set(report["sweep"][0])
    assert report["wall_clock"]["runs"][-1]["threshold"] == 1.0
    for name in ("sst2_layers.png", "sst2_tradeoff.png"):
        assert (out.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "layers_saved" in printed and "wall-clock" in printed


def test_cli_reports_a_broken_checkpoint_as_an_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope"), "--data", DATA]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("criterion", ["max-prob", "entropy", "patience", "lte", "learned"])
def test_the_threshold_table_exits_where_the_engine_would(tokenizer, sst2_texts, criterion):
    """One replay of the confidences serves every threshold: it must match replaying the engine's rule
    (`simulate_exits`) threshold by threshold, float32 comparisons included."""
    backend = torch_backend(make_model(use_lte=True, seed=3))
    recorded = record_all_layers(backend, encode(tokenizer, sst2_texts[:64], max_length=64))
    rule = fit_rule(recorded, False, None, {}) if criterion == "learned" else None
    crit = ExitCriterion(criterion, TINY_LAYERS, rule=rule)
    table = exit_table(recorded, crit)
    for j, threshold in enumerate(table.thresholds):
        sim = simulate_exits(recorded, crit, [threshold] * TINY_LAYERS)
        assert table.exit_layer[j].tolist() == sim.exit_layer.tolist(), threshold
        assert table.answers[j].tolist() == sim.logits.argmax(-1).astype(float).tolist()
