"""Exit rules side by side on the same report rows, each with its threshold risk-controlled on the
same calibration rows (docs/CALIBRATION.md, "Which exit rule").

    python -m exitserve.experiments.exit_rules --checkpoint server/default_model \\
        --data runs/default-model/SST-2 --split pool [--out docs/results/calibration]

The checkpoint must hold a learned rule fitted on these rows and a calibration record made on them
(`exitserve fit-exit-rule` then `exitserve calibrate`): its rule rows fit every rule that needs
fitting, its calibration rows choose every threshold (Learn-then-Test, quality risk, --max-drop,
--confidence), and the rows left report them. One recorded pass; the rules:

  max-prob, entropy   the criteria (one threshold for all layers)
  patience+max-prob   max-prob, but only where the previous exit gave the same answer (PABEE + BERxiT)
  per-layer max-prob  one max-prob threshold per layer: a path from "every layer" down, fitted on the rule
                      rows greedily (each step lowers the layer threshold that saves the most layers per
                      disagreement added); Learn-then-Test walks the path
  LTE                 BERxiT's learned-to-exit module: one linear layer + sigmoid shared by all layers, on
                      each exit's pooled state, fitted here on the rule rows with target agreement with the
                      final layer (the checkpoint has no LTE module of its own when trained without one)
  learned             the checkpoint's rule (models/exit_rule.py)
  oracle              exit at the first layer whose answer is the final one (no threshold; not a rule)

Writes JSON, a markdown table and a PNG (each rule's trade-off on the report rows, its chosen point marked).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from exitserve.experiments.calibration_splits import machine
from exitserve.models.answers import AllExits, answers
from exitserve.models.backends.torch_backend import TorchBackend
from exitserve.models.calibration import RiskMethod, Rows, measure
from exitserve.models.checkpoint import Checkpoint, load_checkpoint
from exitserve.models.encoding import encode
from exitserve.models.evaluation import (
    LEARNED_GRID,
    SWEEP_GRID,
    ExitTable,
    decision_table,
    exit_index,
    layer_confidences,
    load_split_for,
)
from exitserve.models.holdout import calibration_rows, rule_rows
from exitserve.models.inference import length_batches
from exitserve.models.rule_fitting import agreement


def record_with_pooled(checkpoint: Checkpoint, samples: list, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Every exit's logits `[L, N, C]` and pooled state `[L, N, H]` (what an LTE module reads)."""
    model = checkpoint.model
    backend = TorchBackend(model, checkpoint.tokenizer.pad_token_id)
    logits = np.zeros((model.num_layers, len(samples), model.num_outputs), np.float32)
    pooled = np.zeros((model.num_layers, len(samples), model.config.hidden_size), np.float32)
    with torch.inference_mode(), tqdm(total=len(samples), desc="recording exits and pooled states") as bar:
        for idx in length_batches(samples, batch_size):
            batch = [samples[i] for i in idx]
            lengths = np.array([len(s) for s in batch])
            hidden, attention = backend.embed(batch), backend.attention(lengths)
            for k in range(model.num_layers):
                hidden = model.run_layer(k, hidden, attention.layer_inputs)
                logits[k, idx], pooled[k, idx] = (t.float().numpy() for t in model.heads[k](hidden, attention.mask))
            bar.update(len(idx))
    return logits, pooled


def per_layer_path(maxprob: np.ndarray, agree: np.ndarray, fit: np.ndarray) -> list[list[float]]:
    """Per-layer max-prob thresholds from "no early exit" down to "all exit at layer 1", fitted on rows
    `fit`: each step lowers, by one notch of the sweep grid, the layer whose move saves the most layers
    per disagreement added on those rows (a move that adds none goes first)."""
    grid = sorted(SWEEP_GRID, reverse=True)
    num_layers = maxprob.shape[0]
    notch = [0] * (num_layers - 1)  # index into `grid` per early layer

    def cost(notches: list[int]) -> tuple[float, float]:
        exits = exit_index(maxprob[:, fit], [grid[n] for n in notches] + [1.0])
        return float(exits.mean()), float((~agree[exits, fit]).mean())

    path = [[grid[n] for n in notch] + [1.0]]
    depth, wrong = cost(notch)
    while any(n < len(grid) - 1 for n in notch):
        best = None
        for k in range(num_layers - 1):
            if notch[k] == len(grid) - 1:
                continue
            trial = [*notch[:k], notch[k] + 1, *notch[k + 1 :]]
            new_depth, new_wrong = cost(trial)
            gain, loss = depth - new_depth, new_wrong - wrong
            value = (np.inf if loss <= 0 else gain / loss, gain)
            if best is None or value > best[0]:
                best = (value, trial, new_depth, new_wrong)
        _, notch, depth, wrong = best
        path.append([grid[n] for n in notch] + [1.0])
    return path


