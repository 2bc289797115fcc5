"""The speed benchmark behind docs/RESULTS.md: one command, every ratio measured side by side.

    python -m exitserve.loadtest.bench all --checkpoint server/default_model --data ../shared/data/glue/SST-2 \\
        --backend onnxruntime --out docs/results/bench --name sst2_ort [--pipeline] [--infinity PATH]

library: wall-clock of `Backend.run` on `--backend` over the dev split at batch 1 and 32, exits on
  (the calibrated threshold) vs off (threshold 1.0), against the ideal L / mean exit layer and against the
  same model run whole on ONNX Runtime (the strongest peer's graph, same batches); and the backend's own
  batch-1 latency (p50), which the server's overhead is measured against.
server (loadtest/bench_server.py): exitserve and the ONNX Runtime whole-model peer (loadtest/peer_ort.py:
  the same fine-tuned model exported with `exitserve export`, fused graph, FastAPI) running side by side,
  warmed up, measured interleaved over a closed-loop concurrency sweep; their memory (RSS) after it; the
  tail (Poisson arrivals at 70 % of exitserve's capacity); both at 70 % of the PEER's capacity; an SLO
  run (slo_ms = 3 x the unloaded p50, 90 % load); the other scheduling policies' capacity.
  `--pipeline` and `--infinity PATH` add the transformers-pipeline peer and infinity-emb
  (`--infinity-engine optimum|torch`, in its own virtualenv: docs/RESULTS.md) to the sweep, after it.
Writes `<out>/<name>.json`, `<out>/<name>.md` (tables, ratios, the issues' targets met or missed) and
PNG plots. The load generator shares the machine's cores with the servers: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from exitserve.loadtest.bench_report import EXITS_ON, PIPELINE_PEER, markdown, plot, targets
from exitserve.loadtest.bench_server import ServerPlan, measure
from exitserve.loadtest.loadgen import run_load
from exitserve.loadtest.servers import (
    INFINITY_ENGINES,
    free_port,
    infinity_command,
    peer_command,
    running,
)
from exitserve.models.backends import BACKENDS, create_backend, onnx_backend
from exitserve.models.backends.onnx_backend import pool_is_shared
from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.data import DEFAULT_DATA, load_examples
from exitserve.models.encoding import encode, pad_tokens
from exitserve.models.evaluation import wall_clock
from exitserve.models.export import export_hf
from exitserve.models.inference import length_batches, predict


def machine() -> dict:
    """Where and when; the load average says how busy the shared machine was."""
    import onnxruntime

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "date_utc": datetime.now(timezone.utc).isoformat(" ", "seconds"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


@dataclass
class Setup:
    """What every part of a run shares: the model, the data, and how exitserve is started."""

    checkpoint: str
    data: str
    backend: str
    threads: int | None = None
    settings: list[str] = field(default_factory=list)  # extra exitserve settings, NAME=VALUE

    def server_settings(self) -> list[str]:
        """exitserve's settings: the backend, its threads, and the extra ones given."""
        threads = [f"torch_threads={self.threads}", f"ort_threads={self.threads}"] if self.threads else []
        return [f"backend={self.backend}", *threads, *self.settings]


def sentences(data: str, limit: int | None) -> list[str]:
    _, rows = load_examples(data, "dev")
    return rows.texts[:limit] if limit else rows.texts


def prepare_models(checkpoint_dir: str, workdir: Path) -> Path:
    """The checkpoint exported as a stock HF classifier (what every peer serves), with the ONNX
    Runtime peer's fused graph beside it."""
    from exitserve.loadtest.peer_ort import build

    hf = export_hf(load_checkpoint(checkpoint_dir), workdir / "hf")
    build(hf)
    return hf


