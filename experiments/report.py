"""Tables and plots for the quality experiments, from the per-run JSONs of experiments.runner."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

STRATEGY_ORDER = ("raw", "two-stage", "joint", "alternating-epoch", "alternating", "weighted", "self-distill")


def _load(out: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    reports, timings = {}, {}
    for path in sorted(out.glob("*.json")):
        data = json.loads(path.read_text())
        (timings if path.stem.endswith("-timing") else reports)[path.stem] = data
    return reports, timings


def best_at(points: list[dict], target: float) -> dict | None:
    """The point saving the most layers among those scoring >= target (None if none does)."""
    passing = [p for p in points if p["score"] >= target]
    return max(passing, key=lambda p: (p["layers_saved"], p["score"])) if passing else None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layerwise(reports: dict[str, dict], out: Path) -> list[str]:
    """Experiment 1: every sample forced to exit at layer k, relative to Raw's final layer."""
    groups: dict[tuple[str, str, int], dict[str, dict]] = defaultdict(dict)
    for r in reports.values():
        if r["task"] != "STS-B":
            groups[(r["task"], r["backbone"], r["train_samples"])][r["strategy"]] = r
    lines = []
    plt = _plt()
    for (task, backbone, size), runs in sorted(groups.items()):
        raw = runs.get("raw")
        ref = raw["final_layer_score"] if raw else None
        any_run = next(iter(runs.values()))
        n_layers, metric = any_run["num_layers"], any_run["metric"]
        lines += [f"#### {task}, {backbone} ({size} training samples, "
                  f"{any_run['epochs']} epochs; {metric}" + (f", Raw = {ref:.4f})" if ref else ")"), "",
                  "| strategy | " + " | ".join(f"L{k}" for k in range(1, n_layers + 1)) + " |",
                  "|---|" + "---|" * n_layers]
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for strategy in [s for s in STRATEGY_ORDER if s in runs]:
            scores = [row["score"] for row in runs[strategy]["per_layer"]]
            shown = [s / ref for s in scores] if ref else scores
            if strategy == "raw":  # no exits were trained: only its final layer means something
                lines.append("| raw | " + "– | " * (n_layers - 1) + f"{shown[-1]:.3f} |")
                ax.axhline(shown[-1], color="grey", ls="--", label="raw (final layer)")
                continue
            lines.append(f"| {strategy} | " + " | ".join(f"{v:.3f}" for v in shown) + " |")
            ax.plot(range(1, n_layers + 1), shown, marker="o", label=strategy)
        ax.set(xlabel="exit layer (all samples forced)", ylabel=f"{metric} relative to Raw" if ref else metric,
               title=f"{task} — {backbone}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        png = out / f"exp1_{task.lower()}_{backbone}_n{size}.png"
        fig.savefig(png, dpi=120)
        plt.close(fig)
        lines += ["", f"![{task} {backbone}]({png.name})", "", *findings(runs, n_layers), "",
                  *strategy_summary(runs, ref, n_layers), ""]
    return lines


def strategy_summary(runs: dict[str, dict], ref: float | None, n_layers: int, level: float = 0.99) -> list[str]:
    """Per strategy: final layer and early exits relative to Raw, and the most layers saved by a
    threshold of the sweep that keeps >= `level` of Raw's final-layer score (best dev point)."""
    if not ref:
        return []
    half = n_layers // 2
    lines = [f"| strategy | final layer vs Raw | mean of layers 1–{half} vs Raw | most layers saved at ≥ {level} of "
             "Raw (threshold) |", "|---|---|---|---|"]
    for strategy in [s for s in STRATEGY_ORDER if s in runs and s != "raw"]:
        r = runs[strategy]
        scores = [row["score"] / ref for row in r["per_layer"]]
        best = best_at(r["sweep"], level * ref)
        saved = f"{best['layers_saved']:.1%} ({best['threshold']})" if best else "none"
        lines.append(f"| {strategy} | {scores[-1]:.3f} | {sum(scores[:half]) / half:.3f} | {saved} |")
    return lines


def findings(runs: dict[str, dict], n_layers: int) -> list[str]:
    """The seed's two findings, checked on these numbers."""
    out = []

    def mean(strategy: str, layers: range) -> float:
        per = runs[strategy]["per_layer"]
        return sum(per[k - 1]["score"] for k in layers) / len(layers)

    early, late = range(1, n_layers // 2 + 1), range(n_layers - 1, n_layers + 1)
    if {"two-stage", "alternating", "joint"} <= set(runs):
        ts, alt, jt = (mean(s, early) for s in ("two-stage", "alternating", "joint"))
        holds = ts < min(alt, jt)
        out.append(f"- two-stage weak at early layers (mean of layers 1–{n_layers // 2}): two-stage {ts:.4f}, "
                   f"alternating {alt:.4f}, joint {jt:.4f} → {'holds' if holds else 'does not hold'}")
    if {"alternating", "joint"} <= set(runs):
        alt, jt = mean("alternating", late), mean("joint", late)
        out.append(f"- alternating ≥ joint at late layers (mean of layers {n_layers - 1}–{n_layers}): "
                   f"alternating {alt:.4f}, joint {jt:.4f} → {'holds' if alt >= jt else 'does not hold'}")
    any_run = next(iter(runs.values()))
    score, n = any_run["final_layer_score"], any_run.get("samples")
    if out and n and 0 < score < 1:
        out.append(f"- noise: {n} dev samples, so one standard error of a score near {score:.2f} is about "
                   f"{(score * (1 - score) / n) ** 0.5:.3f}; smaller differences are not evidence either way")
    return out


def tradeoff(reports: dict[str, dict], timings: dict[str, dict], out: Path) -> list[str]:
    """Experiment 2: Raw, alternating at several thresholds, and the distillation analogue."""
    runs = {t["run"]: t for t in timings.values()}
    raws = [n for n in runs if reports[n]["strategy"] == "raw"]
    if not raws:
        return ["(experiment 2 not run yet)"]
    raw12 = max(raws, key=lambda n: reports[n]["num_layers"])  # the deepest Raw model plays BERT-base
    ref_report = reports[raw12]
    ref_score, ref_layers = ref_report["final_layer_score"], ref_report["num_layers"]
    ref_seconds = runs[raw12]["runs"][-1]["seconds"]
    lines = [f"Quality relative to Raw {ref_report['backbone']} ({ref_score:.4f} {ref_report['metric']}); layers "
             f"saved relative to its {ref_layers} layers; speed-up relative to the same model with exits off "
             f"(threshold 1.0) and, last column, to Raw {ref_report['backbone']}; batch 32, SST-2 dev, wall-clock.",
             "", "| model | threshold | quality vs Raw | mean exit layer | layers saved vs Raw "
             "| speed-up (exits on/off) | ideal | speed-up / ideal | speed-up vs Raw |",
             "|---|---|---|---|---|---|---|---|---|"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name in sorted(runs, key=lambda n: (-reports[n]["num_layers"], reports[n]["strategy"] != "raw")):
        report, timing = reports[name], runs[name]
        sweep = {row["threshold"]: row for row in report["sweep"]}
        points = []
        for row in timing["runs"]:
            t = row["threshold"]
            quality = (sweep[t]["score"] if t in sweep else report["final_layer_score"]) / ref_score
            label = f"{t}" + (" (calibrated 0.99)" if t == timing["calibrated_threshold"] and t < 1 else "")
            lines.append(
                f"| {report['strategy']} {report['backbone']} | {label} | {quality:.3f} | "
                f"{row['mean_exit_layer']:.2f} | "
                f"{1 - row['mean_exit_layer'] / ref_layers:.1%} | {row['speedup_vs_full']:.2f}× | "
                f"{row['ideal_speedup']:.2f}× | {row['speedup_vs_full'] / row['ideal_speedup']:.0%} | "
                f"{ref_seconds / row['seconds']:.2f}× |")
            points.append((ref_seconds / row["seconds"], quality))
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                label=f"{report['strategy']} {report['backbone']}")
    ax.set(xlabel=f"speed-up vs Raw {ref_report['backbone']} (wall-clock, batch 32)",
           ylabel="quality relative to Raw", title="SST-2: quality / speed trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "exp2_tradeoff.png", dpi=120)
    plt.close(fig)
    return [*lines, "", "![trade-off](exp2_tradeoff.png)"]


def fixed_depth(report: dict) -> list[dict]:
    """The fixed-depth baseline: every sample exits at layer k (the layer-wise scores)."""
    n = report["num_layers"]
    return [{"setting": f"layer {r['layer']}", "score": r["score"], "mean_exit_layer": r["layer"],
             "layers_saved": 1 - r["layer"] / n} for r in report["per_layer"]]


def regression(reports: dict[str, dict], out: Path, level: float = 0.99) -> list[str]:
    """Experiment 3: STS-B, the LTE and patience criteria against the fixed-depth baseline, per run."""
    runs: dict[str, dict[str, dict]] = defaultdict(dict)
    raw = None  # Raw trains no exits: only its final layer, the reference for the others'
    for r in reports.values():
        if r["task"] == "STS-B":
            if r["strategy"] == "raw":
                raw = r["final_layer_score"]
            else:
                runs[r["run"]][r["criterion"]] = r
    if not runs:
        return ["(experiment 3 not run yet)"]

    def cell(point: dict | None) -> str:
        if point is None:
            return "none"
        setting = point.get("setting") or f"threshold {point['threshold']}"
        return f"{setting}: {point['score']:.4f}, **{point['layers_saved']:.1%}** saved"

    lines = [f"Best point at ≥ {level} of the model's own final-layer Spearman, chosen on the dev pairs it is "
             "scored on (a frontier comparison, not a calibrated promise)"
             + (f"; final layer also relative to Raw ({raw:.4f})" if raw else "") + ":", "",
             "| run | final layer | fixed depth (every pair exits at layer k) | LTE | patience |",
             "|---|---|---|---|---|"]
    details = []
    plt = _plt()
    for name, by_criterion in sorted(runs.items()):
        any_report = next(iter(by_criterion.values()))
        final = any_report["final_layer_score"]
        target = level * final
        depth = fixed_depth(any_report)
        best_depth = best_at(depth, target)
        best = {c: best_at(r["sweep"], target) for c, r in by_criterion.items()}
        vs_raw = f" ({final / raw:.3f} of Raw)" if raw else ""
        lines.append(f"| {name} | {final:.4f}{vs_raw} | {cell(best_depth)} | {cell(best.get('lte'))} | "
                     f"{cell(best.get('patience'))} |")

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ax.plot([100 * p["layers_saved"] for p in depth], [p["score"] for p in depth], marker="s", color="black",
                label="fixed depth (layer k)")
        for criterion, r in sorted(by_criterion.items()):
            pts = sorted(r["sweep"], key=lambda row: row["layers_saved"])
            ax.plot([100 * p["layers_saved"] for p in pts], [p["score"] for p in pts], marker=".", label=criterion)
        ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"{level} × final layer")
        ax.set(xlabel="layers saved (%)", ylabel="Spearman", title=f"STS-B frontier: {name}",
               ylim=(max(0.0, min(p["score"] for p in depth[2:]) - 0.02), final + 0.01))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        png = out / f"exp3_{name}.png"
        fig.savefig(png, dpi=120)
        plt.close(fig)

        details += [f"#### {name}", "",
                    "| exit rule | setting | Spearman | relative | mean exit layer | layers saved |",
                    "|---|---|---|---|---|---|"]
        details += [f"| fixed depth | {p['setting']} | {p['score']:.4f} | {p['score'] / final:.3f} | "
                    f"{p['mean_exit_layer']:.2f} | {p['layers_saved']:.1%} |" for p in depth]
        for criterion, r in sorted(by_criterion.items()):
            shown = {0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9}
            if best[criterion]:
                shown.add(best[criterion]["threshold"])
            details += [f"| {criterion} | threshold {p['threshold']} | {p['score']:.4f} | {p['score'] / final:.3f} | "
                        f"{p['mean_exit_layer']:.2f} | {p['layers_saved']:.1%} |"
                        for p in r["sweep"] if p["threshold"] in shown]
        details += ["", f"![STS-B {name}]({png.name})", ""]
    return [*lines, "", *details]


def write_report(out: Path) -> Path:
    reports, timings = _load(out)
    text = ["## Experiment 1 — layer-wise scores", "", *layerwise(reports, out),
            "## Experiment 2 — quality / speed trade-off", "", *tradeoff(reports, timings, out), "",
            "## Experiment 3 — regression (STS-B)", "", *regression(reports, out), ""]
    path = out / "experiments.md"
    path.write_text("\n".join(text))
    return path
