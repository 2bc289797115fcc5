"""The speed benchmark behind docs/RESULTS.md: one command, ratios measured side by side.

    python -m exitserve.loadtest.bench library --checkpoint server/default_model --data ../shared/data/glue/SST-2
    python -m exitserve.loadtest.bench server  --checkpoint server/default_model --data ../shared/data/glue/SST-2 \
        --concurrency 1,4,16,64 --duration 10 --out docs/results/bench

library: wall-clock of the layer-by-layer engine on the dev split at batch 1 and 32, exits on (the
  calibrated threshold) vs off (threshold 1.0), and that speed-up over the ideal L / mean exit layer.
server: a closed-loop concurrency sweep against (a) exitserve with exits on, (b) the same exitserve
  with exits off (threshold 1.0 per request), (c) the peer: the same fine-tuned model exported as a
  stock HF classifier behind FastAPI + a transformers pipeline, and (d) with --infinity PATH,
  infinity-emb's /classify on that exported model (install it in its own virtualenv:
  `python -m venv /tmp/inf && /tmp/inf/bin/pip install torch==2.13.0 'infinity-emb[server,torch]'`,
  then `--infinity /tmp/inf/bin/infinity_emb`). Servers run one at a time, each started fresh; the
  load generator shares the 2 cores with the server (see loadtest/loadgen.py).
Writes `<out>/<name>.json`, `<out>/<name>.md` and PNG plots.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from tqdm.auto import tqdm

from exitserve.loadtest.loadgen import run_load
from exitserve.loadtest.servers import exitserve_command, free_port, infinity_command, peer_command, running
from exitserve.models.backends import create_backend
from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.data import DEFAULT_DATA, load_examples
from exitserve.models.encoding import encode
from exitserve.models.evaluation import wall_clock
from exitserve.models.export import export_hf
from exitserve.models.inference import predict


def machine() -> dict:
    return {"cpus": torch.get_num_threads(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "date": date.today().isoformat()}


def sentences(data: str, limit: int | None) -> list[str]:
    _, rows = load_examples(data, "dev")
    return rows.texts[:limit] if limit else rows.texts


def library(checkpoint_dir: str, data: str, max_samples: int | None, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    ckpt = load_checkpoint(checkpoint_dir)
    cfg, backend = ckpt.exit_config, create_backend(ckpt)
    texts = sentences(data, max_samples)
    samples = encode(ckpt.tokenizer, texts, max_length=cfg.max_length)
    criterion = cfg.make_criterion()
    threshold = cfg.thresholds()[0]
    rows = []
    for batch_size in (1, 32):
        runs = wall_clock(backend, criterion, samples, [threshold, 1.0], batch_size)
        on, off = runs[0], runs[1]
        speedup = off["seconds"] / on["seconds"]
        ideal = cfg.num_layers / on["mean_exit_layer"]
        rows.append({"batch_size": batch_size, "threshold": threshold, "exits_on_s": on["seconds"],
                     "exits_off_s": off["seconds"], "mean_exit_layer": on["mean_exit_layer"],
                     "speedup": speedup, "ideal_speedup": ideal, "speedup_over_ideal": speedup / ideal})
    per_sample = []
    for s in tqdm(samples[:200], desc="batch-1 latency", unit="sample"):  # the first 200 inputs
        start = time.perf_counter()
        predict(backend, criterion, [s], cfg.thresholds())
        per_sample.append((time.perf_counter() - start) * 1000)
    return {"samples": len(samples), "num_layers": cfg.num_layers, "rows": rows,
            "model_p50_ms_batch1": statistics.median(per_sample)}


def server(
    checkpoint_dir: str, data: str, concurrencies: list[int], duration: float, threads: int | None,
    infinity: str | None = None,
) -> dict:
    texts = sentences(data, None)

    def body(threshold: float | None):
        def make(i: int) -> dict:
            payload: dict = {"text": texts[i % len(texts)]}
            if threshold is not None:
                payload["threshold"] = threshold
            return payload
        return make

    def infinity_body(i: int) -> dict:
        return {"input": [texts[i % len(texts)]], "model": "exported"}

    def exit_layer(resp: dict) -> int | None:
        return resp.get("exit_layer")

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(load_checkpoint(checkpoint_dir), Path(tmp) / "hf")
        port = free_port()
        settings = [f"torch_threads={threads}"] if threads else []
        # (name, command, env, route, readiness route, body)
        targets = [
            ("exitserve exits on", exitserve_command(checkpoint_dir, port, *settings), {}, "/predict", "/ready",
             body(None)),
            ("exitserve exits off", exitserve_command(checkpoint_dir, port, *settings), {}, "/predict", "/ready",
             body(1.0)),
            ("transformers pipeline peer", *peer_command(Path(tmp) / "hf", port), "/predict", "/ready", body(None)),
        ]
        if infinity:
            targets.append(("infinity-emb", infinity_command(infinity, Path(tmp) / "hf", port), {}, "/classify",
                            "/health", infinity_body))
        bar = tqdm(total=len(targets) * len(concurrencies), desc="server sweep", unit="point")
        for name, cmd, env, route, ready_path, make_body in targets:
            with running(cmd, port, env, threads, ready_path) as base:
                results[name] = []
                for c in concurrencies:
                    load = asyncio.run(run_load(f"{base}{route}", make_body, c, duration, exit_layer_of=exit_layer))
                    results[name].append(load.summary())
                    bar.update()
        bar.close()
    return {"duration_s": duration, "concurrencies": concurrencies, "servers": results}


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}", ""]
    lib = report.get("library")
    if lib:
        lines += ["| batch | threshold | exits on (s) | exits off (s) | mean exit layer | speed-up | ideal "
                  "| speed-up / ideal |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch_size']} | {r['threshold']} | {r['exits_on_s']:.2f} | {r['exits_off_s']:.2f} | "
                  f"{r['mean_exit_layer']:.2f} | {r['speedup']:.2f}× | {r['ideal_speedup']:.2f}× | "
                  f"{r['speedup_over_ideal']:.0%} |" for r in lib["rows"]]
        lines += ["", f"Model's own time per input at batch 1 (p50): {lib['model_p50_ms_batch1']:.2f} ms", ""]
    srv = report.get("server")
    if srv:
        lines += ["| server | concurrency | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | errors | mean exit |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, rows in srv["servers"].items():
            lines += [f"| {name} | {r['concurrency']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | "
                      f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
                      f"{'–' if r['mean_exit_layer'] is None else round(r['mean_exit_layer'], 2)} |"
                      for r in rows]
        lines += ["", *ratios(srv["servers"])]
    if "overhead_ms_c1" in report:
        lines += ["", f"Overhead at concurrency 1 (exits on p50 minus the model's own batch-1 p50): "
                      f"{report['overhead_ms_c1']:.2f} ms"]
    return "\n".join(lines) + "\n"


def ratios(servers: dict[str, list[dict]]) -> list[str]:
    """Throughput of exitserve (exits on) over each other server, per concurrency, from the same run."""
    ours = servers["exitserve exits on"]
    lines = ["| exits on vs | " + " | ".join(f"c={r['concurrency']}" for r in ours) + " |",
             "|---|" + "---|" * len(ours)]
    for name, rows in servers.items():
        if name != "exitserve exits on":
            lines.append(f"| {name} | " + " | ".join(
                f"{a['throughput_rps'] / b['throughput_rps']:.2f}×" if b["throughput_rps"] else "–"
                for a, b in zip(ours, rows, strict=True)) + " |")
    return lines


def plot(report: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    srv = report.get("server")
    if not srv:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rows in srv["servers"].items():
        conc = [r["concurrency"] for r in rows]
        axes[0].plot(conc, [r["throughput_rps"] for r in rows], marker="o", label=name)
        axes[1].plot(conc, [r["p50_ms"] for r in rows], marker="o", label=f"{name} p50")
        axes[1].plot(conc, [r["p99_ms"] for r in rows], ls=":", marker=".", label=f"{name} p99")
    axes[0].set(xscale="log", xlabel="concurrency", ylabel="requests / s", title="Throughput")
    axes[1].set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title="Latency")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    path = Path(f"{stem}_server.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["library", "server", "all"])
    p.add_argument("--checkpoint", default="server/default_model")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    p.add_argument("--threads", type=int, default=None, help="torch threads (library run and servers)")
    p.add_argument("--max-samples", type=int, default=None, help="library: dev subset")
    p.add_argument("--infinity", default=None, help="path of an infinity_emb executable: add it as a peer")
    p.add_argument("--out", default="docs/results/bench")
    p.add_argument("--name", default=None, help="file stem (default: the subcommand)")
    args = p.parse_args(argv)
    report: dict = {"machine": machine(), "checkpoint": args.checkpoint, "data": args.data}
    if args.what in ("library", "all"):
        report["library"] = library(args.checkpoint, args.data, args.max_samples, args.threads)
    if args.what in ("server", "all"):
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        report["server"] = server(args.checkpoint, args.data, concurrencies, args.duration, args.threads,
                                  args.infinity)
    if "library" in report and "server" in report:
        exits_on_c1 = report["server"]["servers"]["exitserve exits on"][0]
        report["overhead_ms_c1"] = exits_on_c1["p50_ms"] - report["library"]["model_p50_ms_batch1"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (args.name or args.what)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(report))
    for path in [Path(f"{stem}.json"), Path(f"{stem}.md"), *plot(report, stem)]:
        print(f"wrote {path}")
    print(markdown(report))


if __name__ == "__main__":
    main()
