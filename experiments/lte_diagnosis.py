"""Why the LTE criterion does or does not beat exiting every pair at one fixed layer (experiment 3).

    python -m exitserve.experiments.lte_diagnosis CHECKPOINT [--data ../shared/data/glue/STS-B]
                                                  [--json docs/results/experiments/lte-diagnosis.json]

One recorded pass over the dev split (every layer, every exit, the LTE outputs), then:

- per layer k: the LTE output's mean and spread across pairs, and its Spearman correlation, across
  the pairs of that layer, with what it is trained to predict (1 - tanh|y_k - y|, "error") and with
  the agreement of exit k with the final layer (1 - tanh|y_k - y_n|, "agreement"). A single
  threshold can only do better than a fixed depth if the LTE ranks pairs *within* a layer; if its
  output mostly moves with the layer, thresholding it is choosing a depth.
- two reference rules that look at answers no criterion has, swept over a tolerance d: exit at the
  first layer whose prediction lies within d of the final layer's ("agreement oracle": what a
  criterion that predicted agreement perfectly could reach) or within d of the label ("error
  oracle"). Each gets its best layers saved at >= 0.99 of the final layer's score.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.data import GLUE_DIR
from exitserve.models.encoding import encode
from exitserve.models.evaluation import load_split_for
from exitserve.models.inference import record_all_layers
from exitserve.models.scores import score

TOLERANCES = [round(d, 3) for d in np.arange(0.05, 3.0, 0.05)]


def oracle_frontier(values: torch.Tensor, reference: torch.Tensor, labels: np.ndarray, metric: str) -> list[dict]:
    """Exit at the first layer within d of `reference` `[N]` (the last layer always answers)."""
    num_layers = values.shape[0]
    rows = []
    for d in TOLERANCES:
        close = (values - reference).abs() < d
        close[-1] = True
        exit_index = close.float().argmax(0)  # first True
        chosen = values.gather(0, exit_index[None]).squeeze(0)
        mean_exit = float(exit_index.float().mean()) + 1
        rows.append({"tolerance": d, "score": score(metric, chosen.tolist(), labels),
                     "mean_exit_layer": mean_exit, "layers_saved": 1 - mean_exit / num_layers})
    return rows


def best_saved(rows: list[dict], target: float) -> dict | None:
    passing = [r for r in rows if r["score"] >= target]
    return max(passing, key=lambda r: r["layers_saved"]) if passing else None


def diagnose(checkpoint_path: str, data: str, level: float = 0.99) -> dict:
    ckpt = load_checkpoint(checkpoint_path)
    cfg = ckpt.exit_config
    if not cfg.regression or not cfg.use_lte:
        raise ValueError("the diagnosis is for regression checkpoints trained with the LTE module")
    _, rows = load_split_for(ckpt, data, "dev")
    samples = encode(ckpt.tokenizer, rows.texts, rows.pairs, cfg.max_length)
    with tqdm(total=len(samples), desc="recording all layers", unit="pair") as bar:
        recorded = record_all_layers(ckpt.model, samples, ckpt.tokenizer.pad_token_id, progress=bar)
    assert recorded.lte is not None
    values, lte, labels = recorded.logits[..., 0], recorded.lte, np.asarray(rows.labels, dtype=float)
    gold = torch.tensor(labels, dtype=values.dtype)
    error_target = 1 - torch.tanh((values - gold).abs())
    agreement = 1 - torch.tanh((values - values[-1]).abs())
    layers = []
    for k in range(cfg.num_layers):
        layers.append({
            "layer": k + 1,
            "score": score(cfg.metric, values[k].tolist(), labels),
            "lte_mean": float(lte[k].mean()), "lte_std": float(lte[k].std()),
            "target_mean": float(error_target[k].mean()),
            "lte_vs_error_spearman": float(spearmanr(lte[k], error_target[k])[0]),
            "lte_vs_agreement_spearman": (float(spearmanr(lte[k], agreement[k])[0])
                                          if k < cfg.num_layers - 1 else None),
        })
    final = layers[-1]["score"]
    agreement_rows = oracle_frontier(values, values[-1], labels, cfg.metric)
    error_rows = oracle_frontier(values, gold, labels, cfg.metric)
    return {
        "checkpoint": checkpoint_path, "samples": len(samples), "metric": cfg.metric, "level": level,
        "final_layer_score": final, "layers": layers,
        "agreement_oracle": agreement_rows, "error_oracle": error_rows,
        "best_agreement_oracle": best_saved(agreement_rows, level * final),
        "best_error_oracle": best_saved(error_rows, level * final),
    }


def format_diagnosis(report: dict) -> str:
    lines = ["| layer | Spearman | LTE mean | LTE std | target mean | LTE ~ error (Spearman) | LTE ~ agreement |",
             "|---|---|---|---|---|---|---|"]
    for r in report["layers"]:
        agree = "–" if r["lte_vs_agreement_spearman"] is None else f"{r['lte_vs_agreement_spearman']:.3f}"
        lines.append(f"| {r['layer']} | {r['score']:.4f} | {r['lte_mean']:.3f} | {r['lte_std']:.3f} | "
                     f"{r['target_mean']:.3f} | {r['lte_vs_error_spearman']:.3f} | {agree} |")
    lines.append("")
    for name in ("agreement", "error"):
        best = report[f"best_{name}_oracle"]
        lines.append(f"{name} oracle, best at >= {report['level']} of the final layer: " + (
            "none" if best is None else f"tolerance {best['tolerance']}: {best['score']:.4f}, "
            f"mean exit layer {best['mean_exit_layer']:.2f}, {best['layers_saved']:.1%} saved"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.experiments.lte_diagnosis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", default=f"{GLUE_DIR}/STS-B")
    p.add_argument("--json", default=None, help="write the full diagnosis here")
    args = p.parse_args(argv)
    report = diagnose(args.checkpoint, args.data)
    print(format_diagnosis(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
