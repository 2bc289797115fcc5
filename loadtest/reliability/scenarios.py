"""The runs. Each starts its own server (`ServerProcess`), measures the rate it sustains (closed
loop) unless given one, drives open-loop load, and writes OUT/<run>.json and OUT/<run>.png."""

from __future__ import annotations

import asyncio
import datetime
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from tqdm import tqdm

from exitserve.loadtest.http_client import Client
from exitserve.loadtest.reliability.client import Phase, Record, drive, references, sustained_rate
from exitserve.loadtest.reliability.process import HOST, ServerProcess
from exitserve.loadtest.reliability.report import (
    MIB,
    cpu_cores,
    pct,
    plot,
    summarise,
    summarise_phases,
    table,
    windows,
    write_json,
)

FIXTURE_TEXTS = Path(__file__).parents[2] / "tests" / "fixtures" / "glue" / "SST-2" / "dev.tsv"
PHASE_COLUMNS = ["phase", "offered_rps", "sent", "answered_rps", "statuses", "wrong_answers", "ok_p50_ms",
                 "ok_p99_ms", "refused_p50_ms", "refused_p99_ms", "server_cores", "generator_cores"]


def load_texts(path: Path, limit: int = 200) -> list[str]:
    """The first column of a TSV with a header (GLUE style), or one text per line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".tsv":
        lines = [line.split("\t")[0].strip() for line in lines[1:]]
    return lines[:limit]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class Options:
    checkpoint: Path | None  # None: the embedded default model
    settings: list[str]  # server settings, NAME=VALUE
    out: Path  # JSON and PNG
    texts: list[str]
    rate: float | None = None  # the sustained rate; measured when None
    concurrency: int = 32  # closed-loop clients for measuring the sustained rate
    measure_seconds: float = 20.0
    max_connections: int = 1024  # above the server's queue (512), or the generator caps the overload
    note: str = ""  # what else ran on the machine
    started: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(" ", "seconds"))
    load_at_start: list[float] = field(default_factory=load_average)
    logs: Path = Path("runs/reliability")  # the server's log (not committed: one access-log line per request)


def machine(opts: Options) -> dict:
    return {"date_utc": opts.started, "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30), "platform": platform.platform(),
            "load_average_at_start": opts.load_at_start, "load_average_at_end": load_average(), "note": opts.note}


async def prepare(server: ServerProcess, opts: Options, keep_alive: bool = True) -> tuple[Client, dict, float]:
    client = Client(HOST, server.port, opts.max_connections, keep_alive)
    refs = await references(client, opts.texts)
    rate = opts.rate or await sustained_rate(client, opts.texts, opts.concurrency, opts.measure_seconds)
    print(f"sustained rate: {rate:.1f} requests/s" + (" (measured)" if not opts.rate else " (given)"))
    return client, refs, rate


async def run_phases(server: ServerProcess, client: Client, phases: list[Phase], texts: list[str],
                     refs: dict) -> tuple[list[Record], float]:
    """Drive `phases` with a progress bar; returns the records and where their clock starts on the server's."""
    expected = round(sum(p.rate * p.seconds for p in phases))
    with tqdm(total=expected, unit="req", desc=" -> ".join(p.name for p in phases), mininterval=2) as bar:
        offset = time.monotonic() - server.started
        records = await drive(client, phases, texts, refs, on_done=lambda _: bar.update())
    return records, offset


def finish(opts: Options, name: str, result: dict, series: list[dict], width: float, title: str,
           marks: dict[str, float]) -> dict:
    result = {"run": name, "machine": machine(opts), "checkpoint": str(opts.checkpoint or "server/default_model"),
              "settings": opts.settings, **result, "windows": series}
    print(f"wrote {write_json(opts.out / f'{name}.json', result)}")
    print(f"wrote {plot(opts.out / f'{name}.png', series, width, title, marks)}")
    return result


def add_cores(summaries: list[dict], phases: list[Phase], samples: list, offset: float) -> list[dict]:
    """Each phase's average cores used by the server and by the load generator (they share the machine)."""
    lo = offset
    for summary, phase in zip(summaries, phases, strict=True):
        summary["server_cores"] = cpu_cores(samples, lo, lo + phase.seconds, 2)
        summary["generator_cores"] = cpu_cores(samples, lo, lo + phase.seconds, 3)
        lo += phase.seconds
    return summaries


