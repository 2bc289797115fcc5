"""Checkpoints side by side, from what each one stores: layer-wise dev scores and its calibration.

    python -m exitserve.experiments.compare NAME=CHECKPOINT [NAME=CHECKPOINT ...] --output STEM

Prints a markdown table (score per layer; calibrated threshold, score, share of the final layer's
score, mean exit layer, layers saved, and layers saved as a multiple of the first checkpoint's) and
writes STEM.png: the layer-wise curves and each model's calibrated operating point. Nothing is
recomputed: the numbers are the ones `exitserve train` / `calibrate` stored (and `exitserve serve`
uses), so the table matches what each model serves.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from exitserve.models.exit_config import ExitConfig


def load(specs: list[str]) -> dict[str, ExitConfig]:
    """NAME=CHECKPOINT pairs -> exit configs (each must hold dev scores and a calibration)."""
    configs = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise ValueError(f"{spec!r}: expected NAME=CHECKPOINT")
        cfg = ExitConfig.read(Path(path))
        if not cfg.dev_scores.get("per_layer") or not cfg.calibration:
            raise ValueError(f"{path}: no dev scores or no calibration to compare")
        configs[name] = cfg
    return configs


def table(configs: dict[str, ExitConfig]) -> list[str]:
    layers = max(cfg.num_layers for cfg in configs.values())
    first = next(iter(configs.values())).calibration
    assert first is not None
    lines = [
        "| model | " + " | ".join(f"L{k}" for k in range(1, layers + 1))
        + " | calibrated at | threshold | score | of final | mean exit layer | layers saved | saved vs first |",
        "|---|" + "---|" * (layers + 7),
    ]
    for name, cfg in configs.items():
        c = cfg.calibration
        assert c is not None
        scores = [f"{row['score']:.4f}" for row in cfg.dev_scores["per_layer"]] + ["–"] * (layers - cfg.num_layers)
        ratio = c["layers_saved"] / first["layers_saved"] if first["layers_saved"] else float("nan")
        lines.append(
            f"| {name} | " + " | ".join(scores) + f" | {c['min_relative_score']} | {c['threshold']} | "
            f"{c['score']:.4f} | {c['relative_score']:.1%} | {c['mean_exit_layer']:.2f} | "
            f"{c['layers_saved']:.1%} | {ratio:.2f}× |"
        )
    return lines


def plot(configs: dict[str, ExitConfig], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, cfg in configs.items():
        rows, c = cfg.dev_scores["per_layer"], cfg.calibration
        assert c is not None
        line = ax.plot([r["layer"] for r in rows], [r["score"] for r in rows], marker="o", label=f"{name}: layer k")
        ax.plot([c["mean_exit_layer"]], [c["score"]], marker="*", ms=14, ls="", color=line[0].get_color(),
                label=f"{name}: calibrated ({c['layers_saved']:.0%} saved)")
    metric = next(iter(configs.values())).metric
    ax.set(xlabel="exit layer (curves: every input forced; stars: mean exit layer)", ylabel=f"dev {metric}",
           title="Layer-wise score and calibrated operating point")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m exitserve.experiments.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="NAME=CHECKPOINT")
    parser.add_argument("--output", required=True, help="the plot goes to OUTPUT.png")
    args = parser.parse_args(argv)
    configs = load(args.models)
    print("\n".join(table(configs)))
    print(f"wrote {plot(configs, Path(args.output + '.png'))}")


if __name__ == "__main__":
    main()
