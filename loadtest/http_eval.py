"""Score a served model through HTTP: accuracy (or the task metric) on a dev split, the server's
own `exitserve_average_layers_saved`, and latency at concurrency 1 (one text per request).

    python -m exitserve.loadtest.http_eval --checkpoint server/default_model --data ../shared/data/glue/SST-2
    python -m exitserve.loadtest.http_eval --url http://127.0.0.1:8000 --data ../shared/data/glue/SST-2

With --checkpoint it starts `exitserve serve` on a free loopback port and stops it afterwards (so the
metrics count only this run); with --url it uses a running server (loopback only).

--held-out CHECKPOINT keeps only the rows that checkpoint never learned anything from: not the rows its
exit rule was fitted on, not the rows its threshold was calibrated on (models/holdout.py; the default
model's pool: `--data runs/default-model/SST-2 --split pool --held-out server/default_model`), and
--exclude-split NAME also drops rows whose text is in that split of the same data (e.g. dev).
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
from exitserve.models.checkpoint import ExitConfig
from exitserve.models.data import DEFAULT_DATA, ColumnOptions, Examples, load_examples
from exitserve.models.holdout import report_rows
from exitserve.models.scores import all_scores


def scrape(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def held_out_rows(rows: Examples, data: str, checkpoint: str | None, exclude_split: str | None,
                  columns: ColumnOptions, labels: tuple | None) -> tuple[Examples, str]:
    """The rows left once the checkpoint's rule and calibration rows (and `exclude_split`'s texts) are out."""
    notes = []
    if checkpoint is not None:
        rows, selection = report_rows(ExitConfig.read(Path(checkpoint)).calibration, rows)
        notes.append(selection["note"])
    if exclude_split is not None:
        _, other = load_examples(data, exclude_split, columns, labels)
        seen = set(other.texts)
        keep = [i for i, text in enumerate(rows.texts) if text not in seen]
        notes.append(f"without the {len(rows) - len(keep)} whose text is in {exclude_split}: {len(keep)} rows")
        rows = rows.take(keep)
    return rows, "; ".join(notes)


def http_eval(base: str, data: str, split: str, max_samples: int | None, held_out: str | None = None,
              exclude_split: str | None = None, compare_final: bool = False) -> dict:
    check_loopback(base)
    info = httpx.get(f"{base}/info", timeout=10).json()
    columns = ColumnOptions(task_type=info["task_type"])
    labels = tuple(info["labels"]) or None
    spec, rows = load_examples(data, split, columns, labels)
    rows, note = held_out_rows(rows, data, held_out, exclude_split, columns, labels)
    rows = rows.subset(max_samples, seed=0)
    with httpx.Client(timeout=30) as client:
        predictions, exit_layers, latencies = ask(client, base, rows, spec.is_regression)
        metrics = client.get(f"{base}/metrics").text
        # the same rows at threshold 1.0 (every layer): the final layer's own score, through the same server
        final = ask(client, base, rows, spec.is_regression, threshold=1.0)[0] if compare_final else None
    lat = sorted(latencies)
    scores = all_scores(spec.metric, predictions, rows.labels)
    report = {
        "url": base, "data": data, "split": split, "rows": note or "all", "samples": len(rows), "model": info["model"],
        "default_threshold": info["default_threshold"], "criterion": info.get("criterion"),
        "num_layers": info["num_layers"], "scores": scores,
        "mean_exit_layer": statistics.fmean(exit_layers),
        "layers_saved": 1.0 - statistics.fmean(exit_layers) / info["num_layers"],
        "server_average_layers_saved": scrape(metrics, "exitserve_average_layers_saved"),
        "latency_ms_concurrency_1": {"p50": lat[len(lat) // 2], "p95": lat[int(0.95 * len(lat))],
                                     "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))]},
    }
    if final is not None:
        final_scores = all_scores(spec.metric, final, rows.labels)
        same = [a == b for a, b in zip(predictions, final, strict=True)]
        report.update(final_layer_scores=final_scores, relative_score=scores[spec.metric] / final_scores[spec.metric],
                      agreement_with_final_layer=statistics.fmean(same))
    return report


def ask(client: httpx.Client, base: str, rows: Examples, regression: bool,
        threshold: float | None = None) -> tuple[list, list[int], list[float]]:
    """One request per row, in order: (answers, exit layers, latencies in ms)."""
    predictions, exit_layers, latencies = [], [], []
    desc = "HTTP predictions" + ("" if threshold is None else f" at threshold {threshold}")
    for i in tqdm(range(len(rows)), desc=desc, unit="request"):
        body: dict = {"text": rows.texts[i]}
        if rows.pairs is not None:
            body["text_pair"] = rows.pairs[i]
        if threshold is not None:
            body["threshold"] = threshold
        start = time.perf_counter()
        resp = client.post(f"{base}/predict", json=body)
        latencies.append((time.perf_counter() - start) * 1000)
        resp.raise_for_status()
        result = resp.json()
        exit_layers.append(result["exit_layer"])
        predictions.append(result["prediction"] if regression else result["label_id"])
    return predictions, exit_layers, latencies


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.http_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--checkpoint", help="start `exitserve serve CHECKPOINT` for the run")
    target.add_argument("--url", help="a running server on loopback")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--split", default="dev")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--held-out", default=None, metavar="CHECKPOINT",
                   help="only rows this checkpoint's exit rule and threshold were not fitted on")
    p.add_argument("--exclude-split", default=None, help="also drop rows whose text is in this split of --data")
    p.add_argument("--compare-final", action="store_true",
                   help="ask every row again at threshold 1.0: the final layer's score and the ratio to it")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    if args.checkpoint:
        port = free_port()
        server = running(exitserve_command(args.checkpoint, port), port)
    else:
        server = nullcontext(args.url.rstrip("/"))
    with server as base:
        report = http_eval(base, args.data, args.split, args.max_samples, args.held_out, args.exclude_split,
                           args.compare_final)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
