"""What `loadtest.bench` writes from its report: the markdown tables, the throughput ratios, the targets
of issues 17 (speed, memory, overhead) and 18 (tail, SLO), met or missed in the same run, and the plots."""

from __future__ import annotations

from pathlib import Path

EXITS_ON, EXITS_OFF = "exitserve exits on", "exitserve exits off"
ORT_PEER, PIPELINE_PEER = "ONNX Runtime whole-model peer", "transformers pipeline peer"


def throughput_ratio(servers: dict[str, list[dict]], ours: str, theirs: str, concurrency: int) -> float | None:
    """Throughput of `ours` over `theirs` at `concurrency`; None where either was not measured."""
    def rps(name: str) -> float | None:
        return next((r["throughput_rps"] for r in servers.get(name, []) if r["concurrency"] == concurrency), None)

    a, b = rps(ours), rps(theirs)
    return a / b if a is not None and b else None


def ratio_pairs(servers: dict[str, list[dict]]) -> list[tuple[str, str]]:
    """(ours, theirs) rows of the ratio table: exits on over everything else, exits off over the peers."""
    others = [name for name in servers if name not in (EXITS_ON, EXITS_OFF)]
    pairs = [(EXITS_ON, name) for name in servers if name != EXITS_ON]
    return pairs + [(EXITS_OFF, name) for name in others if EXITS_OFF in servers]


def _target(what: str, value: float | None, goal: float, unit: str = "×", at_most: bool = False) -> dict:
    met = None if value is None else (value <= goal if at_most else value >= goal)
    return {"target": what, "value": None if value is None else round(value, 3),
            "goal": f"{'≤' if at_most else '≥'} {goal:g}{unit}", "met": met}


def targets(report: dict) -> list[dict]:
    """The issues' targets, each from this run's numbers (absent parts of the run are skipped)."""
    out = []
    lib = report.get("library")
    if lib:
        for r in lib["rows"]:
            out.append(_target(f"library, batch {r['batch_size']}: exits on vs the whole ORT graph, over the ideal "
                               f"({r['ideal_speedup']:.2f}×)", r["exits_on_vs_whole_ort"] / r["ideal_speedup"], 0.9))
    srv = report.get("server")
    if srv:
        servers = srv["servers"]
        for c in (1, 16):
            out.append(_target(f"server, c={c}: exits on vs the ORT peer",
                               throughput_ratio(servers, EXITS_ON, ORT_PEER, c), 1.8))
        out.append(_target("server, c=1: exits off vs the ORT peer", throughput_ratio(servers, EXITS_OFF, ORT_PEER, 1),
                           1.0))
        rss = srv.get("rss_mib")
        if rss:
            out.append(_target("memory: exitserve's RSS / the peer's, after the runs", rss["exitserve"] / rss[ORT_PEER],
                               1.1, at_most=True))
        tail = srv.get("tail")
        if tail:
            out.append(_target(f"tail: p99 / p50 at {tail['fraction']:.0%} of capacity (Poisson)",
                               tail["p99_over_p50"], 5.0, at_most=True))
            out.append(_target("tail: wrong answers", tail["wrong_answers"], 0, "", at_most=True))
        same = srv.get("same_load")
        if same:
            for q in ("p50", "p99"):
                out.append(_target(f"same load (70 % of the peer's capacity): exitserve {q} / the peer's",
                                   _ratio(same["exitserve"][f"ok_{q}_ms"], same["peer"][f"ok_{q}_ms"]), 1.0,
                                   at_most=True))
        slo = srv.get("slo")
        if slo:
            out.append(_target(f"slo_ms = {slo['slo_ms']} at {slo['fraction']:.0%} load: answered within it",
                               slo["within_slo"], 0.99))
        policies = srv.get("policies")
        if policies and "layered" in policies:
            out.append(_target("saturation throughput: default policy / the pre-issue-18 one (layered)",
                               _ratio(policies["default"], policies["layered"]), 0.95))
    if "overhead_ms_c1" in report:
        out.append(_target("overhead at c=1: server p50 − the backend's batch-1 p50", report["overhead_ms_c1"], 1.0,
                           " ms", at_most=True))
    return [t for t in out if t["value"] is not None]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, torch {m['torch']}; "
             f"{m['date_utc']} UTC; load average at start {m['load_average_at_start']}, at end "
             f"{m.get('load_average_at_end')}. Backend: {report['backend']}.", ""]
    lib = report.get("library")
    if lib:
        lines += ["| batch | threshold | exits on (s) | exits off (s) | whole ORT graph (s) | mean exit layer "
                  "| speed-up | ideal | speed-up / ideal | exits off vs whole ORT | exits on vs whole ORT |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch_size']} | {r['threshold']} | {r['exits_on_s']:.2f} | {r['exits_off_s']:.2f} | "
                  f"{r['whole_ort_s']:.2f} | {r['mean_exit_layer']:.2f} | {r['speedup']:.2f}× | "
                  f"{r['ideal_speedup']:.2f}× | {r['speedup_over_ideal']:.0%} | {r['exits_off_vs_whole_ort']:.2f}× | "
                  f"{r['exits_on_vs_whole_ort']:.2f}× |" for r in lib["rows"]]
        lines += ["", f"Model's own time per input at batch 1 (p50): {lib['model_p50_ms_batch1']:.2f} ms", ""]
    srv = report.get("server")
    if srv:
        lines += ["| server | concurrency | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | errors | mean exit |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, rows in srv["servers"].items():
            lines += [f"| {name} | {r['concurrency']} | {r['throughput_rps']:.1f} | {_fmt(r['p50_ms'])} | "
                      f"{_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | {r['errors']} | "
                      f"{'–' if r['mean_exit_layer'] is None else round(r['mean_exit_layer'], 2)} |" for r in rows]
        lines += ["", *ratios(srv["servers"], srv["concurrencies"])]
    if "overhead_ms_c1" in report:
        lines += ["", f"Overhead at concurrency 1 (exits on p50 minus the model's own batch-1 p50): "
                      f"{report['overhead_ms_c1']:.2f} ms"]
    if srv:
        lines += _server_extras(srv)
    if report.get("targets"):
        lines += ["", "| target (issues 17, 18) | this run | goal | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {t['goal']} | {'yes' if t['met'] else '**no**'} |"
                  for t in report["targets"]]
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.2%}"  # None: nothing was answered


