"""Where a request's time goes, stage by stage, in exitserve and in the ONNX Runtime whole-model peer.

Each server runs in its own process, warmed up, answering a closed loop of ONE client (concurrency 1)
for `--seconds`, while py-spy samples every thread of it (`py-spy record --format raw --nonblocking`).
A sample of a thread that is running (Python code, or a C call such as `session.run`, which counts
while it waits for ORT's pool) is 1/rate seconds, attributed to the stage of its innermost frame that
the stage table below recognises; ms per request = samples / rate / requests answered.

    python -m exitserve.loadtest.request_path --checkpoint server/default_model [--seconds 20]

Writes docs/results/bench/request_path.{json,md}. Under py-spy's sampling the servers run a little
slower; compare the two columns of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from exitserve.loadtest.loadgen import run_load
from exitserve.loadtest.reliability.report import write_json
from exitserve.loadtest.servers import exitserve_command, free_port, ort_peer_command, running

# (stage, frame substrings); a sample goes to the stage of its innermost frame matching any entry
STAGES = [
    ("model (session.run)", ("onnxruntime/capi",)),
    ("tokenisation", ("models/encoding.py", "tokenizers", "tokenization_utils")),
    ("metrics", ("prometheus_client", "server/metrics.py")),
    ("JSON out", ("starlette/responses.py", "json/encoder.py", "json/__init__.py", "fastapi/encoders.py")),
    ("request validation", ("pydantic", "fastapi/dependencies", "server/schemas.py")),
    ("exitserve guard (ASGI)", ("server/guard.py", "server/connections.py")),
    ("scheduler and hand-off", ("server/scheduler.py", "server/steps.py", "server/policy.py", "server/waitlist.py",
                                "server/cost.py", "models/inference.py", "models/answers.py", "models/criteria.py",
                                "call_soon_threadsafe", "anyio/", "starlette/concurrency.py")),
    ("service and route", ("server/service.py", "server/app.py", "server/audit.py", "loadtest/peer_ort.py")),
    ("FastAPI / Starlette routing", ("fastapi/", "starlette/")),
    ("HTTP (uvicorn)", ("uvicorn/", "httptools", "h11")),
    ("event loop", ("asyncio/", "selectors.py")),
]
OTHER = "other"


def stage_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for stage, patterns in STAGES:
            if any(p in frame for p in patterns):
                return stage
    return OTHER


def parse_raw(text: str) -> Counter:
    """py-spy's raw (collapsed) output -> samples per stage."""
    counts: Counter = Counter()
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[stage_of(stack.split(";"))] += int(n)
    return counts


def profile(url: str, pid: int, texts: list[str], seconds: int, rate: int) -> dict:
    """Sample `pid` for `seconds` while one client sends /predict back to back; per-stage ms / request."""
    asyncio.run(run_load(f"{url}/predict", lambda i: {"text": texts[i % len(texts)]}, 1, 2.0))  # warm
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.txt"
        spy = subprocess.Popen([py_spy(), "record", "-p", str(pid), "-r", str(rate), "-d", str(seconds),
                                "-f", "raw", "-o", str(raw), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        load = asyncio.run(run_load(f"{url}/predict", lambda i: {"text": texts[i % len(texts)]}, 1, seconds,
                                    warmup=0.2))
        _, err = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy failed: {err.strip()[-500:]}")
        counts = parse_raw(raw.read_text())
    requests = load.summary()["ok"]
    per_request = {stage: round(n / rate / requests * 1000, 3) for stage, n in counts.most_common()}
    return {"requests": load.summary()["ok"], "p50_ms": load.summary()["p50_ms"], "ms_per_request": per_request,
            "total_ms": round(sum(per_request.values()), 3)}


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise FileNotFoundError("py-spy is not installed (pip install py-spy; it is in the dev extra)")
    return found


def measure(checkpoint: str, hf_dir: Path, texts: list[str], seconds: int, rate: int,
            settings: list[str]) -> dict:
    out = {}
    port = free_port()
    with running(exitserve_command(checkpoint, port, *settings), port) as url:
        out["exitserve"] = profile(url, url.pid, texts, seconds, rate)
    port = free_port()
    cmd, env = ort_peer_command(hf_dir, port)
    with running(cmd, port, env) as url:
        out["ONNX Runtime whole-model peer"] = profile(url, url.pid, texts, seconds, rate)
    return out


def markdown(report: dict) -> str:
    names = list(report["servers"])
    stages = [s for s, _ in STAGES] + [OTHER]
    lines = [f"Per request at concurrency 1, sampled by py-spy at {report['rate']} Hz for {report['seconds']:g} s "
             f"({report['date_utc']} UTC, load average {report['load_average']}).", "",
             "| stage (ms per request) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for stage in stages:
        cells = [report["servers"][n]["ms_per_request"].get(stage) for n in names]
        if any(cells):
            lines.append(f"| {stage} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")
    lines.append("| **total sampled** | " + " | ".join(f"{report['servers'][n]['total_ms']:.3f}" for n in names)
                 + " |")
    lines.append("| client p50 (ms) | " + " | ".join(f"{report['servers'][n]['p50_ms']:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import os
    from datetime import datetime, timezone

    from exitserve.loadtest.bench import prepare_models, sentences
    from exitserve.models.data import DEFAULT_DATA

    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.request_path", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="server/default_model")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="an exitserve setting")
    p.add_argument("--out", default="docs/results/bench")
    args = p.parse_args(argv)
    texts = sentences(args.data, 200)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = prepare_models(args.checkpoint, Path(tmp))
        servers = measure(args.checkpoint, hf_dir, texts, args.seconds, args.rate, args.set)
    report = {"date_utc": datetime.now(timezone.utc).isoformat(" ", "seconds"),
              "load_average": [round(x, 2) for x in os.getloadavg()], "seconds": args.seconds, "rate": args.rate,
              "settings": args.set, "servers": servers}
    out = write_json(Path(args.out) / "request_path.json", report)
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
