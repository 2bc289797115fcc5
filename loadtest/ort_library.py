"""The ONNX Runtime backend's library-level benchmark: per-layer graphs vs the whole-model graph.

    python -m exitserve.loadtest.ort_library --checkpoint server/default_model --data ../shared/data/glue/SST-2 \
        [--max-samples 300] [--rounds 3] [--out docs/results/ort]

In one process, on the dev sentences, batch 1 and 32, rounds interleaved (the best round counts):
  - whole: the same model's final classifier as ONE ORT graph, as a user would make it
    (`exitserve export` -> `torch.onnx.export` opset 17 -> onnxruntime.transformers optimizer, fused
    attention), full depth, ORT defaults;
  - exitserve's onnxruntime backend (models/backends) exits off (threshold 1.0: no exit head before the
    last) and exits on (the calibrated threshold), fp32 and int8, through the library's `predict`;
and the ratios the targets are stated in: exits off / whole (>= 0.9), and exits on / (L / mean exit
layer x whole) (>= 0.85). Also int8 vs fp32 accuracy on the split, and the time from starting
`exitserve serve` to /ready with and without a cached export. Writes `<out>/ort_library.{json,md,png}`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from exitserve.loadtest.bench import machine
from exitserve.loadtest.servers import exitserve_command, free_port, wait_ready
from exitserve.models.backends import create_backend
from exitserve.models.checkpoint import Checkpoint, load_checkpoint
from exitserve.models.data import DEFAULT_DATA, load_examples
from exitserve.models.encoding import encode, pad_tokens
from exitserve.models.export import export_hf
from exitserve.models.inference import length_batches, predict


def whole_model_session(checkpoint: Checkpoint, workdir: Path) -> ort.InferenceSession:
    """The final classifier as one optimised ORT graph (what a whole-model ORT server runs)."""
    from onnxruntime.transformers import optimizer
    from transformers import AutoModelForSequenceClassification

    hf_dir = export_hf(checkpoint, workdir / "hf")
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir, attn_implementation="eager").eval()
    names = ["input_ids", "attention_mask", *(["token_type_ids"] if hf.config.model_type == "bert" else [])]
    dummy = tuple(torch.ones(1, 8, dtype=torch.long) for _ in names)
    raw = workdir / "whole.onnx"
    torch.onnx.export(hf, dummy, str(raw), input_names=names, output_names=["logits"], opset_version=17,
                      dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names}, dynamo=False)
    config = hf.config
    optimised = optimizer.optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size)
    optimised.save_model_to_file(str(workdir / "whole_opt.onnx"))
    return ort.InferenceSession(str(workdir / "whole_opt.onnx"), providers=["CPUExecutionProvider"])


def run_whole(session: ort.InferenceSession, samples: list, batch_size: int, pad_id: int) -> None:
    wanted = {i.name for i in session.get_inputs()}
    for idx in length_batches(samples, batch_size):
        tokens = pad_tokens([samples[i] for i in idx], pad_id)
        feeds = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask,
                 "token_type_ids": tokens.token_type_ids if tokens.token_type_ids is not None
                 else np.zeros_like(tokens.input_ids)}
        session.run(None, {k: v for k, v in feeds.items() if k in wanted})


def seconds_to_ready(checkpoint_dir: Path, cache: Path) -> float:
    """Wall-clock from `exitserve serve` starting to /ready answering 200."""
    port = free_port()
    env = {**os.environ, "EXITSERVE_CACHE": str(cache)}
    start = time.perf_counter()
    proc = subprocess.Popen(exitserve_command(checkpoint_dir, port), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=600)
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(30)


def start_up(checkpoint: Checkpoint, workdir: Path) -> dict:
    """To /ready without an export (it is built), then again with it cached."""
    linked = workdir / "startup-ckpt"
    linked.mkdir()
    for path in checkpoint.path.iterdir():
        if path.is_file():
            (linked / path.name).symlink_to(path.resolve())
    uncached = seconds_to_ready(linked, workdir / "cache")
    return {"uncached_s": uncached, "cached_s": seconds_to_ready(linked, workdir / "cache")}


def ideal_ratio(whole_ms: float, exits_on_ms: float, mean_exit: float, num_layers: int) -> float:
    """Exits on's speed over the ideal (L / mean exit layer) x the whole graph's: >= 0.85 is the target."""
    return (whole_ms * mean_exit / num_layers) / exits_on_ms


def accuracy(predictions: list, labels: list) -> float:
    return float(np.mean([p.label_id == int(y) for p, y in zip(predictions, labels, strict=True)]))


def measure(checkpoint_dir: str, data: str, max_samples: int | None, rounds: int) -> dict:
    ckpt = load_checkpoint(checkpoint_dir)
    cfg = ckpt.exit_config
    _, rows = load_examples(data, "dev")
    rows = rows.subset(max_samples, seed=0)
    samples = encode(ckpt.tokenizer, rows.texts, rows.pairs, cfg.max_length)
    criterion, num_layers, pad_id = cfg.make_criterion(), cfg.num_layers, ckpt.tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        whole = whole_model_session(ckpt, workdir)
        fp32, int8 = create_backend(ckpt, "onnxruntime"), create_backend(ckpt, "onnxruntime", "int8")
        thresholds = {"fp32": cfg.threshold_for(None), "int8": cfg.threshold_for(int8.calibration_key)}
        answers = {}

        def engine(backend, name: str, threshold, batch_size: int):
            def go():
                answers[name, batch_size] = predict(backend, criterion, samples, cfg.thresholds(threshold), batch_size)
            return go

        report_rows = []
        for batch_size in (1, 32):
            runs = {
                "whole": lambda b=batch_size: run_whole(whole, samples, b, pad_id),
                "exits_off": engine(fp32, "off", 1.0, batch_size),
                "exits_on": engine(fp32, "on", thresholds["fp32"], batch_size),
                "int8_exits_off": engine(int8, "int8_off", 1.0, batch_size),
                "int8_exits_on": engine(int8, "int8_on", thresholds["int8"], batch_size),
            }
            for run in runs.values():  # warm-up
                run()
            best = {name: float("inf") for name in runs}
            loads = []
            for _ in range(rounds):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - start)
                loads.append(os.getloadavg()[0])
            ms = {name: 1000 * s / len(samples) for name, s in best.items()}
            mean_exit = float(np.mean([p.exit_layer for p in answers["on", batch_size]]))
            mean_exit_int8 = float(np.mean([p.exit_layer for p in answers["int8_on", batch_size]]))
            report_rows.append({
                "batch_size": batch_size, "ms_per_sample": ms, "mean_exit_layer": mean_exit,
                "mean_exit_layer_int8": mean_exit_int8, "load_1min": loads,
                "exits_off_vs_whole": ms["whole"] / ms["exits_off"],
                "exits_on_vs_ideal": ideal_ratio(ms["whole"], ms["exits_on"], mean_exit, num_layers),
                "int8_exits_off_vs_fp32": ms["exits_off"] / ms["int8_exits_off"],
            })
        labels = rows.labels
        quality = {name: accuracy(answers[name, 32], labels) for name in ("off", "on", "int8_off", "int8_on")}
        startup = start_up(ckpt, workdir)
    return {"machine": machine(), "onnxruntime": ort.__version__, "checkpoint": checkpoint_dir, "data": data,
            "samples": len(samples), "num_layers": num_layers, "thresholds": thresholds, "rows": report_rows,
            "accuracy": quality, "startup": startup}


def markdown(report: dict) -> str:
    lines = [f"{report['samples']} {report['data']} dev sentences, {report['num_layers']} layers, "
             f"onnxruntime {report['onnxruntime']}, {report['machine']['date_utc']}", "",
             "| batch | whole graph | exits off | exits on (mean exit) | int8 off | int8 on | off / whole | "
             "on / ideal | load (1 min) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ms = r["ms_per_sample"]
        lines.append(
            f"| {r['batch_size']} | {ms['whole']:.2f} ms | {ms['exits_off']:.2f} ms | {ms['exits_on']:.2f} ms "
            f"({r['mean_exit_layer']:.2f}) | {ms['int8_exits_off']:.2f} ms | {ms['int8_exits_on']:.2f} ms "
            f"({r['mean_exit_layer_int8']:.2f}) | {r['exits_off_vs_whole']:.2f}x | {r['exits_on_vs_ideal']:.2f} | "
            f"{min(r['load_1min']):.1f}–{max(r['load_1min']):.1f} |")
    acc, start = report["accuracy"], report["startup"]
    lines += ["", f"accuracy: fp32 exits off {acc['off']:.4f}, on {acc['on']:.4f} (threshold "
              f"{report['thresholds']['fp32']}); int8 exits off {acc['int8_off']:.4f}, on {acc['int8_on']:.4f} "
              f"(threshold {report['thresholds']['int8']})",
              f"start-up to /ready: {start['uncached_s']:.1f} s building the export, {start['cached_s']:.1f} s cached"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["whole", "exits_off", "exits_on", "int8_exits_off", "int8_exits_on"]
    fig, axes = plt.subplots(1, len(report["rows"]), figsize=(10, 3.5))
    for ax, row in zip(axes, report["rows"], strict=True):
        ax.bar(range(len(names)), [row["ms_per_sample"][n] for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
        ax.set(title=f"batch {row['batch_size']}", ylabel="ms / sentence")
    fig.suptitle("ONNX Runtime: whole-model graph vs exitserve's per-layer graphs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="server/default_model")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--max-samples", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="docs/results/ort")
    args = parser.parse_args(argv)
    report = measure(args.checkpoint, args.data, args.max_samples, args.rounds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ort_library.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "ort_library.md").write_text(markdown(report))
    plot(report, out / "ort_library.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
