"""Choosing the scheduling policy: fit the simulator's cost model, compare the policies, check the
simulator against the real server (loadtest/simulate.py has the simulator).

    python -m exitserve.loadtest.scheduling fit --checkpoint server/default_model --data ../shared/data/glue/SST-2
    python -m exitserve.loadtest.scheduling compare --loads 0.5,0.7,0.9 [--bursty] [--slo-factor 3]
    python -m exitserve.loadtest.scheduling check --policy fcfs --loads 0.5,0.7

`compare` runs every policy at each load (a fraction of the best policy's simulated capacity: the same
traffic for all) and writes p50 / p99 / throughput and latency-CDF plots; `check` starts exitserve with
the policy, measures its capacity and its c=1 p50 (which gives the simulator's per-request overhead),
then sends Poisson arrivals at each load and compares p50 and p99 with the simulation at the same rate:
the simulator is trusted only within 20 %. Writes docs/results/scheduling/.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from exitserve.loadtest.simulate import StepModel, capacity, dev_texts, fit, run_load
from exitserve.server.policy import POLICIES, Limits

OUT = Path("docs/results/scheduling")


# ---- the comparison --------------------------------------------------------------------------------

def compare(costs: dict, loads: Sequence[float], policies: Sequence[str], seconds: float, limits: Limits,
            bursty: bool, slo_factor: float | None) -> dict:
    model = StepModel(tuple(costs["run"]), tuple(costs["layer"]), costs.get("overhead", 0.0))
    workload, num_layers = [tuple(w) for w in costs["workload"]], costs["num_layers"]
    unloaded = model.run_seconds([(statistics.median(t for t, _ in workload), num_layers // 2)]) + model.overhead
    slo = slo_factor * unloaded if slo_factor else None
    out = {"capacity_rps": {}, "results": [], "slo_ms": slo * 1000 if slo else None, "bursty": bursty,
           "seconds": seconds, "limits": vars(limits)}
    for policy in policies:
        cap = capacity(policy, model, workload, limits, num_layers)
        out["capacity_rps"][policy] = round(cap, 1)
    reference = max(out["capacity_rps"].values())  # loads are fractions of the best policy's capacity
    for load in loads:
        for policy in policies:
            result = run_load(policy, model, workload, limits, num_layers, load * reference, load, seconds, bursty,
                              slo)
            row = result.summary()
            if slo:
                row["within_slo"] = sum(x <= slo * 1000 for x in result.latencies_ms) / max(len(result.latencies_ms), 1)
            row["cdf_ms"] = [float(np.percentile(result.latencies_ms, p)) for p in range(1, 100)]
            out["results"].append(row)
    return out


def check(costs: dict, checkpoint: str, data: str, policy: str, loads: Sequence[float], seconds: float,
          settings: Sequence[str] = ()) -> dict:
    """The simulator against the real server (see the module docstring): the server's capacity and its
    c=1 p50 give the per-request overhead the simulator adds; then Poisson arrivals at each load's rate,
    on the server and in the simulator, p50 and p99 side by side."""
    import asyncio

    from exitserve.loadtest.loadgen import run_load as closed_loop
    from exitserve.loadtest.open_loop import capacity as real_capacity
    from exitserve.loadtest.open_loop import open_loop
    from exitserve.loadtest.servers import exitserve_command, free_port, running

    texts = dev_texts(data)[:200]
    model = StepModel(tuple(costs["run"]), tuple(costs["layer"]))
    workload, num_layers, limits = [tuple(w) for w in costs["workload"]], costs["num_layers"], Limits()
    port = free_port()
    rows = []
    with running(exitserve_command(checkpoint, port, f"policy={policy}", *settings), port) as url:
        single = asyncio.run(closed_loop(f"{url}/predict", lambda i: {"text": texts[i % len(texts)]}, 1, 10.0))
        single = single.summary()
        cap = asyncio.run(real_capacity(url, texts))
        idle = run_load(policy, model, workload, limits, num_layers, 1.0, 0.0, 60.0)
        model.overhead = max(single["p50_ms"] - idle.summary()["p50_ms"], 0.0) / 1000
        for load in loads:
            real = asyncio.run(open_loop(url, texts, load, seconds, capacity=cap))
            sim = run_load(policy, model, workload, limits, num_layers, load * cap, load, max(seconds, 60.0))
            rows.append({"load": load, "rate_rps": round(load * cap, 1), "real_p50_ms": real["ok_p50_ms"],
                         "real_p99_ms": real["ok_p99_ms"], "sim_p50_ms": sim.summary()["p50_ms"],
                         "sim_p99_ms": sim.summary()["p99_ms"], "wrong_answers": real["wrong_answers"]})
    for r in rows:
        r["p50_error"] = round(r["sim_p50_ms"] / r["real_p50_ms"] - 1, 3)
        r["p99_error"] = round(r["sim_p99_ms"] / r["real_p99_ms"] - 1, 3)
        r["within_20_percent"] = abs(r["p50_error"]) <= 0.2 and abs(r["p99_error"]) <= 0.2
    return {"policy": policy, "capacity_rps": round(cap, 1), "c1_p50_ms": single["p50_ms"],
            "overhead_ms": round(model.overhead * 1000, 3), "loads": rows}


def markdown(report: dict) -> str:
    capacities = ", ".join(f"{p} {c}" for p, c in report["capacity_rps"].items())
    lines = [f"Simulated capacity (answers/s, closed loop of 32): {capacities}", "",
             "| load | policy | rate (req/s) | throughput | p50 ms | p99 ms | p99/p50 |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        ratio = r["p99_ms"] / r["p50_ms"] if r["p50_ms"] else float("nan")
        lines.append(f"| {r['load']:.0%} | {r['policy']} | {r['rate_rps']} | {r['throughput_rps']} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {ratio:.1f} |")
    return "\n".join(lines) + "\n"


def check_markdown(report: dict) -> str:
    lines = [f"Policy {report['policy']}: server capacity {report['capacity_rps']} req/s, c=1 p50 "
             f"{report['c1_p50_ms']:.2f} ms (the simulator adds {report['overhead_ms']:.2f} ms per request).", "",
             "| load | rate | real p50 | simulated p50 | error | real p99 | simulated p99 | error | within 20 % |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['load']:.0%} | {r['rate_rps']} | {r['real_p50_ms']} | {r['sim_p50_ms']:.1f} | "
              f"{r['p50_error']:+.0%} | {r['real_p99_ms']} | {r['sim_p99_ms']:.1f} | {r['p99_error']:+.0%} | "
              f"{'yes' if r['within_20_percent'] else '**no**'} |" for r in report["loads"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = sorted({r["load"] for r in report["results"]})
    fig, axes = plt.subplots(1, len(loads), figsize=(5 * len(loads), 4), squeeze=False)
    for ax, load in zip(axes[0], loads, strict=True):
        for r in (r for r in report["results"] if r["load"] == load):
            ax.plot(r["cdf_ms"], np.arange(1, 100) / 100, label=r["policy"])
        ax.set_xscale("log")
        ax.set_title(f"{load:.0%} of capacity" + (" (bursty)" if report["bursty"] else ""))
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction answered")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.scheduling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["fit", "compare", "check"])
    p.add_argument("--policy", default="fcfs", help="check: the policy the server runs")
    p.add_argument("--check-seconds", type=float, default=60.0, help="check: seconds of Poisson arrivals per load")
    p.add_argument("--checkpoint", default="server/default_model")
    p.add_argument("--data", default=None)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--costs", default=str(OUT / "costs.json"))
    p.add_argument("--overhead-ms", type=float, default=None, help="per-request overhead outside the scheduler")
    p.add_argument("--loads", default="0.5,0.7,0.9")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--seconds", type=float, default=120.0, help="simulated seconds per point")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--bursty", action="store_true")
    p.add_argument("--slo-factor", type=float, default=None, help="slo = this x the unloaded latency")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.what == "fit":
        from exitserve.models.data import DEFAULT_DATA

        costs = fit(args.checkpoint, args.data or DEFAULT_DATA, args.backend)
        if args.overhead_ms is not None:
            costs["overhead"] = args.overhead_ms / 1000
        Path(args.costs).write_text(json.dumps(costs) + "\n")
        print(f"wrote {args.costs}: run {costs['run']}, layer {costs['layer']}")
        return
    costs = json.loads(Path(args.costs).read_text())
    if args.what == "check":
        from exitserve.models.data import DEFAULT_DATA

        report = check(costs, args.checkpoint, args.data or DEFAULT_DATA, args.policy,
                       [float(x) for x in args.loads.split(",")], args.check_seconds)
        stem = OUT / (args.name or f"check_{args.policy}")
        Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        Path(f"{stem}.md").write_text(check_markdown(report))
        print(check_markdown(report))
        return
    if args.overhead_ms is not None:
        costs["overhead"] = args.overhead_ms / 1000
    report = compare(costs, [float(x) for x in args.loads.split(",")], args.policies.split(","), args.seconds,
                     Limits(args.max_batch_size), args.bursty, args.slo_factor)
    stem = OUT / (args.name or ("compare_bursty" if args.bursty else "compare"))
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    Path(f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json, {stem}.md, {plot(report, Path(f'{stem}.png'))}")


if __name__ == "__main__":
    main()
