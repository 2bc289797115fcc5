"""Ray Serve vs plain uvicorn: closed-loop throughput of one checkpoint on one machine, in one run.

    python -m loadtest.ray_overhead [--checkpoint DIR] [--concurrency 1,4,16] [--duration 10] [--threads 2]

Starts `exitserve serve CKPT` (one uvicorn process), sweeps the concurrencies with the same
closed-loop client (loadtest/loadgen.py), stops it; then the same with `--ray` (a local Ray
instance, `--replicas` replicas of `--threads` CPUs and torch threads each: with one replica, the
plain server's threads). Single-text /predict at the checkpoint's threshold, SST-2 dev sentences.
Prints requests/s, p50 latency and the Ray/plain throughput ratio. Needs `pip install '.[dev,ray]'`.
All traffic goes to 127.0.0.1; Ray's files go to a temporary RAY_TMPDIR that is removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
from datetime import date
from pathlib import Path

from loadtest.loadgen import run_load
from loadtest.servers import exitserve_command, free_port, running

SENTENCES = Path(__file__).parent / "data" / "sentences.json"


def sweep(command: list[str], port: int, env: dict, concurrencies: list[int], duration: float) -> list[dict]:
    texts = json.loads(SENTENCES.read_text())["texts"]
    with running(command, port, env) as base:
        return [asyncio.run(run_load(f"{base}/predict", lambda i: {"text": texts[i % len(texts)]}, c, duration))
                .summary() for c in concurrencies]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.ray_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="server/default_model")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads = CPUs per replica")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    port = free_port()
    plain_cmd = exitserve_command(args.checkpoint, port, f"torch_threads={args.threads}", "log_level=warning")
    ray_cmd = [*plain_cmd, "--ray", "--replicas", str(args.replicas), "--num-cpus-per-replica", str(args.threads)]
    with tempfile.TemporaryDirectory(prefix="ray-overhead-", dir="/tmp") as ray_tmp:  # short: Ray's socket paths
        plain = sweep(plain_cmd, port, {}, concurrencies, args.duration)
        ray = sweep(ray_cmd, port, {"RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0"}, concurrencies,
                    args.duration)
    print(f"{date.today()} {platform.node()}: {os.cpu_count()} CPUs, checkpoint {args.checkpoint}, "
          f"torch threads {args.threads}, Ray replicas {args.replicas}, {args.duration:g} s per point")
    print("| clients | plain req/s | Ray req/s | Ray / plain | plain p50 ms | Ray p50 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for a, b in zip(plain, ray, strict=True):
        print(f"| {a['concurrency']} | {a['throughput_rps']:.1f} | {b['throughput_rps']:.1f} | "
              f"{b['throughput_rps'] / a['throughput_rps']:.2f} | {a['p50_ms']:.1f} | {b['p50_ms']:.1f} | "
              f"{a['errors'] + b['errors']} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "plain": plain, "ray": ray},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