def _open_loop_line(name: str, r: dict) -> str:
    return (f"| {name} | {r['offered_rps']} | {r['answered_rps']} | {r['ok_p50_ms']} | {r['ok_p99_ms']} | "
            f"{r.get('p99_over_p50')} | {r['statuses']} | {r['wrong_answers']} |")


def _server_extras(srv: dict) -> list[str]:
    """Memory, the open-loop runs (tail, same load, SLO) and the policies' capacity."""
    lines = []
    if srv.get("rss_mib"):
        lines += ["", "| resident memory after the runs (MiB) | " + " | ".join(srv["rss_mib"]) + " |",
                  "|---|" + "---|" * len(srv["rss_mib"]),
                  "| RSS | " + " | ".join(f"{v:.0f}" for v in srv["rss_mib"].values()) + " |"]
    runs = []
    if srv.get("tail"):
        runs.append((f"exitserve, {srv['tail']['fraction']:.0%} of its capacity ({srv['tail']['capacity_rps']} "
                     "req/s)", srv["tail"]))
    if srv.get("same_load"):
        peer = srv["same_load"]["peer"]
        runs.append((f"the ORT peer, {peer['fraction']:.0%} of its capacity ({peer['capacity_rps']} req/s)", peer))
        runs.append(("exitserve, the same arrival rate", srv["same_load"]["exitserve"]))
    if srv.get("slo"):
        slo = srv["slo"]
        runs.append((f"exitserve, slo_ms={slo['slo_ms']}, {slo['fraction']:.0%} of capacity "
                     f"(within the SLO: {_pct(slo['within_slo'])}; refused p99 {slo['refused_p99_ms']} ms)", slo))
    if runs:
        lines += ["", "Open loop (Poisson arrivals, latency from each request's scheduled send time):", "",
                  "| run | offered (req/s) | answered (req/s) | p50 (ms) | p99 (ms) | p99/p50 | statuses | wrong |",
                  "|---|---|---|---|---|---|---|---|", *(_open_loop_line(name, r) for name, r in runs)]
    stages = (srv.get("tail") or {}).get("server_stages")
    if stages:
        lines += ["", "| exitserve stage (tail run) | p50 (ms, at most) | p99 (ms, at most) |", "|---|---|---|"]
        lines += [f"| {stage} | {q['p50_ms_at_most']} | {q['p99_ms_at_most']} |"
                  for stage, q in stages.items() if "pauses" not in q]
        lines += [f"| {name} collections | {q['pauses']:g} | longest ≤ {q['longest_ms_at_most']} ms |"
                  for name, q in stages.items() if "pauses" in q]
    if srv.get("policies"):
        lines += ["", "Capacity by scheduling policy (closed loop, 32 clients, req/s): "
                  + ", ".join(f"{name} {rps}" for name, rps in srv["policies"].items())]
    return lines


def ratios(servers: dict[str, list[dict]], concurrencies: list[int]) -> list[str]:
    """Throughput ratios between servers, per concurrency, from the same run."""
    lines = ["| throughput ratio | " + " | ".join(f"c={c}" for c in concurrencies) + " |",
             "|---|" + "---|" * len(concurrencies)]
    for ours, theirs in ratio_pairs(servers):
        cells = [throughput_ratio(servers, ours, theirs, c) for c in concurrencies]
        lines.append(f"| {ours} / {theirs} | " + " | ".join("–" if v is None else f"{v:.2f}×" for v in cells) + " |")
    return lines


def plot(report: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    srv = report.get("server")
    if not srv:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in srv["servers"].items():
        conc = [r["concurrency"] for r in rows]
        line, = axes[0].plot(conc, [r["throughput_rps"] for r in rows], marker="o", label=name)
        axes[1].plot(conc, [r["p50_ms"] for r in rows], marker="o", color=line.get_color(), label=f"{name} p50")
        axes[1].plot(conc, [r["p99_ms"] for r in rows], ls=":", marker=".", color=line.get_color(),
                     label=f"{name} p99")
    axes[0].set(xscale="log", xlabel="concurrency", ylabel="requests / s", title=f"Throughput ({srv['backend']})")
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
