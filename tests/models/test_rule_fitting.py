"""`exitserve fit-exit-rule` then `calibrate --criterion learned`, end to end on the tiny checkpoints:
unlabelled text in, a rule and a risk-controlled threshold out; the three kinds of rows never overlap."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from exitserve.cli import main
from exitserve.models.checkpoint import ExitConfig, load_checkpoint
from exitserve.models.data import load_texts
from exitserve.models.encoding import encode
from exitserve.models.holdout import calibration_rows, report_rows, rule_rows
from exitserve.models.inference import predict
from tests.conftest import GLUE, TINY_LAYERS

SST2 = str(GLUE / "SST-2")  # 200 dev rows
STSB = str(GLUE / "STS-B")


@pytest.fixture
def ckpt(tmp_path, tiny_checkpoint):
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


@pytest.fixture
def texts(tmp_path, sst2_texts):
    path = tmp_path / "traffic.txt"
    path.write_text("\n".join(sst2_texts) + "\n")
    return str(path)


def test_label_free_end_to_end(ckpt, texts, tokenizer, capsys):
    assert main(["fit-exit-rule", str(ckpt), "--data", texts, "--fit-fraction", "0.3"]) == 0
    assert "--criterion learned" in capsys.readouterr().out
    rule = ExitConfig.read(ckpt).exit_rule
    assert rule is not None and rule.fitted["rows"] == 60 and rule.fitted["split"] is None
    assert rule.fitted["target"] == "agreement with the final layer (no labels)"
    assert main(["calibrate", str(ckpt), "--data", texts, "--risk", "consistency", "--max-drop", "0.3",
                 "--criterion", "learned"]) == 0
    cfg = load_checkpoint(ckpt).exit_config
    record = cfg.calibration
    assert cfg.criterion == "learned" and cfg.default_threshold == record["threshold"] < 1.0
    assert record["rule"]["fitted"]["rows"] == 60 and record["metric"] is None  # no labels anywhere
    assert (record["samples"], record["calibration_samples"], record["report_samples"]) == (140, 70, 70)
    rows = load_texts(texts)
    fitted, chosen = rule_rows(rule.fitted, rows), calibration_rows(record, rows)
    reported = np.setdiff1d(np.arange(len(rows)), np.union1d(fitted, chosen))
    assert len(np.intersect1d(fitted, chosen)) == 0 and (len(fitted), len(chosen), len(reported)) == (60, 70, 70)
    kept, selection = report_rows(record, rows)
    assert kept.texts == [rows.texts[i] for i in reported] and "60 fitted the exit rule" in selection["note"]
    # what the checkpoint now serves is the rule at its threshold: the library's answers on the report rows
    # reproduce the calibration record's report (consistency risk and layers saved)
    criterion, thresholds = cfg.make_criterion(), cfg.thresholds()
    full = predict_rows(ckpt, tokenizer, kept.texts, [1.0] * TINY_LAYERS)
    served = predict_rows(ckpt, tokenizer, kept.texts, thresholds, criterion)
    assert np.mean([a.label_id != b.label_id for a, b in zip(served, full, strict=True)]) == pytest.approx(
        record["report"]["consistency_risk"])
    assert 1 - np.mean([p.exit_layer for p in served]) / TINY_LAYERS == pytest.approx(record["report"]["layers_saved"])


def predict_rows(ckpt, tokenizer, texts, thresholds, criterion=None):
    checkpoint = load_checkpoint(ckpt)
    from exitserve.models.backends import create_backend

    samples = encode(tokenizer, texts, max_length=checkpoint.exit_config.max_length)
    return predict(create_backend(checkpoint), criterion or checkpoint.exit_config.make_criterion("max-prob"), samples,
                   thresholds)


def test_refitting_the_rule_of_a_learned_checkpoint_resets_its_threshold(ckpt, tmp_path, sst2_texts):
    texts = tmp_path / "other.txt"
    texts.write_text("\n".join(sst2_texts[:100]) + "\n")  # not the rows calibration sees
    texts = str(texts)
    assert main(["fit-exit-rule", str(ckpt), "--data", texts]) == 0
    assert main(["calibrate", str(ckpt), "--data", SST2, "--max-drop", "0.3", "--criterion", "learned"]) == 0
    assert ExitConfig.read(ckpt).calibration["rule_rows"] is None  # fitted on other data: nothing left out
    assert main(["fit-exit-rule", str(ckpt), "--data", texts, "--seed", "1"]) == 0
    cfg = ExitConfig.read(ckpt)
    assert cfg.criterion == "learned" and cfg.default_threshold == 1.0 and cfg.calibration is None


def test_calibrate_on_the_rules_labelled_rows_leaves_them_out_and_evaluate_reports_on_the_rest(ckpt, capsys):
    assert main(["fit-exit-rule", str(ckpt), "--data", SST2, "--fit-fraction", "0.25"]) == 0
    assert main(["calibrate", str(ckpt), "--data", SST2, "--max-drop", "0.3", "--criterion", "learned"]) == 0
    record = ExitConfig.read(ckpt).calibration
    assert record["rule_rows"]["fit_fraction"] == 0.25 and record["samples"] == 150
    capsys.readouterr()
    assert main(["evaluate", str(ckpt), "--data", SST2, "--no-timing"]) == 0
    out = capsys.readouterr().out
    assert "report rows only: 75 of 200 (75 chose the calibrated threshold, 50 fitted the exit rule" in out
    assert f"exit rule: per-layer-logistic on gap, summed, previous, same, streak, lte; fitted on 50 rows of {SST2}" \
        in out


def test_a_regression_rule_needs_a_tolerance(tmp_path, tiny_pair_checkpoint, capsys):
    ckpt = shutil.copytree(tiny_pair_checkpoint, tmp_path / "pair")
    assert main(["fit-exit-rule", str(ckpt), "--data", STSB]) == 2
    assert "--tolerance" in capsys.readouterr().err
    assert main(["fit-exit-rule", str(ckpt), "--data", STSB, "--tolerance", "0.5"]) == 0
    rule = ExitConfig.read(ckpt).exit_rule
    assert rule.regression and rule.tolerance == 0.5 and len(rule.weights) == TINY_LAYERS - 1
    assert main(["calibrate", str(ckpt), "--data", STSB, "--risk", "consistency", "--tolerance", "0.5",
                 "--max-drop", "0.3", "--criterion", "learned"]) == 0
    assert json.loads((ckpt / "exit_config.json").read_text())["criterion"] == "learned"