def whole_graph_seconds(hf_dir: Path, samples: list, batch_size: int, threads: int | None, shared_pool: bool) -> float:
    """Wall-clock of the fused whole graph over `samples` (already tokenised, the library's batches,
    the library's padding), best of 2 like `wall_clock`."""
    from exitserve.loadtest.peer_ort import WholeGraph

    graph = WholeGraph(hf_dir, threads, shared_pool=shared_pool)
    feeds = []
    for idx in length_batches(samples, batch_size):
        tokens = pad_tokens([samples[i] for i in idx], graph.tokenizer.pad_token_id)
        arrays = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask,
                  "token_type_ids": tokens.token_type_ids}
        feeds.append({name: arrays[name] for name in graph.inputs})
    graph.session.run(None, feeds[0])  # warm-up
    times = []
    for _ in range(2):
        start = time.perf_counter()
        for feed in feeds:
            graph.session.run(None, feed)
        times.append(time.perf_counter() - start)
    return min(times)


def library(setup: Setup, max_samples: int | None, hf_dir: Path) -> dict:
    """The library half (see the module docstring). On onnxruntime every session of this process runs on
    one shared thread pool, as in a server (the peer's whole graph included: ORT allows nothing else)."""
    threads = setup.threads
    if threads:
        torch.set_num_threads(threads)
    if setup.backend == "onnxruntime":
        onnx_backend.share_one_thread_pool(threads)
    ckpt = load_checkpoint(setup.checkpoint)
    cfg, backend = ckpt.exit_config, create_backend(ckpt, setup.backend)
    texts = sentences(setup.data, max_samples)
    samples = encode(ckpt.tokenizer, texts, max_length=cfg.max_length)
    criterion = cfg.make_criterion()
    threshold = cfg.thresholds()[0]
    rows = []
    for batch_size in (1, 32):
        on, off = wall_clock(backend, criterion, samples, [threshold, 1.0], batch_size)
        whole = whole_graph_seconds(hf_dir, samples, batch_size, threads, pool_is_shared())
        ideal = cfg.num_layers / on["mean_exit_layer"]
        speedup = off["seconds"] / on["seconds"]
        rows.append({"batch_size": batch_size, "threshold": threshold, "exits_on_s": on["seconds"],
                     "exits_off_s": off["seconds"], "whole_ort_s": whole, "mean_exit_layer": on["mean_exit_layer"],
                     "speedup": speedup, "ideal_speedup": ideal, "speedup_over_ideal": speedup / ideal,
                     "exits_off_vs_whole_ort": whole / off["seconds"], "exits_on_vs_whole_ort": whole / on["seconds"]})
    per_sample = []
    for s in tqdm(samples[:200], desc="batch-1 latency", unit="sample"):  # the first 200 inputs
        start = time.perf_counter()
        predict(backend, criterion, [s], cfg.thresholds())
        per_sample.append((time.perf_counter() - start) * 1000)
    return {"backend": setup.backend, "samples": len(samples), "num_layers": cfg.num_layers, "rows": rows,
            "model_p50_ms_batch1": statistics.median(per_sample)}


def infinity_dir(hf_dir: Path, engine: str, workdir: Path) -> Path:
    """What infinity serves: the exported classifier; for `optimum`, a copy holding only the raw ONNX
    export (infinity picks one ONNX file and optimises it itself, as its users' path does)."""
    if engine != "optimum":
        return hf_dir
    target = workdir / "infinity"
    target.mkdir(exist_ok=True)
    for path in hf_dir.iterdir():
        if path.is_file() and (path.suffix != ".onnx" or path.name == "model.onnx") and path.suffix != ".safetensors":
            shutil.copy(path, target / path.name)
    return target


