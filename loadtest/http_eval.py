"""Score a served model through HTTP: accuracy (or the task metric) on a dev split, the server's
own `exitserve_average_layers_saved`, and latency at concurrency 1 (one text per request).

    python -m exitserve.loadtest.http_eval --checkpoint server/default_model --data ../shared/data/glue/SST-2
    python -m exitserve.loadtest.http_eval --url http://127.0.0.1:8000 --data ../shared/data/glue/SST-2

With --checkpoint it starts `exitserve serve` on a free loopback port and stops it afterwards (so the
metrics count only this run); with --url it uses a running server (loopback only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from exitserve.loadtest.loadgen import check_loopback
from exitserve.loadtest.servers import exitserve_command, free_port, running
from exitserve.models.data import DEFAULT_DATA, ColumnOptions, load_examples
from exitserve.models.scores import all_scores


def scrape(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def http_eval(base: str, data: str, split: str, max_samples: int | None) -> dict:
    check_loopback(base)
    info = httpx.get(f"{base}/info", timeout=10).json()
    columns = ColumnOptions(task_type=info["task_type"])
    spec, rows = load_examples(data, split, columns, tuple(info["labels"]) or None)
    rows = rows.subset(max_samples, seed=0)
    predictions, latencies, exit_layers = [], [], []
    with httpx.Client(timeout=30) as client:
        for i in tqdm(range(len(rows)), desc="HTTP predictions", unit="request"):
            body: dict = {"text": rows.texts[i]}
            if rows.pairs is not None:
                body["text_pair"] = rows.pairs[i]
            start = time.perf_counter()
            resp = client.post(f"{base}/predict", json=body)
            latencies.append((time.perf_counter() - start) * 1000)
            resp.raise_for_status()
            result = resp.json()
            exit_layers.append(result["exit_layer"])
            predictions.append(result["prediction"] if spec.is_regression else result["label_id"])
        metrics = client.get(f"{base}/metrics").text
    lat = sorted(latencies)
    return {
        "url": base, "data": data, "split": split, "samples": len(rows), "model": info["model"],
        "default_threshold": info["default_threshold"], "num_layers": info["num_layers"],
        "scores": all_scores(spec.metric, predictions, rows.labels),
        "mean_exit_layer": statistics.fmean(exit_layers),
        "server_average_layers_saved": scrape(metrics, "exitserve_average_layers_saved"),
        "latency_ms_concurrency_1": {"p50": lat[len(lat) // 2], "p95": lat[int(0.95 * len(lat))],
                                     "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))]},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.http_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--checkpoint", help="start `exitserve serve CHECKPOINT` for the run")
    target.add_argument("--url", help="a running server on loopback")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--split", default="dev")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    if args.checkpoint:
        port = free_port()
        server = running(exitserve_command(args.checkpoint, port), port)
    else:
        server = nullcontext(args.url.rstrip("/"))
    with server as base:
        report = http_eval(base, args.data, args.split, args.max_samples)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
