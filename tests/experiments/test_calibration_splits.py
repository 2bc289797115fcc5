"""The calibration-splits study on the tiny checkpoint: outputs, and agreement with `exitserve calibrate`."""

from __future__ import annotations

import json
import shutil

from exitserve.cli import main as exitserve
from exitserve.experiments.calibration_splits import main
from exitserve.models.exit_config import ExitConfig
from tests.conftest import GLUE

SST2 = str(GLUE / "SST-2")


def test_study_writes_json_markdown_and_plot_and_agrees_with_calibrate(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "study"
    main(["--checkpoint", str(tiny_checkpoint), "--data", SST2, "--splits", "4", "--max-drop", "0.3",
          "--out", str(out), "--name", "tiny"])
    study = json.loads((out / "tiny.json").read_text())
    assert set(study["summary"]) == {"risk-quality", "risk-consistency", "point"}
    assert len(study["results"]) == 12 and {r["split"] for r in study["results"]} == {0, 1, 2, 3}
    for name, summary in study["summary"].items():
        rows = [r for r in study["results"] if r["method"] == name]
        assert summary["splits"] == 4
        assert summary["drop_within_max_drop"] == sum(r["drop"] <= 0.3 for r in rows) / 4
        assert summary["relative_at_least_target"] == sum(r["relative_score"] >= 0.99 for r in rows) / 4
        assert summary["min_relative_score"] == min(r["relative_score"] for r in rows)
        assert all(r["samples"] == 100 for r in rows)
    assert study["settings"]["samples"] == 200 and study["settings"]["command"].endswith("--name tiny")
    table = (out / "tiny.md").read_text()
    assert "| risk-quality |" in table and "| point |" in table
    assert (out / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # split 2 of the study is `exitserve calibrate --seed 2`: the same threshold and held-out numbers
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    assert exitserve(["calibrate", str(ckpt), "--data", SST2, "--max-drop", "0.3", "--seed", "2"]) == 0
    record = ExitConfig.read(ckpt).calibration
    study_row = next(r for r in study["results"] if r["split"] == 2 and r["method"] == "risk-quality")
    assert record["threshold"] == study_row["threshold"]
    assert record["report"] == {k: study_row[k] for k in record["report"]}
