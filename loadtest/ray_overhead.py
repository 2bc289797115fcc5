"""Ray Serve vs plain uvicorn: closed-loop throughput of one checkpoint on one machine, in one run.

    python -m exitserve.loadtest.ray_overhead [--checkpoint DIR] [--concurrency 1,4,16] [--duration 10] [--rounds 3]

Each round starts `exitserve serve CKPT` (one uvicorn process), sweeps the concurrencies with the
same closed-loop client (loadtest/loadgen.py) and stops it; then the same with `--ray` (a local Ray
instance, `--replicas` replicas of `--threads` CPUs and torch threads each: with one replica, the
plain server's threads). Rounds alternate the two, so a background load that drifts hits both.
Single-text /predict at the checkpoint's threshold, SST-2 dev sentences. Prints every round and the
median Ray/plain throughput ratio per concurrency. Needs `pip install '.[dev,ray]'`. All traffic
goes to 127.0.0.1; Ray's files go to a temporary RAY_TMPDIR that is removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from datetime import date
from pathlib import Path

from exitserve.loadtest.loadgen import run_load
from exitserve.loadtest.servers import exitserve_command, free_port, running

SENTENCES = Path(__file__).parent / "data" / "sentences.json"


def sweep(command: Callable[[int], list[str]], env: dict, concurrencies: list[int], duration: float) -> list[dict]:
    texts = json.loads(SENTENCES.read_text())["texts"]
    port = free_port()  # a fresh port per server: Ray's proxy binds without SO_REUSEADDR (TIME_WAIT blocks it)
    with running(command(port), port, env) as base:
        return [asyncio.run(run_load(f"{base}/predict", lambda i: {"text": texts[i % len(texts)]}, c, duration))
                .summary() for c in concurrencies]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.ray_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="server/default_model")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads = CPUs per replica")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="plain-then-Ray sweeps, alternated")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    def plain_cmd(port: int) -> list[str]:
        return exitserve_command(args.checkpoint, port, f"torch_threads={args.threads}", "log_level=warning")

    def ray_cmd(port: int) -> list[str]:
        ray_options = ["--replicas", str(args.replicas), "--num-cpus-per-replica", str(args.threads)]
        return [*plain_cmd(port), "--ray", *ray_options]

    rounds = []
    with tempfile.TemporaryDirectory(prefix="ray-overhead-", dir="/tmp") as ray_tmp:  # short: Ray's socket paths
        ray_env = {"RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}
        for _ in range(args.rounds):
            plain = sweep(plain_cmd, {}, concurrencies, args.duration)
            rounds.append({"plain": plain, "ray": sweep(ray_cmd, ray_env, concurrencies, args.duration)})
    print(f"{date.today()} {platform.node()}: {os.cpu_count()} CPUs, checkpoint {args.checkpoint}, "
          f"torch threads {args.threads}, Ray replicas {args.replicas}, {args.duration:g} s per point")
    print("| round | clients | plain req/s | Ray req/s | Ray / plain | plain p50 ms | Ray p50 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    ratios: dict[int, list[float]] = {c: [] for c in concurrencies}
    for k, r in enumerate(rounds, 1):
        for a, b in zip(r["plain"], r["ray"], strict=True):
            ratios[a["concurrency"]].append(b["throughput_rps"] / a["throughput_rps"])
            print(f"| {k} | {a['concurrency']} | {a['throughput_rps']:.1f} | {b['throughput_rps']:.1f} | "
                  f"{ratios[a['concurrency']][-1]:.2f} | {a['p50_ms']:.1f} | {b['p50_ms']:.1f} | "
                  f"{a['errors'] + b['errors']} |")
    print("median Ray / plain throughput: " + ", ".join(
        f"{c} clients {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for c, v in ratios.items()))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rounds": rounds},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
