"""What the learned exit rule costs per step, against the step itself (issue 19: < 3 % at batch 1 and 32).

    python -m exitserve.loadtest.rule_cost [--checkpoint server/default_model] [--data ../shared/data/glue/SST-2]
        [--backend onnxruntime] [--max-samples 256] [--rounds 3] [--json docs/results/ort/rule_cost.json]

In one process, on real sentences in length-sorted batches of 1 and 32, for every layer k of every
batch: the backend's step (layer k + exit k, `Backend.layer`, what the scheduler and `predict` run),
then each criterion's `confidence` on that step's exit output with its memory carried layer to layer
(learned, max-prob, patience). Rounds interleave; each timing is the median over steps of a round and
the best round counts. The ratio rule / step is the share of a step the rule adds. On ONNX Runtime
the rule also runs inside the composed early-exit graph (what serving runs): that graph, composed for
`learned` and for `max-prob`, runs the same batches to the last layer (threshold 2: no row exits, so
every layer computes its rule), and `learned / max-prob − 1` is what the learned rule adds to a whole
run over max-prob's few nodes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from exitserve.loadtest.bench import machine
from exitserve.models.backends import create_backend
from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.data import DEFAULT_DATA, load_examples
from exitserve.models.encoding import encode
from exitserve.models.inference import length_batches

CRITERIA = ("learned", "max-prob", "patience")


def one_round(backend, criteria: dict, samples: list, batch_size: int) -> dict[str, float]:
    """Median microseconds per step: the backend's layer + exit, and each criterion on its output."""
    timings: dict[str, list[float]] = {"step": [], **{name: [] for name in criteria}}
    for idx in length_batches(samples, batch_size):
        batch = [samples[i] for i in idx]
        hidden = backend.embed(batch)
        attention = backend.attention([len(s) for s in batch])
        memories = {name: c.initial_memory(len(batch)) for name, c in criteria.items()}
        for k in range(backend.num_layers):
            start = time.perf_counter()
            hidden, out = backend.layer(k, hidden, attention, True)
            timings["step"].append(time.perf_counter() - start)
            for name, criterion in criteria.items():
                start = time.perf_counter()
                _, memories[name] = criterion.confidence(out.logits, out.lte, memories[name])
                timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e6 for name, values in timings.items()}


def in_graph(backend, cfg, samples: list, batch_size: int, rounds: int) -> dict[str, float]:
    """Seconds per whole run of the composed graph (threshold 2: every row to the last layer), composed
    for `learned` and for `max-prob`; best of `rounds`."""
    from exitserve.models.backends.onnx_backend import OnnxBackend

    batches = [[samples[i] for i in idx] for idx in length_batches(samples, batch_size)]
    out = {}
    for name in ("max-prob", "learned"):
        criterion = cfg.make_criterion(name)
        graph = OnnxBackend(backend.directory, backend.pad_id, criterion)
        never = [np.full((len(b), graph.num_layers), 2.0, np.float32) for b in batches]
        graph.run(batches[0], never[0], criterion)  # warm-up
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for batch, thresholds in zip(batches, never, strict=True):
                graph.run(batch, thresholds, criterion)
            times.append(time.perf_counter() - start)
        out[name] = min(times) / len(batches)
    return out


def measure(checkpoint_dir: str, data: str, backend_name: str, max_samples: int, rounds: int) -> dict:
    ckpt = load_checkpoint(checkpoint_dir)
    cfg = ckpt.exit_config
    if cfg.exit_rule is None:
        raise ValueError(f"{checkpoint_dir} has no learned exit rule (exitserve fit-exit-rule)")
    backend = create_backend(ckpt, backend_name)
    _, rows = load_examples(data, "dev", None, tuple(cfg.label_names) or None)
    rows = rows.subset(max_samples, seed=0)
    samples = encode(ckpt.tokenizer, rows.texts, rows.pairs, cfg.max_length)
    criteria = {name: cfg.make_criterion(name) for name in CRITERIA}
    results = {}
    for batch_size in (1, 32):
        one_round(backend, criteria, samples[:batch_size], batch_size)  # warm-up
        best = [one_round(backend, criteria, samples, batch_size) for _ in range(rounds)]
        median = {name: min(r[name] for r in best) for name in best[0]}
        results[batch_size] = {"microseconds": median,
                               "share_of_step": {name: median[name] / median["step"] for name in criteria}}
        if backend.name == "onnxruntime":
            whole = in_graph(backend, cfg, samples, batch_size, rounds)
            results[batch_size]["composed_graph_seconds"] = whole
            results[batch_size]["composed_learned_over_max_prob"] = whole["learned"] / whole["max-prob"] - 1
    return {"checkpoint": checkpoint_dir, "backend": backend.name, "samples": len(samples), "rounds": rounds,
            "batch": results, "machine": machine()}


def markdown(report: dict) -> str:
    lines = [f"Rule cost: {report['checkpoint']} on {report['backend']}, {report['samples']} sentences, "
             f"best of {report['rounds']} rounds; load average at start {report['machine']['load_average_at_start']}",
             "", "| batch | step (layer + exit) | " + " | ".join(CRITERIA) + " | learned / step "
             "| composed graph, whole run: learned vs max-prob |",
             "|---|---|" + "---|" * (len(CRITERIA) + 2)]
    for batch, r in report["batch"].items():
        us = r["microseconds"]
        extra = r.get("composed_learned_over_max_prob")
        composed = "–" if extra is None else f"{extra:+.2%}"
        lines.append(f"| {batch} | {us['step']:.0f} µs | " + " | ".join(f"{us[n]:.1f} µs" for n in CRITERIA)
                     + f" | {r['share_of_step']['learned']:.2%} | {composed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.rule_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="server/default_model")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="onnxruntime")
    p.add_argument("--max-samples", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the report here (and a .md beside it)")
    args = p.parse_args(argv)
    report = measure(args.checkpoint, args.data, args.backend, args.max_samples, args.rounds)
    print(markdown(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        path.with_suffix(".md").write_text(markdown(report) + "\n")


if __name__ == "__main__":
    main()
