"""Statistics over request records, and the outputs of a run: JSON, a printed table, a PNG plot."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from exitserve.loadtest.reliability.client import Phase, Record

MIB = 2**20


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def summarise(records: list[Record], name: str, start: float, seconds: float, offered: float) -> dict:
    """One phase (sent from `start` for `seconds`): statuses, wrong answers and latencies (of 200s and
    of refusals) of the requests it sent; `answered_rps`: 200s completed during the phase, per second."""
    rows = [r for r in records if r.phase == name]
    ok = [r.latency for r in rows if r.status == 200]
    refused = [r.latency for r in rows if r.status in (429, 503)]
    completed = sum(r.status == 200 and start <= r.at + r.latency < start + seconds for r in records)
    return {
        "phase": name, "seconds": seconds, "offered_rps": round(offered, 1), "sent": len(rows),
        "answered_rps": round(completed / seconds, 1),
        "statuses": dict(sorted(Counter(str(r.status) for r in rows).items())),
        "errors": dict(Counter(r.error for r in rows if r.error)),
        "wrong_answers": sum(r.correct is False for r in rows),
        "ok_p50_ms": ms(pct(ok, 50)), "ok_p95_ms": ms(pct(ok, 95)), "ok_p99_ms": ms(pct(ok, 99)),
        "ok_max_ms": ms(max(ok, default=None)),
        "refused_p50_ms": ms(pct(refused, 50)), "refused_p99_ms": ms(pct(refused, 99)),
        "generator_late_p99_ms": ms(pct([r.late for r in rows], 99)),
    }


def summarise_phases(records: list[Record], phases: list[Phase]) -> list[dict]:
    starts = [sum(p.seconds for p in phases[:i]) for i in range(len(phases))]
    return [summarise(records, p.name, start, p.seconds, p.rate) for p, start in zip(phases, starts, strict=True)]


def cpu_cores(samples: list[tuple[float, int, float, float]], lo: float, hi: float, which: int) -> float | None:
    """Average cores used between `lo` and `hi` (sample clock) by the server (which=2) or the generator (3)."""
    inside = [s for s in samples if lo <= s[0] < hi]
    if len(inside) < 2:
        return None
    return round((inside[-1][which] - inside[0][which]) / (inside[-1][0] - inside[0][0]), 2)


def windows(records: list[Record], samples: list[tuple[float, int, float, float]], width: float,
            offset: float = 0.0) -> list[dict]:
    """Per `width`-second window of scheduled send time: statuses, 200 latencies, peak server RSS and
    the cores used by the server and the generator. `offset`: the records' clock on the samples' clock."""
    end = max((r.at for r in records), default=0.0)
    out = []
    for i in range(int(end // width) + 1):
        lo, hi = i * width, (i + 1) * width
        rows = [r for r in records if lo <= r.at < hi]
        ok = [r.latency for r in rows if r.status == 200]
        rss = [s[1] for s in samples if lo <= s[0] - offset < hi]
        out.append({
            "t": lo, "sent": len(rows), "ok": len(ok), "refused": sum(r.status in (429, 503) for r in rows),
            "failed": sum(r.status not in (200, 429, 503) for r in rows),
            "ok_p50_ms": ms(pct(ok, 50)), "ok_p99_ms": ms(pct(ok, 99)),
            "rss_mib": round(max(rss) / MIB, 1) if rss else None,
            "server_cores": cpu_cores(samples, lo + offset, hi + offset, 2),
            "generator_cores": cpu_cores(samples, lo + offset, hi + offset, 3),
        })
    return out


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_json(path: Path, result: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def plot(path: Path, series: list[dict], width: float, title: str, marks: dict[str, float] | None = None) -> Path:
    """Four panels over time: requests per second by outcome, latency of 200s, server RSS, cores used."""
    t = [w["t"] for w in series]
    fig, (rate, lat, mem, cpu) = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    for key, colour in (("sent", "grey"), ("ok", "tab:green"), ("refused", "tab:orange"), ("failed", "tab:red")):
        rate.plot(t, [w[key] / width for w in series], label=key, color=colour)
    rate.set_ylabel("requests/s")
    rate.legend(loc="upper right", fontsize=8)
    for key, style in (("ok_p50_ms", "-"), ("ok_p99_ms", "--")):
        lat.plot(t, [w[key] for w in series], style, label=key.replace("ok_", "200 ").replace("_ms", ""))
    lat.set_ylabel("latency of 200s (ms)")
    lat.set_yscale("log")
    lat.legend(loc="upper right", fontsize=8)
    mem.plot(t, [w["rss_mib"] for w in series], color="tab:purple")
    mem.set_ylabel("server RSS (MiB)")
    for key in ("server_cores", "generator_cores"):
        cpu.plot(t, [w[key] for w in series], label=key.replace("_", " "))
    cpu.set_ylabel("CPU cores used")
    cpu.legend(loc="upper right", fontsize=8)
    cpu.set_xlabel("seconds")
    for name, at in (marks or {}).items():
        for ax in (rate, lat, mem, cpu):
            ax.axvline(at, color="black", linewidth=0.6, linestyle=":")
        rate.annotate(name, (at, 0), xytext=(3, 3), textcoords="offset points", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
