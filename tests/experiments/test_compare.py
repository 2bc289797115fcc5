"""Checkpoints compared from their stored dev scores and calibration: table, ratio, plot."""

from __future__ import annotations

import pytest

from exitserve.experiments.compare import main
from tests.conftest import make_exit_config


def stored(path, scores: list[float], saved: float, mean_exit: float):
    cfg = make_exit_config(num_layers=len(scores))
    cfg.dev_scores = {"metric": "accuracy", "per_layer": [{"layer": k + 1, "score": s} for k, s in enumerate(scores)]}
    cfg.calibration = {"min_relative_score": 0.99, "threshold": 0.8, "score": 0.88, "relative_score": 0.995,
                       "mean_exit_layer": mean_exit, "layers_saved": saved}
    path.mkdir()
    cfg.save(path)
    return str(path)


def test_table_and_plot_from_stored_numbers(tmp_path, capsys):
    first = stored(tmp_path / "a", [0.8, 0.85, 0.88, 0.89], 0.5, 2.0)
    second = stored(tmp_path / "b", [0.6, 0.7, 0.86, 0.9], 0.25, 3.0)
    main([f"alt={first}", f"retro={second}", "--output", str(tmp_path / "out" / "cmp")])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| model | L1 | L2 | L3 | L4 | calibrated at |")
    assert out[2] == "| alt | 0.8000 | 0.8500 | 0.8800 | 0.8900 | 0.99 | 0.8 | 0.8800 | 99.5% | 2.00 | 50.0% | 1.00× |"
    assert out[3].endswith("| 3.00 | 25.0% | 0.50× |")
    assert (tmp_path / "out" / "cmp.png").stat().st_size > 0


def test_uncalibrated_checkpoints_are_refused(tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    make_exit_config().save(path)
    with pytest.raises(ValueError, match="no dev scores or no calibration"):
        main([f"x={path}", "--output", str(tmp_path / "o")])
