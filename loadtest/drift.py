"""The drift demonstration: what the shadow audits and the autopilot show when the text shifts.

    python -m exitserve.loadtest.drift            # the default model and SST-2 dev; writes docs/results/audits/

Serves the checkpoint twice with `exitserve serve` -- the autopilot on (`target_agreement`), then
off -- with audits on, and sends both the same stream, one request of `--batch` texts at a time:

  1. in-distribution: the first half of the SST-2 dev sentences;
  2. shifted: mixed reviews -- two dev sentences of opposite labels joined by ", but " (longer
     text whose sentiment turns: the early exits tend to answer the first clause confidently);
  3. in-distribution again: the second half of the dev sentences.

After every request it waits until the server has no audit pending, then records /info: the
agreement of the served answers over the audit window, its lower bound, the default threshold,
and the request's layers saved. Writes <out>/drift.json, drift.md (the table) and drift.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from exitserve.loadtest.bench import machine
from exitserve.loadtest.servers import exitserve_command, free_port, running
from exitserve.models.data import DEFAULT_DATA, load_examples

PHASES = ("in-distribution", "shifted", "in-distribution again")


def mixed_reviews(texts: list[str], labels: list[int], count: int, seed: int) -> list[str]:
    """`count` reviews "A , but B": A and B dev sentences of opposite labels, the order alternating."""
    rng = random.Random(seed)
    pos = [t for t, y in zip(texts, labels, strict=True) if y == 1]
    neg = [t for t, y in zip(texts, labels, strict=True) if y == 0]
    out = []
    for i in range(count):
        first, second = (rng.choice(pos), rng.choice(neg)) if i % 2 else (rng.choice(neg), rng.choice(pos))
        out.append(f"{first.strip().rstrip(' .')} , but {second.strip()}")
    return out


def make_stream(data: str, shifted: int, seed: int, dev: int | None = None) -> list[tuple[str, str]]:
    """(phase, text) in sending order; `dev` limits the dev sentences used (default: all)."""
    _, rows = load_examples(data, "dev")
    texts, half = rows.texts[:dev], len(rows.texts[:dev]) // 2
    mixed = mixed_reviews(rows.texts, [int(y) for y in rows.labels], shifted, seed)
    return ([(PHASES[0], t) for t in texts[:half]] + [(PHASES[1], t) for t in mixed]
            + [(PHASES[2], t) for t in texts[half:]])


def batches(stream: list[tuple[str, str]], size: int) -> list[list[tuple[str, str]]]:
    """Consecutive requests of at most `size` texts, none spanning two phases."""
    out: list[list[tuple[str, str]]] = []
    for item in stream:
        if not out or len(out[-1]) == size or out[-1][-1][0] != item[0]:
            out.append([])
        out[-1].append(item)
    return out


def wait_for_audits(client: httpx.Client, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while (audits := client.get("/info").json()["audits"])["pending"] and time.monotonic() < end:
        time.sleep(0.05)
    return audits


def feed(client: httpx.Client, stream: list[tuple[str, str]], batch: int, bar: tqdm) -> tuple[list[dict], dict]:
    """Send the stream through `client` (its base URL: the server), in requests of at most `batch`
    texts of one phase; one record per request, taken once the request's audits have finished."""
    records, sent = [], 0
    for part in batches(stream, batch):
        r = client.post("/predict", json={"text": [t for _, t in part]})
        r.raise_for_status()
        results = r.json()["results"]
        sent += len(part)
        audits = wait_for_audits(client)
        pilot = audits["autopilot"]
        records.append({
            "phase": part[0][0], "inputs": len(part), "sent": sent, "audited": audits["audited"],
            "dropped": audits["dropped"], "agreement": audits["agreement"], "lower_bound": audits["lower_bound"],
            "threshold": results[0]["threshold"],
            "layers_saved": statistics.fmean(x["num_layers"] - x["exit_layer"] for x in results),
            "replayed_bound": pilot["lower_bound_at_threshold"] if pilot else None,
        })
        bar.update(len(part))
    return records, client.get("/info").json()


def recovery(records: list[dict], target: float, key: str) -> dict:
    """How `key` (agreement or lower_bound) behaved in the shifted phase, counted in audited inputs
    since the shift began: when it first fell below the target, its minimum, its value at the end of
    the phase, and after how many audits it was back at or above the target for the rest of the phase
    (None: still below at the end)."""
    shift_at = max(r["audited"] for r in records if r["phase"] == PHASES[0])
    shifted = [r for r in records if r["phase"] == PHASES[1] and r[key] is not None]
    below = [i for i, r in enumerate(shifted) if r[key] < target]
    out = {"min": min(r[key] for r in shifted), "end": shifted[-1][key],
           "first_below_after": shifted[below[0]]["audited"] - shift_at if below else None,
           "back_after": None}
    if not below:
        out["back_after"] = 0  # never fell below
    elif below[-1] + 1 < len(shifted):
        out["back_after"] = shifted[below[-1] + 1]["audited"] - shift_at
    return out


def phase_rows(records: list[dict]) -> list[dict]:
    """Per phase: inputs, the window's agreement and bound and the threshold at its end, the highest
    threshold, and the layers saved per input."""
    rows = []
    for phase in PHASES:
        part = [r for r in records if r["phase"] == phase]
        inputs = sum(r["inputs"] for r in part)
        rows.append({"phase": phase, "inputs": inputs, "agreement_end": part[-1]["agreement"],
                     "lower_bound_end": part[-1]["lower_bound"], "threshold_end": part[-1]["threshold"],
                     "threshold_max": max(r["threshold"] for r in part),
                     "layers_saved": sum(r["layers_saved"] * r["inputs"] for r in part) / inputs})
    return rows


