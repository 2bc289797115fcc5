"""The load-test kit runs end to end on the tiny checkpoint (numbers are not asserted, shapes are)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from exitserve.loadtest.bench import main
from exitserve.loadtest.bench_report import EXITS_OFF, EXITS_ON, ORT_PEER, PIPELINE_PEER, targets, throughput_ratio
from exitserve.loadtest.loadgen import run_load
from exitserve.loadtest.open_loop import histograms, stage_quantiles
from exitserve.loadtest.servers import exitserve_command, free_port, running
from tests.conftest import GLUE, TINY_LAYERS


def test_load_generator_targets_loopback_only():
    with pytest.raises(ValueError, match="loopback only"):
        asyncio.run(run_load("http://10.0.0.1:8000/predict", lambda i: {}, 1, 0.1))


@pytest.mark.timeout(900)
def test_bench_all_compares_exits_on_off_and_the_peer(tiny_checkpoint, tmp_path):
    main(["all", "--checkpoint", str(tiny_checkpoint), "--data", str(GLUE / "SST-2"), "--backend", "onnxruntime",
          "--concurrency", "1,2", "--duration", "1", "--max-samples", "32", "--threads", "1", "--tail-seconds", "2",
          "--tail-measure-seconds", "1", "--pipeline", "--out", str(tmp_path), "--name", "b"])
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["backend"] == "onnxruntime" and report["machine"]["load_average_at_end"]
    assert [r["batch_size"] for r in report["library"]["rows"]] == [1, 32]
    for row in report["library"]["rows"]:
        assert row["ideal_speedup"] == pytest.approx(TINY_LAYERS / row["mean_exit_layer"])
        assert row["exits_off_vs_whole_ort"] == pytest.approx(row["whole_ort_s"] / row["exits_off_s"])
    srv = report["server"]
    servers = srv["servers"]
    assert set(servers) == {EXITS_ON, EXITS_OFF, ORT_PEER, PIPELINE_PEER}
    for rows in servers.values():
        assert [r["concurrency"] for r in rows] == [1, 2]
        assert all(r["ok"] > 0 and r["errors"] == 0 for r in rows)
    assert all(r["mean_exit_layer"] == TINY_LAYERS for r in servers[EXITS_OFF])
    assert all(r["mean_exit_layer"] < TINY_LAYERS for r in servers[EXITS_ON])
    assert "overhead_ms_c1" in report
    assert set(srv["rss_mib"]) == {"exitserve", ORT_PEER} and all(v > 20 for v in srv["rss_mib"].values())
    tail = srv["tail"]
    assert tail["sent"] > 0 and tail["wrong_answers"] == 0 and tail["statuses"] == {"200": tail["sent"]}
    assert tail["p99_over_p50"] == pytest.approx(tail["ok_p99_ms"] / tail["ok_p50_ms"], abs=0.01)
    assert {"request", "tokenization", "queue", "inference"} <= set(tail["server_stages"])
    assert 'gc generation="0"' in tail["server_stages"]  # the server's GC pause histogram, read between scrapes
    same = srv["same_load"]
    assert same["exitserve"]["offered_rps"] == pytest.approx(same["peer"]["offered_rps"], abs=0.11)  # same traffic
    assert same["peer"]["wrong_answers"] == 0 and "server_stages" not in same["peer"]  # the peer has no /metrics
    slo = srv["slo"]
    assert slo["slo_ms"] > 0 and slo["wrong_answers"] == 0
    if "200" in slo["statuses"]:
        assert 0 <= slo["within_slo"] <= 1
    else:  # a run this short on a busy machine may shed every request: then nothing was answered in time
        assert slo["within_slo"] is None and set(slo["statuses"]) == {"429"}
    assert set(srv["policies"]) == {"default", "layered"} and all(v > 0 for v in srv["policies"].values())
    assert (tmp_path / "b_server.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "b.md").read_text()
    assert "| exitserve exits on | 1 |" in table and "resident memory after the runs" in table
    on, off = servers[EXITS_ON][0], servers[EXITS_OFF][0]
    assert f"| {EXITS_ON} / {EXITS_OFF} | {on['throughput_rps'] / off['throughput_rps']:.2f}× |" in table
    assert f"batch-1 p50): {report['overhead_ms_c1']:.2f} ms" in table
    met = {t["target"]: t["met"] for t in report["targets"]}
    assert met["server, c=1: exits off vs the ORT peer"] == (
        off["throughput_rps"] / servers[ORT_PEER][0]["throughput_rps"] >= 1.0)
    assert any(name.startswith("tail: p99 / p50") for name in met)
    assert any(name.startswith("memory:") for name in met)


def test_locustfile_runs_headless_without_failures_on_every_api(tiny_checkpoint, tiny_pair_checkpoint, tmp_path):
    port = free_port()
    cmd = exitserve_command([tiny_checkpoint, tiny_pair_checkpoint], port, names=["sst", "sts"])
    with running(cmd, port) as base:
        proc = subprocess.run(
            [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--host", base, "--headless",
             "-u", "4", "-r", "4", "-t", "4s", "--only-summary", "--exit-code-on-error", "1"],
            capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for route in ("/predict (1)", "/models/{name} (TEI)", "/v2/models/{name}/infer"):
        assert route in proc.stderr + proc.stdout, route


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


METRICS_BEFORE = """# TYPE exitserve_queue_duration_seconds histogram
exitserve_queue_duration_seconds_bucket{le="0.001",model="m"} 5.0
exitserve_queue_duration_seconds_bucket{le="0.01",model="m"} 8.0
exitserve_queue_duration_seconds_bucket{le="0.1",model="m"} 10.0
exitserve_queue_duration_seconds_bucket{le="+Inf",model="m"} 10.0
exitserve_queue_duration_seconds_count{model="m"} 10.0
exitserve_queue_duration_seconds_sum{model="m"} 0.1
"""


def test_stage_quantiles_come_from_the_buckets_filled_between_two_scrapes():
    # 100 more observations: 50 under 1 ms, 49 in (1, 10] ms, 1 in (10, 100] ms
    after = (METRICS_BEFORE.replace(' 5.0', ' 55.0').replace('"0.01",model="m"} 8.0', '"0.01",model="m"} 107.0')
             .replace('"0.1",model="m"} 10.0', '"0.1",model="m"} 110.0').replace('"+Inf",model="m"} 10.0',
                                                                                 '"+Inf",model="m"} 110.0'))
    buckets = histograms(after)["exitserve_queue_duration_seconds"]
    assert buckets == [(0.001, 55.0), (0.01, 107.0), (0.1, 110.0), (float("inf"), 110.0)]
    gc_before = '# TYPE exitserve_gc_pause_seconds histogram\n' + "".join(
        f'exitserve_gc_pause_seconds_bucket{{generation="2",le="{le}"}} {n}\n' for le, n in (("0.01", 1), ("0.1", 1),
                                                                                           ("+Inf", 1)))
    gc_after = gc_before.replace('"0.1"} 1', '"0.1"} 3').replace('"+Inf"} 1', '"+Inf"} 3')
    stages = stage_quantiles(METRICS_BEFORE + gc_before, after + gc_after)
    assert stages == {"queue": {"p50_ms_at_most": 1.0, "p99_ms_at_most": 10.0},
                      'gc generation="2"': {"pauses": 2.0, "longest_ms_at_most": 100.0}}
    assert stage_quantiles(METRICS_BEFORE, METRICS_BEFORE) == {"queue": {"p50_ms_at_most": None,
                                                                         "p99_ms_at_most": None}}


def _rows(rps: dict[int, float]) -> list[dict]:
    return [{"concurrency": c, "throughput_rps": r} for c, r in rps.items()]


def test_targets_are_judged_from_the_same_run():
    open_loop = {"fraction": 0.7, "ok_p50_ms": 10.0, "ok_p99_ms": 42.0, "p99_over_p50": 4.2, "wrong_answers": 0}
    report = {
        "library": {"rows": [{"batch_size": 1, "exits_on_vs_whole_ort": 1.8, "ideal_speedup": 2.0}]},
        "server": {"backend": "onnxruntime", "servers": {
            EXITS_ON: _rows({1: 200.0, 16: 300.0}), EXITS_OFF: _rows({1: 80.0, 16: 120.0}),
            ORT_PEER: _rows({1: 100.0, 16: 160.0}), PIPELINE_PEER: _rows({1: 90.0, 16: 50.0})},
            "rss_mib": {"exitserve": 330.0, ORT_PEER: 300.0}, "tail": open_loop,
            "same_load": {"exitserve": {**open_loop, "ok_p99_ms": 50.0}, "peer": {**open_loop, "ok_p50_ms": 20.0}},
            "slo": {"slo_ms": 30.0, "fraction": 0.9, "within_slo": 0.995},
            "policies": {"default": 180.0, "layered": 200.0}},
        "overhead_ms_c1": 1.6,
    }
    got = {t["target"]: (t["value"], t["met"]) for t in targets(report)}
    assert got["library, batch 1: exits on vs the whole ORT graph, over the ideal (2.00×)"] == (0.9, True)
    assert got["server, c=1: exits on vs the ORT peer"] == (2.0, True)
    assert got["server, c=16: exits on vs the ORT peer"] == (1.875, True)
    assert got["server, c=1: exits off vs the ORT peer"] == (0.8, False)
    assert got["memory: exitserve's RSS / the peer's, after the runs"] == (1.1, True)
    assert got["overhead at c=1: server p50 − the backend's batch-1 p50"] == (1.6, False)
    assert got["tail: p99 / p50 at 70% of capacity (Poisson)"] == (4.2, True)
    assert got["same load (70 % of the peer's capacity): exitserve p50 / the peer's"] == (0.5, True)
    assert got["same load (70 % of the peer's capacity): exitserve p99 / the peer's"] == (1.19, False)
    assert got["slo_ms = 30.0 at 90% load: answered within it"] == (0.995, True)
    assert got["saturation throughput: default policy / the pre-issue-18 one (layered)"] == (0.9, False)
    assert throughput_ratio(report["server"]["servers"], EXITS_ON, "infinity-emb (optimum)", 1) is None


def test_costs_reports_model_and_gc_costs(tiny_checkpoint, capsys):
    from exitserve.loadtest.costs import main as costs_main

    costs_main(["--checkpoint", str(tiny_checkpoint), "--data", str(GLUE / "SST-2"), "--sentences", "5",
                "--requests", "20"])
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["sentences"] == 5
    assert all(report["model"][k] > 0 for k in ("stock_forward_ms", "exits_off_ms", "exits_on_ms"))
    assert report["gc"]["tracked_objects"] > 10_000 and report["gc"]["requests"] == 20
    assert len(report["gc"]["collections_per_generation"]) == 3


def test_request_path_attributes_each_sample_to_its_innermost_known_stage():
    from exitserve.loadtest.request_path import OTHER, parse_raw, stage_of

    assert stage_of(["main (server/main.py:1)", "predict (server/app.py:2)", "encode (models/encoding.py:3)"]) == \
        "tokenisation"
    assert stage_of(["Scheduler._run (server/scheduler.py:1)", "Session.run (onnxruntime/capi/x.py:2)"]) == \
        "model (session.run)"
    assert stage_of(["something (elsewhere.py:1)"]) == OTHER
    raw = ("thread (1): MainThread;run (uvicorn/server.py:1);observe (prometheus_client/metrics.py:2) 7\n"
           "thread (2): worker;run (server/steps.py:1);run (onnxruntime/capi/s.py:2) 30\n")
    assert parse_raw(raw) == {"metrics": 7, "model (session.run)": 30}


@pytest.mark.timeout(300)
def test_request_path_profiles_both_servers(tiny_checkpoint, tmp_path):
    from exitserve.loadtest.bench import prepare_models
    from exitserve.loadtest.request_path import measure

    hf_dir = prepare_models(str(tiny_checkpoint), tmp_path)
    try:
        servers = measure(str(tiny_checkpoint), hf_dir, ["a fine film", "a dull one"], 2, 100, [])
    except RuntimeError as exc:  # py-spy needs ptrace: say so rather than pass silently
        pytest.skip(f"py-spy cannot sample here: {exc}")
    for name, profile in servers.items():
        assert profile["requests"] > 0 and profile["total_ms"] > 0, name
        assert "model (session.run)" in profile["ms_per_request"], name


@pytest.mark.timeout(300)
def test_memory_phases_read_a_live_server(tiny_checkpoint, monkeypatch):
    from exitserve.loadtest import memory

    monkeypatch.setattr(memory.time, "sleep", lambda s: None)
    port = free_port()
    with running(exitserve_command(tiny_checkpoint, port, "ort_arena=false"), port) as url:
        monkeypatch.setattr(memory, "run_load", lambda *a, **k: asyncio.sleep(0))  # no overload phase here
        phases = memory.phases(url, ["a fine film", "a dull one"] * 20)
    assert set(phases) == {"rest", "burst", "overload", "after"} and all(v > 20 for v in phases.values())
