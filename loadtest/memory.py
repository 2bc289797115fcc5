"""Resident memory of exitserve and of the ONNX Runtime peer: at rest, after a burst of 32-input batches,
under overload, and after it, for each allocator (jemalloc, glibc) and ORT arena setting.

    python -m exitserve.loadtest.memory --checkpoint server/default_model --data ../shared/data/glue/SST-2

Each variant is a fresh server serving from graphs built beforehand (so no start builds anything):
  rest       after warm-up (exitserve warms up with its largest batch), 5 s idle;
  burst      after 20 requests of 32 of the longest texts each (the peer: 20 requests of 32 texts);
  overload   at the end of 15 s of 64 closed-loop clients;
  after      15 s idle later (jemalloc returns freed pages after its 10 s decay).
Writes docs/results/bench/memory.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from exitserve.loadtest.bench_server import rss_mib
from exitserve.loadtest.loadgen import run_load
from exitserve.loadtest.reliability.report import write_json
from exitserve.loadtest.servers import ServerURL, exitserve_command, free_port, ort_peer_command, running

VARIANTS = [  # (name, exitserve settings)
    ("exitserve, jemalloc, arena off", ["allocator=jemalloc", "ort_arena=false"]),
    ("exitserve, jemalloc, arena on", ["allocator=jemalloc", "ort_arena=true"]),
    ("exitserve, glibc, arena off", ["allocator=system", "ort_arena=false"]),
    ("exitserve, glibc, arena on", ["allocator=system", "ort_arena=true"]),
]


def phases(url: ServerURL, texts: list[str]) -> dict[str, float]:
    longest = sorted(texts, key=len)[-32:]
    out = {}
    time.sleep(5)
    out["rest"] = rss_mib(url.pid)
    with httpx.Client(timeout=60) as client:
        for _ in range(20):
            client.post(f"{url}/predict", json={"text": longest}).raise_for_status()
    out["burst"] = rss_mib(url.pid)
    asyncio.run(run_load(f"{url}/predict", lambda i: {"text": texts[i % len(texts)]}, 64, 15.0, warmup=0.0))
    out["overload"] = rss_mib(url.pid)
    time.sleep(15)
    out["after"] = rss_mib(url.pid)
    return {k: round(v, 1) for k, v in out.items()}


def measure(checkpoint: str, hf_dir: Path, texts: list[str]) -> dict:
    results = {}
    for name, settings in tqdm(VARIANTS, desc="memory", unit="server"):
        port = free_port()
        with running(exitserve_command(checkpoint, port, *settings), port) as url:
            results[name] = phases(url, texts)
    port = free_port()
    cmd, env = ort_peer_command(hf_dir, port)
    with running(cmd, port, env) as url:
        results["ONNX Runtime whole-model peer (glibc)"] = phases(url, texts)
    return results


def markdown(report: dict) -> str:
    lines = [f"Resident memory (MiB), {report['date_utc']} UTC:", "",
             "| server | at rest | after 32-input batches | under overload | 15 s after |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['rest']:.0f} | {r['burst']:.0f} | {r['overload']:.0f} | {r['after']:.0f} |"
              for name, r in report["servers"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from datetime import datetime, timezone

    from exitserve.loadtest.bench import prepare_models, sentences
    from exitserve.models.data import DEFAULT_DATA

    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="server/default_model")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--out", default="docs/results/bench")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = prepare_models(args.checkpoint, Path(tmp))
        servers = measure(args.checkpoint, hf_dir, sentences(args.data, None))
    report = {"date_utc": datetime.now(timezone.utc).isoformat(" ", "seconds"), "servers": servers}
    out = write_json(Path(args.out) / "memory.json", report)
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