def overload(opts: Options, factor: float = 4.0, before: float = 30, during: float = 60, after: float = 30) -> dict:
    """Half the sustained rate, then `factor` x it, then half again: refusals are fast, accepted
    answers are right, memory stays bounded, and latency comes back."""
    with ServerProcess(opts.checkpoint, opts.settings, opts.logs / "overload.log") as server:
        async def main() -> tuple[list[Phase], list[Record], float, int]:
            client, refs, rate = await prepare(server, opts)
            phases = [Phase("before", rate / 2, before), Phase("overload", rate * factor, during),
                      Phase("after", rate / 2, after)]
            records, offset = await run_phases(server, client, phases, opts.texts, refs)
            client.close()
            return phases, records, offset, client.peak_in_flight

        phases, records, offset, peak = asyncio.run(main())
        samples = list(server.samples)
    summaries = add_cores(summarise_phases(records, phases), phases, samples, offset)
    rss = {name: round(max(s[1] for s in samples if lo <= s[0] - offset < hi) / MIB, 1) for name, lo, hi in
           (("before_mib", 0, before), ("overload_mib", before, before + during),
            ("after_mib", before + during, before + during + after))}
    print(table(summaries, PHASE_COLUMNS))
    print(f"server RSS, peak per phase: {rss}")
    rate = phases[0].rate * 2
    result = {"sustained_rps": round(rate, 1), "factor": factor, "phases": summaries, "peak_rss": rss,
              "generator_peak_in_flight": peak, "generator_max_connections": opts.max_connections}
    return finish(opts, "overload", result, windows(records, samples, 1.0, offset), 1.0,
                  f"overload: {factor:g}x the sustained {rate:.0f} req/s",
                  {"overload": before, "after": before + during})


def soak(opts: Options, fraction: float = 0.7, minutes: float = 10, width: float = 30) -> dict:
    """`fraction` of the sustained rate for `minutes`: no errors, flat memory, stable p99."""
    with ServerProcess(opts.checkpoint, opts.settings, opts.logs / "soak.log") as server:
        async def main() -> tuple[Phase, list[Record], float]:
            client, refs, rate = await prepare(server, opts)
            phase = Phase("soak", rate * fraction, minutes * 60)
            records, offset = await run_phases(server, client, [phase], opts.texts, refs)
            client.close()
            return phase, records, offset

        phase, records, offset = asyncio.run(main())
        samples = list(server.samples)
    series = windows(records, samples, width, offset)
    rss = [s[1] for s in samples if s[0] >= offset]
    after_first_minute = next(s[1] for s in samples if s[0] - offset >= 60)
    summary = add_cores([summarise(records, "soak", 0.0, phase.seconds, phase.rate)], [phase], samples, offset)[0]
    p99s = [w["ok_p99_ms"] for w in series if w["ok_p99_ms"] is not None]
    result = {
        "sustained_rps": round(phase.rate / fraction, 1), "fraction": fraction, "summary": summary,
        "rss": {"start_mib": round(rss[0] / MIB, 1), "after_1_min_mib": round(after_first_minute / MIB, 1),
                "end_mib": round(rss[-1] / MIB, 1), "peak_mib": round(max(rss) / MIB, 1),
                "growth_after_1_min_pct": round(100 * (rss[-1] - after_first_minute) / after_first_minute, 2),
                "growth_from_start_pct": round(100 * (rss[-1] - rss[0]) / rss[0], 2)},
        "p99_ms_per_window": {"min": min(p99s), "median": pct(p99s, 50), "max": max(p99s)},
    }
    print(table([summary], PHASE_COLUMNS))
    print(table(series, ["t", "sent", "ok", "refused", "failed", "ok_p50_ms", "ok_p99_ms", "rss_mib",
                         "server_cores", "generator_cores"]))
    print(f"server RSS: {result['rss']}")
    return finish(opts, "soak", result, series, width,
                  f"soak: {fraction:.0%} of the sustained {phase.rate / fraction:.0f} req/s for {minutes:g} min", {})