def summary(records: list[dict], info: dict, target: float) -> dict:
    return {"records": records, "phases": phase_rows(records), "final_info_audits": info["audits"],
            "recovery": {key: recovery(records, target, key) for key in ("agreement", "lower_bound")}}


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    target = report["target"]
    lines = [f"Machine: {report['machine']}; load average at start/end: {report['load_start']} / {report['load_end']}",
             "", f"Settings: {report['settings']}; autopilot target {target}.", "",
             "| run | phase | inputs | agreement (end) | lower bound (end) | threshold (end) | highest threshold "
             "| layers saved / input |", "|---|---|---|---|---|---|---|---|"]
    for run, data in report["runs"].items():
        lines += [f"| {run} | {r['phase']} | {r['inputs']} | {fmt(r['agreement_end'])} | {fmt(r['lower_bound_end'])} | "
                  f"{fmt(r['threshold_end'], 2)} | {fmt(r['threshold_max'], 2)} | {fmt(r['layers_saved'], 2)} |"
                  for r in data["phases"]]
    lines += ["", "After the shift (counted in audited inputs since it began):", "",
              "| run | series | first below target after | minimum | end of the shifted phase | back at/above "
              "target for good after |", "|---|---|---|---|---|---|"]
    for run, data in report["runs"].items():
        for key, rec in data["recovery"].items():
            first = "–" if rec["first_below_after"] is None else rec["first_below_after"]
            back = "not within the phase" if rec["back_after"] is None else rec["back_after"]
            lines.append(f"| {run} | {key} | {first} | {fmt(rec['min'])} | {fmt(rec['end'])} | {back} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for (run, data), colour in zip(report["runs"].items(), ("tab:blue", "tab:orange"), strict=False):
        recs = data["records"]
        x = [r["audited"] for r in recs]
        axes[0].plot(x, [r["agreement"] for r in recs], color=colour, label=f"{run}: agreement")
        axes[0].plot(x, [r["lower_bound"] for r in recs], color=colour, ls="--", label=f"{run}: lower bound")
        axes[1].plot(x, [r["threshold"] for r in recs], color=colour, label=run)
        saved, window = [], []
        for r in recs:  # rolling over the last ~200 inputs
            window = [*window, r][-max(1, 200 // r["inputs"]):]
            saved.append(sum(w["layers_saved"] * w["inputs"] for w in window) / sum(w["inputs"] for w in window))
        axes[2].plot(x, saved, color=colour, label=run)
    first = next(iter(report["runs"].values()))["records"]
    for phase, shade in zip(PHASES, (None, "0.9", None), strict=True):
        xs = [r["audited"] for r in first if r["phase"] == phase]
        if shade:
            for ax in axes:
                ax.axvspan(min(xs), max(xs), color=shade, zorder=0)
    axes[0].axhline(report["target"], color="k", lw=0.8, ls=":", label="target")
    axes[0].set(ylabel="agreement with the last layer", title="Shadow audits under drift (shaded: shifted text)")
    axes[1].set(ylabel="default threshold")
    axes[2].set(ylabel="layers saved / input (rolling)", xlabel="audited inputs")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.loadtest.drift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: the embedded model (server/default_model)")
    p.add_argument("--data", default=DEFAULT_DATA, help="an SST-2-style task directory (dev split, labels 0/1)")
    p.add_argument("--target", type=float, default=0.92, help="target_agreement of the autopilot run")
    p.add_argument("--audit-rate", type=float, default=1.0, help="audit every input: the demo needs few inputs")
    p.add_argument("--window", type=int, default=300, help="audit_window")
    p.add_argument("--min-samples", type=int, default=50, help="autopilot_min_samples")
    p.add_argument("--step", type=float, default=0.05, help="autopilot_step")
    p.add_argument("--shifted", type=int, default=872, help="mixed reviews in the shifted phase")
    p.add_argument("--dev", type=int, default=None, help="dev sentences in the in-distribution phases (default: all)")
    p.add_argument("--batch", type=int, default=8, help="texts per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/audits")
    args = p.parse_args(argv)

    stream = make_stream(args.data, args.shifted, args.seed, args.dev)
    common = [f"audit_rate={args.audit_rate}", f"audit_window={args.window}", "access_log=false", "warmup=false",
              "log_level=warning"]
    autopilot = [f"target_agreement={args.target}", f"autopilot_min_samples={args.min_samples}",
                 f"autopilot_step={args.step}"]
    report: dict = {"machine": machine(), "load_start": os.getloadavg(), "checkpoint": args.checkpoint or "embedded",
                    "target": args.target, "settings": " ".join(common + autopilot), "runs": {}}
    bar = tqdm(total=2 * len(stream), desc="drift demo", unit="input")
    for run, extra in (("autopilot on", autopilot), ("autopilot off", [])):
        port = free_port()
        with (running(exitserve_command(args.checkpoint, port, *common, *extra), port, ready_timeout=600) as base,
              httpx.Client(base_url=base, timeout=60) as client):
            records, info = feed(client, stream, args.batch, bar)
        report["runs"][run] = summary(records, info, args.target)
    bar.close()
    report["load_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "drift.md").write_text(markdown(report))
    for path in (out / "drift.json", out / "drift.md", plot(report, out / "drift.png")):
        print(f"wrote {path}")
    print(markdown(report))


if __name__ == "__main__":
    main()
