"""The command behind the APIs' overhead numbers runs, sends every route, and reports each."""

from __future__ import annotations

import json

from exitserve.loadtest.protocol_overhead import TARGET_MS, main, median_interval, verdict
from tests.conftest import GLUE


def test_the_medians_interval_and_the_verdict():
    assert median_interval([float(i) for i in range(101)]) == (40.0, 61.0)  # 50.5 -+ 9.85, rounded outward
    assert verdict(0.05, 0.15) == "met" and verdict(0.25, 0.4) == "missed"
    assert verdict(0.1, 0.3) == "unresolved (noise)"


def test_protocol_overhead_measures_every_route_against_predict(tiny_checkpoint, tmp_path):
    main(["--checkpoint", str(tiny_checkpoint), "--data", str(GLUE / "SST-2"), "--rounds", "8", "--warmup", "1",
          "--out", str(tmp_path)])
    report = json.loads((tmp_path / "protocol_overhead.json").read_text())
    routes = report["routes"]
    assert {"/predict", "TEI /models/{name}", "TEI /", "OIP infer, JSON", "OIP infer, binary"} <= set(routes)
    assert all(len(v) == 8 for v in report["samples_ms"].values())
    assert routes["/predict"]["overhead_p50_ms"] == 0.0 and all(r["p50_ms"] > 0 for r in routes.values())
    assert all(low <= r["overhead_p50_ms"] <= high for r in routes.values() for low, high in [r["overhead_ci95_ms"]])
    table = (tmp_path / "protocol_overhead.md").read_text()
    assert f"target ≤ {TARGET_MS} ms" in table and table.count("\n| ") == len(routes) + 1
    assert (tmp_path / "protocol_overhead.png").stat().st_size > 0
