"""What the drop-in APIs cost over /predict: latency at concurrency 1, the same inputs, one server.

    nice -n 10 python -m exitserve.loadtest.protocol_overhead      # default model, 1000 rounds

Starts one `exitserve serve` and sends, in rounds, the same SST-2 dev sentence (at one fixed threshold,
default 0: every API runs the same one layer, so the model adds the least noise to what is compared)
through each route in turn, starting from another route each round, over one kept-alive connection:
/predict; TEI's body on /models/{name}, on / and on /predict; the Hugging Face client's payload; the
Open Inference Protocol with JSON tensors and with binary tensors (tritonclient's default). A route's
overhead is the median, over rounds, of its latency minus /predict's in the same round (paired, so
drift and background load cancel), with a distribution-free 95 % confidence interval (order
statistics), next to the plain p50s. The target is met when the whole interval is at or below it,
missed when the whole interval is above it, and unresolved (the machine too noisy to tell) otherwise.
Writes <out>/protocol_overhead.json, .md and .png (per-route latency distributions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from exitserve.loadtest.bench import machine, sentences
from exitserve.loadtest.servers import exitserve_command, free_port, running
from exitserve.models.data import DEFAULT_DATA

TARGET_MS = 0.2  # issue 21: each API's p50 overhead over /predict at concurrency 1


def _binary(client: httpx.Client, path: str, text: str, threshold: float) -> httpx.Response:
    """`text` as tritonclient sends it by default: binary BYTES in, binary outputs asked for."""
    raw = struct.pack("<I", len(text.encode())) + text.encode()
    header = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"threshold": threshold, "binary_data_output": True}}).encode()
    return client.post(path, content=header + raw, headers={"inference-header-content-length": str(len(header))})


def median_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free ~95 % confidence interval of the median: the order statistics n/2 -+ z*sqrt(n)/2."""
    ordered, n = sorted(values), len(values)
    half = z * math.sqrt(n) / 2
    return ordered[max(0, math.floor(n / 2 - half))], ordered[min(n - 1, math.ceil(n / 2 + half))]


def verdict(low: float, high: float) -> str:
    return "met" if high <= TARGET_MS else "missed" if low > TARGET_MS else "unresolved (noise)"


def routes(model: str, threshold: float) -> dict[str, Callable[[httpx.Client, str], httpx.Response]]:
    """Route label -> one request of `text` through it."""
    oip = f"/v2/models/{model}/infer"
    return {
        "/predict": lambda c, t: c.post("/predict", json={"text": t, "threshold": threshold}),
        "TEI /models/{name}": lambda c, t: c.post(f"/models/{model}", json={"inputs": t, "threshold": threshold}),
        "TEI /": lambda c, t: c.post("/", json={"inputs": t, "threshold": threshold}),
        "TEI body on /predict": lambda c, t: c.post("/predict", json={"inputs": t, "threshold": threshold}),
        "InferenceClient payload": lambda c, t: c.post(f"/models/{model}", json={"inputs": t, "parameters": {}},
                                                       headers={"x-exit-threshold": str(threshold)}),
        "OIP infer, JSON": lambda c, t: c.post(oip, json={"inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": [t]}], "parameters": {"threshold": threshold}}),
        "OIP infer, binary": lambda c, t: _binary(c, oip, t, threshold),
    }


def measure(checkpoint: str | None, data: str, rounds: int, warmup: int, threshold: float) -> dict:
    texts = sentences(data, None)
    port = free_port()
    cmd = exitserve_command(checkpoint, port, "access_log=false", "log_level=warning", "audit_rate=0")
    with running(cmd, port, ready_timeout=600) as base, httpx.Client(base_url=base, timeout=60) as client:
        model = client.get("/models").json()["models"][0]["name"]
        calls = routes(model, threshold)
        ms: dict[str, list[float]] = {name: [] for name in calls}
        names = list(calls)
        for i in tqdm(range(warmup + rounds), desc="protocol overhead", unit="round"):
            text = texts[i % len(texts)]
            for name in names[i % len(names):] + names[: i % len(names)]:
                started = time.perf_counter()
                response = calls[name](client, text)
                elapsed = (time.perf_counter() - started) * 1000
                if response.status_code != 200:
                    raise RuntimeError(f"{name}: {response.status_code} {response.text[:300]}")
                if i >= warmup:
                    ms[name].append(round(elapsed, 4))
    base_ms = ms["/predict"]
    result = {}
    for name, values in ms.items():
        paired = [v - b for v, b in zip(values, base_ms, strict=True)]
        result[name] = {"p50_ms": statistics.median(values), "p90_ms": statistics.quantiles(values, n=10)[-1],
                        "overhead_p50_ms": statistics.median(paired), "overhead_ci95_ms": median_interval(paired)}
    return {"model": model, "threshold": threshold, "rounds": rounds, "routes": result, "samples_ms": ms}


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}; niceness {report['nice']}; {report['rounds']} rounds at threshold "
             f"{report['threshold']} (model {report['model']}, one kept-alive connection, concurrency 1)", "",
             "| route | p50 (ms) | p90 (ms) | overhead vs /predict, paired median (ms) | its 95 % interval (ms) "
             f"| target ≤ {TARGET_MS} ms |", "|---|---|---|---|---|---|"]
    for name, r in report["routes"].items():
        low, high = r["overhead_ci95_ms"]
        met = "—" if name == "/predict" else verdict(low, high)
        lines.append(f"| {name} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['overhead_p50_ms']:+.3f} | "
                     f"{low:+.3f} … {high:+.3f} | {met} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["samples_ms"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.boxplot([report["samples_ms"][n] for n in names], whis=(5, 95), showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("latency at concurrency 1 (ms)")
    ax.set_title("The same request through each API (whiskers: 5th-95th percentile)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    for artist in ax.findobj(plt.Line2D):
        artist.set_linewidth(1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.protocol_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the embedded model (server/default_model)")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--rounds", type=int, default=1000, help="measured rounds (one request per route each)")
    p.add_argument("--warmup", type=int, default=50, help="rounds sent first and not measured")
    p.add_argument("--threshold", type=float, default=0.0, help="the same for every route (0: one layer)")
    p.add_argument("--out", default="docs/results/protocols")
    args = p.parse_args(argv)
    report = {"machine": machine(), "nice": os.nice(0), "checkpoint": args.checkpoint or "embedded",
              **measure(args.checkpoint, args.data, args.rounds, args.warmup, args.threshold)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol_overhead.json").write_text(json.dumps(report) + "\n")  # compact: 1,000 samples per route
    (out / "protocol_overhead.md").write_text(markdown(report))
    plot(report, out / "protocol_overhead.png")
    print(f"wrote {out}/protocol_overhead.json, .md, .png")
    print(markdown(report))


if __name__ == "__main__":
    main()
