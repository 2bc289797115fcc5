"""What shadow audits cost at saturation: throughput with `audit_rate` R vs audits off, same run.

    nice -n 10 python -m exitserve.loadtest.audit_cost     # default model, R = 0.02, c = 32, 3 rounds of 20 s

Starts two `exitserve serve` processes on the same checkpoint -- audits off (audit_rate=0) and on
(audit_rate=R) -- and runs the closed-loop load generator (loadtest/loadgen.py: single SST-2 dev
sentences, at the default threshold) against one at a time, alternating which goes first each round,
so both see the same background load. Per point: throughput, latency percentiles, errors, the
machine's load average before and after, and for the audited server the audits finished and
dropped during the point. The ratio is audits-on / audits-off throughput per round; the report gives
the median. Writes <out>/audit_cost.json and audit_cost.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
from contextlib import ExitStack
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from exitserve.loadtest.bench import machine, sentences
from exitserve.loadtest.loadgen import run_load
from exitserve.loadtest.servers import exitserve_command, free_port, running
from exitserve.models.data import DEFAULT_DATA


def audit_counts(base: str) -> dict:
    audits = httpx.get(f"{base}/info", timeout=30).json()["audits"]
    return {k: audits[k] for k in ("audited", "dropped", "extra_layers")}


def measure(checkpoint: str | None, data: str, rate: float, concurrency: int, duration: float, rounds: int) -> dict:
    texts = sentences(data, None)

    def body(i: int) -> dict:
        return {"text": texts[i % len(texts)]}

    servers = {"audits off": 0.0, f"audit_rate={rate}": rate}
    points: list[dict] = []
    with ExitStack() as stack:
        bases = {}
        for name, r in servers.items():
            port = free_port()
            cmd = exitserve_command(checkpoint, port, f"audit_rate={r}", "access_log=false", "log_level=warning")
            bases[name] = stack.enter_context(running(cmd, port, ready_timeout=600))
        bar = tqdm(total=rounds * len(servers), desc="audit cost", unit="point")
        for round_ in range(rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for name in order:
                before, load_before = audit_counts(bases[name]), os.getloadavg()
                result = asyncio.run(run_load(f"{bases[name]}/predict", body, concurrency, duration))
                after = audit_counts(bases[name])
                points.append({"round": round_, "server": name, **result.summary(), "load_before": load_before,
                               "load_after": os.getloadavg(),
                               "audits": {k: after[k] - before[k] for k in after}})
                bar.update()
        bar.close()
    ratios = []
    for round_ in range(rounds):
        off, on = (next(p for p in points if p["round"] == round_ and p["server"] == name) for name in servers)
        ratios.append(on["throughput_rps"] / off["throughput_rps"] if off["throughput_rps"] else float("nan"))
    return {"rate": rate, "concurrency": concurrency, "duration_s": duration, "points": points,
            "ratios": ratios, "median_ratio": statistics.median(ratios)}


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}; niceness {report['nice']}", "",
             "| round | server | throughput (req/s) | p50 (ms) | p99 (ms) | errors | audits finished / dropped "
             "| audit layers | load avg before → after (1 min) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in report["points"]:
        a = p["audits"]
        lines.append(f"| {p['round'] + 1} | {p['server']} | {p['throughput_rps']:.1f} | {p['p50_ms']:.1f} | "
                     f"{p['p99_ms']:.1f} | {p['errors']} | {a['audited']} / {a['dropped']} | {a['extra_layers']} | "
                     f"{p['load_before'][0]:.1f} → {p['load_after'][0]:.1f} |")
    ratios = ", ".join(f"{r:.3f}" for r in report["ratios"])
    lines += ["", f"Throughput with audit_rate={report['rate']} / audits off, per round: {ratios}; "
                  f"**median {report['median_ratio']:.3f}** (concurrency {report['concurrency']}, "
                  f"{report['duration_s']:.0f} s per point)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.audit_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the embedded model (server/default_model)")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--rate", type=float, default=0.02, help="audit_rate of the audited server")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients (saturating)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per point")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="docs/results/audits")
    args = p.parse_args(argv)
    report = {"machine": machine(), "nice": os.nice(0), "checkpoint": args.checkpoint or "embedded",
              **measure(args.checkpoint, args.data, args.rate, args.concurrency, args.duration, args.rounds)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit_cost.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "audit_cost.md").write_text(markdown(report))
    print(f"wrote {out / 'audit_cost.json'}, {out / 'audit_cost.md'}")
    print(markdown(report))


if __name__ == "__main__":
    main()
