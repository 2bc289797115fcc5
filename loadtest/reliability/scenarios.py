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

from loadtest.reliability.client import Client, Phase, Record, drive, references, sustained_rate
from loadtest.reliability.process import HOST, ServerProcess
from loadtest.reliability.report import MIB, pct, plot, summarise, summarise_phases, table, windows, write_json

FIXTURE_TEXTS = Path(__file__).parents[2] / "tests" / "fixtures" / "glue" / "SST-2" / "dev.tsv"
PHASE_COLUMNS = ["phase", "offered_rps", "sent", "answered_rps", "statuses", "wrong_answers", "ok_p50_ms",
                 "ok_p99_ms", "refused_p50_ms", "refused_p99_ms"]


def load_texts(path: Path, limit: int = 200) -> list[str]:
    """The first column of a TSV with a header (GLUE style), or one text per line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".tsv":
        lines = [line.split("\t")[0].strip() for line in lines[1:]]
    return lines[:limit]


@dataclass
class Options:
    checkpoint: Path | None  # None: the embedded default model
    settings: list[str]  # server settings, NAME=VALUE
    out: Path
    texts: list[str]
    rate: float | None = None  # the sustained rate; measured when None
    concurrency: int = 32  # closed-loop clients for measuring the sustained rate
    measure_seconds: float = 20.0
    max_connections: int = 1024  # above the server's queue (512), or the generator caps the overload
    note: str = ""  # what else ran on the machine
    started: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(" ", "seconds"))


def machine(opts: Options) -> dict:
    return {"date_utc": opts.started, "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30), "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "note": opts.note}


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


def overload(opts: Options, factor: float = 4.0, before: float = 30, during: float = 60, after: float = 30) -> dict:
    """Half the sustained rate, then `factor` x it, then half again: refusals are fast, accepted
    answers are right, memory stays bounded, and latency comes back."""
    with ServerProcess(opts.checkpoint, opts.settings, opts.out / "overload.log") as server:
        async def main() -> tuple[list[Phase], list[Record], float, int, int]:
            client, refs, rate = await prepare(server, opts)
            rss_before = server.rss()
            phases = [Phase("before", rate / 2, before), Phase("overload", rate * factor, during),
                      Phase("after", rate / 2, after)]
            records, offset = await run_phases(server, client, phases, opts.texts, refs)
            client.close()
            return phases, records, offset, rss_before, client.peak_in_flight

        phases, records, offset, rss_before, peak = asyncio.run(main())
        memory = list(server.memory)
    summaries = summarise_phases(records, phases)
    in_overload = [b for t, b in memory if before <= t - offset < before + during]
    rss = {"before_mib": round(rss_before / MIB, 1), "peak_in_overload_mib": round(max(in_overload) / MIB, 1),
           "end_mib": round(memory[-1][1] / MIB, 1)}
    print(table(summaries, PHASE_COLUMNS))
    print(f"server RSS: {rss}")
    rate = phases[0].rate * 2
    result = {"sustained_rps": round(rate, 1), "factor": factor, "phases": summaries, "rss": rss,
              "generator_peak_in_flight": peak, "generator_max_connections": opts.max_connections}
    return finish(opts, "overload", result, windows(records, memory, 1.0, offset), 1.0,
                  f"overload: {factor:g}x the sustained {rate:.0f} req/s",
                  {"overload": before, "after": before + during})


def soak(opts: Options, fraction: float = 0.7, minutes: float = 10, width: float = 30) -> dict:
    """`fraction` of the sustained rate for `minutes`: no errors, flat memory, stable p99."""
    with ServerProcess(opts.checkpoint, opts.settings, opts.out / "soak.log") as server:
        async def main() -> tuple[float, list[Record], float]:
            client, refs, rate = await prepare(server, opts)
            records, offset = await run_phases(server, client, [Phase("soak", rate * fraction, minutes * 60)],
                                               opts.texts, refs)
            client.close()
            return rate, records, offset

        rate, records, offset = asyncio.run(main())
        memory = list(server.memory)
    series = windows(records, memory, width, offset)
    soak_mem = [b for t, b in memory if t >= offset]
    after_first_minute = next(b for t, b in memory if t - offset >= 60)
    summary = summarise(records, "soak", 0.0, minutes * 60, rate * fraction)
    p99s = [w["ok_p99_ms"] for w in series if w["ok_p99_ms"] is not None]
    result = {
        "sustained_rps": round(rate, 1), "fraction": fraction, "summary": summary,
        "rss": {"start_mib": round(soak_mem[0] / MIB, 1), "after_1_min_mib": round(after_first_minute / MIB, 1),
                "end_mib": round(soak_mem[-1] / MIB, 1), "peak_mib": round(max(soak_mem) / MIB, 1),
                "growth_after_1_min_pct": round(100 * (soak_mem[-1] - after_first_minute) / after_first_minute, 2),
                "growth_from_start_pct": round(100 * (soak_mem[-1] - soak_mem[0]) / soak_mem[0], 2)},
        "p99_ms_per_window": {"min": min(p99s), "median": pct(p99s, 50), "max": max(p99s)},
    }
    print(table([summary], PHASE_COLUMNS))
    print(table(series, ["t", "sent", "ok", "refused", "failed", "ok_p50_ms", "ok_p99_ms", "rss_mib"]))
    print(f"server RSS: {result['rss']}")
    return finish(opts, "soak", result, series, width,
                  f"soak: {fraction:.0%} of the sustained {rate:.0f} req/s for {minutes:g} min", {})
