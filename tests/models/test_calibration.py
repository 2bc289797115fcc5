"""`exitserve calibrate` end to end on the tiny checkpoints (both methods, both risks, text files), the
calibration record, the calibration/report split, and `evaluate` reporting on the report rows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from exitserve.cli import main
from exitserve.models.calibration import RiskMethod, choose_threshold, load_rows, record_rows, split
from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.data import load_examples
from exitserve.models.exit_config import ExitConfig
from exitserve.models.holdout import calibration_rows, fingerprint, split_rows
from tests.conftest import GLUE, TINY_LAYERS

SST2 = str(GLUE / "SST-2")  # 200 dev rows
STSB = str(GLUE / "STS-B")  # 100 dev pairs
CONFIDENCE = 0.9


@pytest.fixture
def ckpt(tmp_path, tiny_checkpoint):
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


@pytest.fixture
def pair_ckpt(tmp_path, tiny_pair_checkpoint):
    return shutil.copytree(tiny_pair_checkpoint, tmp_path / "pair-ckpt")


def calibrate(ckpt, *args: str) -> dict:
    assert main(["calibrate", str(ckpt), *args]) == 0
    cfg = ExitConfig.read(ckpt)
    assert cfg.default_threshold == cfg.calibration["threshold"]
    return cfg.calibration


def check_fixed_sequence(record: dict) -> None:
    """The tests it recorded: every certified one passed, the one after them failed, and the
    threshold is the last certified one."""
    tests, certified = record["tests"], record["certified_thresholds"]
    assert all(t["p_value"] <= 1 - record["confidence"] for t in tests[:certified])
    assert all(t["p_value"] > 1 - record["confidence"] for t in tests[certified:])
    assert len(tests) - certified <= 1
    assert [t["threshold"] for t in tests] == sorted((t["threshold"] for t in tests), reverse=True)
    assert record["threshold"] == (tests[certified - 1]["threshold"] if certified else 1.0)


def test_risk_quality_on_classification(ckpt, capsys):
    record = calibrate(ckpt, "--data", SST2, "--max-drop", "0.3")
    assert json.loads(capsys.readouterr().out)["threshold"] == record["threshold"]
    assert {k: record[k] for k in ("method", "risk", "max_drop", "confidence", "p_value", "split", "seed")} == {
        "method": "risk", "risk": "quality", "max_drop": 0.3, "confidence": CONFIDENCE, "p_value": "binomial",
        "split": "dev", "seed": 0}
    assert record["calibration_fraction"] == 0.5 and record["data"] == SST2 and record["date"]
    assert (record["samples"], record["calibration_samples"], record["report_samples"]) == (200, 100, 100)
    check_fixed_sequence(record)
    assert record["threshold"] < 1.0  # a 30-point budget certifies something even for a random model
    chosen = record["tests"][record["certified_thresholds"] - 1]
    assert record["calibration_rows"]["quality_risk"] == pytest.approx(chosen["risk"])
    report = record["report"]
    assert report["samples"] == 100 and 0.0 < report["layers_saved"] < 1.0
    assert report["drop"] == pytest.approx(report["final_layer_score"] - report["score"])
    assert report["relative_score"] == pytest.approx(report["score"] / report["final_layer_score"])
    assert report["mean_exit_layer"] == pytest.approx(TINY_LAYERS * (1 - report["layers_saved"]))
    assert 0.0 <= report["quality_risk"] <= report["consistency_risk"] <= 1.0
    assert load_checkpoint(ckpt).exit_config.thresholds() == [record["threshold"]] * TINY_LAYERS


def test_a_lower_max_drop_never_gives_a_lower_threshold(tiny_checkpoint, tiny_pair_checkpoint):
    for path, data in ((tiny_checkpoint, SST2), (tiny_pair_checkpoint, STSB)):
        checkpoint = load_checkpoint(path)
        metric, examples = load_rows(checkpoint, data, "dev", None, needs_labels=True)
        rows = record_rows(checkpoint, examples, metric)
        for seed in range(5):
            chosen, _ = split(rows, *split_rows(len(rows), 0.5, seed))
            for risk, tolerance in (("quality", None), ("consistency", 0.2)):
                thresholds = [RiskMethod(risk, drop, 0.9, tolerance).choose(chosen).threshold
                              for drop in (0.5, 0.4, 0.3, 0.2, 0.1, 0.05)]
                assert thresholds == sorted(thresholds), (path.name, seed, risk, thresholds)
                assert thresholds[0] < thresholds[-1]


def test_point_method_is_recorded_as_such(ckpt):
    record = calibrate(ckpt, "--data", SST2, "--method", "point", "--min-relative-score", "0.95", "--seed", "3")
    assert record["method"] == "point" and record["min_relative_score"] == 0.95 and "tests" not in record
    on_calibration = record["calibration_rows"]
    assert on_calibration["score"] >= 0.95 * on_calibration["final_layer_score"]
    assert record["seed"] == 3 and record["report"]["samples"] == 100


def test_choose_threshold_is_the_lowest_that_stays_above_target():
    rows = [
        {"threshold": 0.5, "score": 0.80},
        {"threshold": 0.6, "score": 0.90},  # a lucky dip above target, but 0.7 falls below
        {"threshold": 0.7, "score": 0.85},
        {"threshold": 0.8, "score": 0.895},
        {"threshold": 0.9, "score": 0.91},
        {"threshold": 1.0, "score": 0.90},
    ]
    assert choose_threshold(rows, final_score=0.90, min_relative_score=0.99)["threshold"] == 0.8
    assert choose_threshold(rows, final_score=0.90, min_relative_score=1.0)["threshold"] == 0.9
    assert choose_threshold(rows, final_score=2.0, min_relative_score=0.99)["threshold"] == 1.0


def test_risk_quality_on_regression_uses_hoeffding_bentkus(pair_ckpt):
    record = calibrate(pair_ckpt, "--data", STSB, "--max-drop", "0.2", "--calibration-fraction", "0.6")
    assert record["p_value"] == "hoeffding-bentkus" and record["metric"] == "spearman"
    assert (record["calibration_samples"], record["report_samples"]) == (60, 40)
    _, rows = load_examples(STSB, "dev")
    cal, _ = split_rows(100, 0.6, 0)
    assert record["loss_scale"] == pytest.approx(np.ptp(np.asarray(rows.labels)[cal]))
    check_fixed_sequence(record)
    assert "consistency_risk" not in record["report"]  # no tolerance given: not defined for regression
    assert 0.0 <= record["report"]["quality_risk"] <= 1.0 and "score" in record["report"]


def test_consistency_on_text_files_needs_no_labels(ckpt, pair_ckpt, tmp_path, sst2_texts, capsys):
    texts = tmp_path / "traffic.txt"
    texts.write_text("\n".join(sst2_texts[:120]) + "\n")
    record = calibrate(ckpt, "--data", str(texts), "--risk", "consistency", "--max-drop", "0.3")
    assert (record["risk"], record["split"], record["metric"], record["p_value"]) == (
        "consistency", None, None, "binomial")
    assert (record["calibration_samples"], record["report_samples"]) == (60, 60)
    assert "score" not in record["report"] and 0.0 <= record["report"]["consistency_risk"] <= 1.0
    check_fixed_sequence(record)

    _, pairs = load_examples(STSB, "dev")
    pair_file = tmp_path / "pairs.txt"
    pair_file.write_text("\n".join(f"{a}\t{b}" for a, b in zip(pairs.texts, pairs.pairs, strict=True)) + "\n")
    assert main(["calibrate", str(pair_ckpt), "--data", str(pair_file), "--risk", "consistency"]) == 2
    assert "--tolerance" in capsys.readouterr().err
    record = calibrate(pair_ckpt, "--data", str(pair_file), "--risk", "consistency", "--tolerance", "0.5",
                       "--max-drop", "0.3")
    assert record["tolerance"] == 0.5 and record["report"]["samples"] == 50
    check_fixed_sequence(record)


@pytest.mark.parametrize("args, message", [
    (["--data", "TEXTS", "--risk", "quality"], "needs labels"),
    (["--data", "TEXTS", "--method", "point"], "needs labels"),
    (["--data", SST2, "--min-relative-score", "0.9"], "--min-relative-score applies to --method point"),
    (["--data", SST2, "--method", "point", "--max-drop", "0.05"], "--max-drop applies to --method risk"),
    (["--data", SST2, "--max-drop", "1.5"], "--max-drop must lie in (0, 1)"),
    (["--data", SST2, "--confidence", "1"], "--confidence must lie in (0, 1)"),
    (["--data", SST2, "--calibration-fraction", "0"], "--calibration-fraction must lie in (0, 1]"),
])
def test_cli_errors_are_one_line(ckpt, tmp_path, sst2_texts, capsys, args, message):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(sst2_texts[:20]) + "\n")
    assert main(["calibrate", str(ckpt), *[str(texts) if a == "TEXTS" else a for a in args]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("exitserve calibrate: error:")


def test_split_rows_and_calibration_rows():
    cal, rep = split_rows(101, 0.5, seed=4)
    assert len(cal) == 50 and len(rep) == 51 and not set(cal) & set(rep) and set(cal) | set(rep) == set(range(101))
    assert (split_rows(101, 0.5, seed=4)[0] == cal).all() and not (split_rows(101, 0.5, seed=5)[0] == cal).all()
    assert len(split_rows(10, 1.0, 0)[1]) == 0
    _, rows = load_examples(SST2, "dev")
    record = {"data_fingerprint": fingerprint(rows), "max_samples": 40, "calibration_fraction": 0.25, "seed": 1}
    chosen = calibration_rows(record, rows)
    assert len(chosen) == 10 and chosen.max() < 200
    assert calibration_rows({**record, "data_fingerprint": "other"}, rows) is None
    assert calibration_rows(None, rows) is None


def test_evaluate_reports_on_the_rows_the_threshold_was_not_chosen_on(ckpt, tmp_path, capsys):
    record = calibrate(ckpt, "--data", SST2, "--max-drop", "0.3")
    moved = shutil.copytree(SST2, tmp_path / "elsewhere" / "SST-2")  # the same rows under another path
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(ckpt), "--data", str(moved), "--no-timing", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["rows"]["rows"] == "report" and report["samples"] == record["report_samples"] == 100
    assert "report rows only" in capsys.readouterr().out
    assert report["final_layer_score"] == pytest.approx(record["report"]["final_layer_score"])
    at_threshold = next(r for r in report["sweep"] if r["threshold"] == record["threshold"])
    assert at_threshold["score"] == pytest.approx(record["report"]["score"])
    assert at_threshold["layers_saved"] == pytest.approx(record["report"]["layers_saved"])

    assert main(["evaluate", str(ckpt), "--data", SST2, "--no-timing", "--all-rows", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["samples"] == 200 and report["rows"]["calibration_rows_included"] == 100
    assert "INCLUDING the 100 rows" in capsys.readouterr().out

    # another split is not the calibration data: every row is reported
    assert main(["evaluate", str(ckpt), "--data", SST2, "--split", "train", "--no-timing", "--max-samples", "30",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["rows"]["rows"] == "all" and report["samples"] == 30
    assert "calibrated on other data, dev of" in report["rows"]["note"]