def extra_peers(setup: Setup, concurrencies: list[int], duration: float, hf_dir: Path, pipeline: bool,
                infinity: str | None, infinity_engine: str) -> dict[str, list[dict]]:
    """The weaker peers' sweep, one server at a time after the main run: the transformers pipeline
    peer and infinity-emb (each only when asked)."""
    texts = sentences(setup.data, None)
    port = free_port()
    servers = []
    if pipeline:
        servers.append((*peer_command(hf_dir, port), None, "/ready", PIPELINE_PEER, "/predict",
                        lambda i: {"text": texts[i % len(texts)]}))
    if infinity:
        command = infinity_command(infinity, infinity_dir(hf_dir, infinity_engine, hf_dir.parent), port,
                                   infinity_engine)
        servers.append((*command, "/health", f"infinity-emb ({infinity_engine})", "/classify",
                        lambda i: {"input": [texts[i % len(texts)]], "model": "exported"}))
    results: dict[str, list[dict]] = {}
    for cmd, env, cwd, ready_path, name, route, make_body in servers:
        with running(cmd, port, env, setup.threads, ready_path, cwd) as base:
            results[name] = [asyncio.run(run_load(f"{base}{route}", make_body, c, duration)).summary()
                             for c in tqdm(concurrencies, desc=name, unit="point")]
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["library", "server", "all"])
    p.add_argument("--checkpoint", default="server/default_model")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="exitserve's runtime backend (library run, and the servers' `backend` setting)")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (library run and servers)")
    p.add_argument("--max-samples", type=int, default=None, help="library: dev subset")
    p.add_argument("--pipeline", action="store_true", help="add the transformers-pipeline peer")
    p.add_argument("--infinity", default=None, help="path of an infinity_emb executable: add it as a peer")
    p.add_argument("--infinity-engine", choices=INFINITY_ENGINES, default="optimum")
    p.add_argument("--tail-fraction", type=float, default=0.7, help="tail: offered load / measured capacity")
    p.add_argument("--tail-seconds", type=float, default=60.0, help="tail: seconds of Poisson arrivals")
    p.add_argument("--tail-measure-seconds", type=float, default=20.0,
                   help="tail: seconds of closed-loop load (32 clients) that measure the capacity")
    p.add_argument("--slo-factor", type=float, default=3.0, help="slo run: slo_ms = this x the unloaded p50 (0: off)")
    p.add_argument("--slo-load", type=float, default=0.9, help="slo run: offered load / capacity")
    p.add_argument("--policies", default="layered", help="other scheduling policies whose capacity is measured")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="an extra exitserve setting for the sweep and the tail run (e.g. max_batch_size=8)")
    p.add_argument("--out", default="docs/results/bench")
    p.add_argument("--name", default=None, help="file stem (default: the subcommand)")
    args = p.parse_args(argv)
    setup = Setup(args.checkpoint, args.data, args.backend, args.threads, args.set)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    report: dict = {"machine": machine(), "checkpoint": args.checkpoint, "data": args.data, "backend": args.backend,
                    "exitserve_settings": args.set}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = prepare_models(args.checkpoint, Path(tmp))
        if args.what in ("library", "all"):
            report["library"] = library(setup, args.max_samples, hf_dir)
        if args.what in ("server", "all"):
            plan = ServerPlan(args.checkpoint, setup.server_settings(), concurrencies, args.duration,
                              args.tail_fraction, args.tail_seconds, args.tail_measure_seconds, args.slo_factor,
                              args.slo_load, [p for p in args.policies.split(",") if p])
            report["server"] = measure(plan, hf_dir, sentences(args.data, None))
            report["server"]["backend"] = args.backend
            report["server"]["servers"].update(extra_peers(setup, concurrencies, args.duration, hf_dir, args.pipeline,
                                                           args.infinity, args.infinity_engine))
    if "library" in report and "server" in report:
        exits_on_c1 = report["server"]["servers"][EXITS_ON][0]
        report["overhead_ms_c1"] = exits_on_c1["p50_ms"] - report["library"]["model_p50_ms_batch1"]
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["targets"] = targets(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (args.name or args.what)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=2, default=_plain) + "\n")
    Path(f"{stem}.md").write_text(markdown(report))
    for path in [Path(f"{stem}.json"), Path(f"{stem}.md"), *plot(report, stem)]:
        print(f"wrote {path}")
    print(markdown(report))


def _plain(value):
    """JSON for numpy scalars."""
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    main()
