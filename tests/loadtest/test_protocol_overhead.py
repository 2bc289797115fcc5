"""The command behind the APIs' overhead numbers runs, sends every route, and reports each."""

from __future__ import annotations

import json

from exitserve.loadtest.protocol_overhead import TARGET_MS, main
from tests.conftest import GLUE


def test_protocol_overhead_measures_every_route_against_predict(tiny_checkpoint, tmp_path):
    main(["--checkpoint", str(tiny_checkpoint), "--data", str(GLUE / "SST-2"), "--rounds", "8", "--warmup", "1",
          "--out", str(tmp_path)])
    report = json.loads((tmp_path / "protocol_overhead.json").read_text())
    routes = report["routes"]
    assert {"/predict", "TEI /models/{name}", "TEI /", "OIP infer, JSON", "OIP infer, binary"} <= set(routes)
    assert all(len(v) == 8 for v in report["samples_ms"].values())
    assert routes["/predict"]["overhead_p50_ms"] == 0.0 and all(r["p50_ms"] > 0 for r in routes.values())
    table = (tmp_path / "protocol_overhead.md").read_text()
    assert f"target ≤ {TARGET_MS} ms" in table and table.count("\n| ") == len(routes) + 1
    assert (tmp_path / "protocol_overhead.png").stat().st_size > 0