def path_table(maxprob: np.ndarray, layer_answers: np.ndarray, path: list[list[float]]) -> ExitTable:
    """An exit table whose "thresholds" are positions on a per-layer path (1.0: its safe end)."""
    exits = np.stack([exit_index(maxprob, t) for t in path])
    rows = np.arange(maxprob.shape[1])
    return ExitTable([1.0 - j / len(path) for j in range(len(path))], layer_answers[exits, rows].astype(float),
                     exits + 1, layer_answers[-1].astype(float), maxprob.shape[0], False)


def lte_confidences(pooled: np.ndarray, agree: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """A BERxiT LTE module (one linear layer + sigmoid shared by all layers) fitted on the rule rows'
    exits 1..L-1, target: the exit agrees with the final layer."""
    from sklearn.linear_model import LogisticRegression

    layers = pooled.shape[0] - 1
    x = pooled[:layers, fit].reshape(-1, pooled.shape[2])
    model = LogisticRegression(C=1.0, max_iter=3000).fit(x, agree[:layers, fit].reshape(-1))
    scores = model.predict_proba(pooled.reshape(-1, pooled.shape[2]))[:, 1]
    return scores.reshape(pooled.shape[:2]).astype(np.float32)


def compare(checkpoint_path: str, data: str, split: str, max_drop: float, confidence: float) -> dict:
    ckpt = load_checkpoint(checkpoint_path)
    cfg = ckpt.exit_config
    if cfg.exit_rule is None or cfg.regression:
        raise ValueError("the comparison needs a classifier with a learned exit rule (exitserve fit-exit-rule)")
    spec, examples = load_split_for(ckpt, data, split)
    fit = rule_rows(cfg.exit_rule.fitted, examples)
    chosen = calibration_rows(cfg.calibration, examples)
    if not len(fit) or chosen is None:
        raise ValueError(f"the checkpoint's rule and threshold were not both fitted on {split} of {data}")
    report = np.setdiff1d(np.arange(len(examples)), np.union1d(fit, chosen))
    samples = encode(ckpt.tokenizer, examples.texts, examples.pairs, cfg.max_length)
    logits, pooled = record_with_pooled(ckpt, samples)
    recorded_answers = answers(logits, False)
    recorded = AllExits(logits, None)
    agree = agreement(recorded, False, None)
    maxprob = layer_confidences(recorded, cfg.make_criterion("max-prob"))
    same = np.vstack([np.zeros((1, len(examples)), bool), recorded_answers[1:] == recorded_answers[:-1]])
    tables = {
        "max-prob": decision_table(maxprob, recorded_answers, SWEEP_GRID, False),
        "entropy": decision_table(layer_confidences(recorded, cfg.make_criterion("entropy")), recorded_answers,
                                  SWEEP_GRID, False),
        "patience+max-prob": decision_table(np.where(same, maxprob, 0.0), recorded_answers, SWEEP_GRID, False),
        "per-layer max-prob": path_table(maxprob, recorded_answers, per_layer_path(maxprob, agree, fit)),
        "LTE (fitted post hoc)": decision_table(lte_confidences(pooled, agree, fit), recorded_answers,
                                                LEARNED_GRID, False),
        "learned": decision_table(layer_confidences(recorded, cfg.make_criterion("learned")), recorded_answers,
                                  LEARNED_GRID, False),
    }
    labels = np.asarray(examples.labels, dtype=float)
    method = RiskMethod("quality", max_drop, confidence)
    results = {}
    for name, table in tables.items():
        everyone = Rows(table, labels, spec.metric)
        threshold = method.choose(everyone.take(chosen)).threshold
        on_report = everyone.take(report)
        results[name] = {"threshold": threshold, **measure(on_report, threshold),
                         "curve": [measure(on_report, t) for t in table.thresholds]}
    first = agree.argmax(axis=0)  # the oracle: the first layer agreeing with the final one
    oracle = ExitTable([0.0], recorded_answers[first, np.arange(len(first))][None].astype(float), first[None] + 1,
                       recorded_answers[-1].astype(float), cfg.num_layers, False)
    results["oracle (first layer = final answer)"] = {"threshold": None, **measure(
        Rows(oracle, labels, spec.metric).take(report), 0.0)}
    return {
        "settings": {"checkpoint": checkpoint_path, "data": data, "split": split, "rows": len(examples),
                     "rule_rows": len(fit), "calibration_rows": len(chosen), "report_rows": len(report),
                     "max_drop": max_drop, "confidence": confidence, "risk": "quality", "metric": spec.metric,
                     "rule": cfg.exit_rule.describe(),
                     "command": "python -m exitserve.experiments.exit_rules " + " ".join(sys.argv[1:]),
                     "machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
        "results": results,
    }


def markdown(study: dict) -> str:
    s = study["settings"]
    lines = [
        f"# Exit rules on the same rows: {s['rule_rows']} fit, {s['calibration_rows']} calibrate, "
        f"{s['report_rows']} report",
        "",
        f"Checkpoint `{s['checkpoint']}`, data `{s['data']}` ({s['split']}, {s['rows']} rows). Thresholds: "
        f"Learn-then-Test, {s['risk']} risk ≤ {s['max_drop']} with confidence {s['confidence']}, on the "
        "calibration rows; everything below on the report rows.",
        "",
        f"Command: `{s['command']}`  ",
        f"Machine: {s['machine']}; {s['date']}.",
        "",
        "| rule | threshold | layers saved | mean exit layer | accuracy / final layer's | quality risk | "
        "disagreement with the final layer |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in study["results"].items():
        threshold = "–" if r["threshold"] is None else f"{r['threshold']:.4g}"
        lines.append(f"| {name} | {threshold} | {r['layers_saved']:.1%} | {r['mean_exit_layer']:.2f} | "
                     f"{r['relative_score']:.4f} | {r['quality_risk']:.4f} | {r['consistency_risk']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(study: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in study["results"].items():
        if "curve" in r:
            line = ax.plot([c["layers_saved"] for c in r["curve"]], [c["relative_score"] for c in r["curve"]],
                           lw=1.2, label=name)
            color = line[0].get_color()
        else:
            color = "black"
        ax.plot([r["layers_saved"]], [r["relative_score"]], marker="*" if "curve" in r else "X", ms=12, ls="",
                color=color, label=None if "curve" in r else name)
    ax.axhline(0.99, color="grey", ls="--", lw=0.8, label="0.99 × final layer")
    s = study["settings"]
    ax.set(xlabel="layers saved (report rows)", ylabel=f"{s['metric']} / final layer's (report rows)",
           title=f"Exit rules; stars: the threshold Learn-then-Test chose (risk ≤ {s['max_drop']})", ylim=(0.9, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.experiments.exit_rules", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="dev")
    p.add_argument("--max-drop", type=float, default=0.01)
    p.add_argument("--confidence", type=float, default=0.9)
    p.add_argument("--out", default="docs/results/calibration")
    p.add_argument("--name", default="exit-rules")
    args = p.parse_args(argv)
    study = compare(args.checkpoint, args.data, args.split, args.max_drop, args.confidence)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / args.name
    Path(f"{stem}.json").write_text(json.dumps(study, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(study))
    plot(study, Path(f"{stem}.png"))
    print(markdown(study))
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")


if __name__ == "__main__":
    main()
