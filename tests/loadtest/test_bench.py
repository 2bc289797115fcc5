"""The load-test kit runs end to end on the tiny checkpoint (numbers are not asserted, shapes are)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from exitserve.loadtest.bench import main
from exitserve.loadtest.loadgen import run_load
from exitserve.loadtest.servers import exitserve_command, free_port, running
from tests.conftest import GLUE, TINY_LAYERS


def test_load_generator_targets_loopback_only():
    with pytest.raises(ValueError, match="loopback only"):
        asyncio.run(run_load("http://10.0.0.1:8000/predict", lambda i: {}, 1, 0.1))


def test_bench_all_compares_exits_on_off_and_the_peer(tiny_checkpoint, tmp_path):
    main(["all", "--checkpoint", str(tiny_checkpoint), "--data", str(GLUE / "SST-2"), "--concurrency", "1,2",
          "--duration", "1", "--max-samples", "32", "--threads", "1", "--out", str(tmp_path), "--name", "b"])
    report = json.loads((tmp_path / "b.json").read_text())
    assert [r["batch_size"] for r in report["library"]["rows"]] == [1, 32]
    for row in report["library"]["rows"]:
        assert row["ideal_speedup"] == pytest.approx(TINY_LAYERS / row["mean_exit_layer"])
    servers = report["server"]["servers"]
    assert set(servers) == {"exitserve exits on", "exitserve exits off", "transformers pipeline peer"}
    for rows in servers.values():
        assert [r["concurrency"] for r in rows] == [1, 2]
        assert all(r["ok"] > 0 and r["errors"] == 0 for r in rows)
    assert all(r["mean_exit_layer"] == TINY_LAYERS for r in servers["exitserve exits off"])
    assert all(r["mean_exit_layer"] < TINY_LAYERS for r in servers["exitserve exits on"])
    assert "overhead_ms_c1" in report
    assert (tmp_path / "b_server.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "b.md").read_text()
    assert "| exitserve exits on | 1 |" in table
    on, off = servers["exitserve exits on"][0], servers["exitserve exits off"][0]
    assert f"| exitserve exits off | {on['throughput_rps'] / off['throughput_rps']:.2f}× |" in table
    assert f"batch-1 p50): {report['overhead_ms_c1']:.2f} ms" in table


def test_locustfile_runs_headless_without_failures(tiny_checkpoint, tmp_path):
    port = free_port()
    with running(exitserve_command(tiny_checkpoint, port), port) as base:
        proc = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--host", base, "--headless",
             "-u", "2", "-r", "2", "-t", "3s", "--only-summary", "--exit-code-on-error", "1"],
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "/predict (1)" in proc.stderr + proc.stdout


def test_http_eval_scores_a_served_model(tiny_checkpoint, tmp_path):
    from exitserve.loadtest.http_eval import main as http_eval_main

    out = tmp_path / "h.json"
    http_eval_main(["--checkpoint", str(tiny_checkpoint), "--data", str(GLUE / "SST-2"), "--max-samples", "20",
                    "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["samples"] == 20 and 0.0 <= report["scores"]["accuracy"] <= 1.0
    assert 1 <= report["mean_exit_layer"] <= TINY_LAYERS
    # the server's gauge counts this run (and its warm-up) and agrees in size with the client's view
    assert 0.0 <= report["server_average_layers_saved"] <= TINY_LAYERS - 1
    assert report["latency_ms_concurrency_1"]["p50"] > 0
