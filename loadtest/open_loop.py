"""Open-loop latency at a fraction of capacity: Poisson arrivals against a running exitserve, p50/p99,
and where the time went on the server (its own per-stage histograms, read from /metrics).

Capacity is measured first (closed loop, the reliability kit's `sustained_rate`), then requests arrive
as a Poisson process at `fraction` x that rate for `seconds` (the kit's `drive`: latency counted from
each request's scheduled send time, answers checked against each text asked alone). The tail target
of issue 10 is p99 <= 5 x p50 at 70 % of capacity (an M/M/1 queue at 70 % load gives 6.6x).
"""

from __future__ import annotations

import math
from urllib.parse import urlparse

from prometheus_client.parser import text_string_to_metric_families

from exitserve.loadtest.http_client import Client
from exitserve.loadtest.reliability.client import Phase, drive, references, sustained_rate
from exitserve.loadtest.reliability.report import summarise

STAGES = ("request", "tokenization", "queue", "inference")  # exitserve_<stage>_duration_seconds


def histograms(metrics_text: str) -> dict[str, list[tuple[float, float]]]:
    """Every histogram's cumulative buckets, `{name: [(upper bound, count), ...]}`, from /metrics text.
    One model per server, so the `model` label is summed away; other labels go into the name
    (`exitserve_gc_pause_seconds{generation="2"}`)."""
    out: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.type != "histogram":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k not in ("le", "model"))
                buckets = out.setdefault(f"{family.name}{{{labels}}}" if labels else family.name, {})
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return {name: sorted(b.items()) for name, b in out.items()}


def bucket_quantile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> float | None:
    """The upper bound of the bucket holding quantile `q` of what was observed between two scrapes
    (a bound, not an interpolation: the buckets grow by 1.5x, so it is within 1.5x of the truth)."""
    counts = dict(before)
    delta = [(bound, total - counts.get(bound, 0.0)) for bound, total in after]
    if not delta or delta[-1][1] <= 0:
        return None
    rank = math.ceil(q * delta[-1][1])
    return next(bound for bound, n in delta if n >= rank)


def stage_quantiles(before: str, after: str) -> dict[str, dict[str, float | None]]:
    """Between two scrapes: p50 / p99 (ms, bucket bounds) of each server stage, and the garbage
    collector's pauses per generation (how many, and the bound of the longest)."""
    b, a = histograms(before), histograms(after)
    out: dict[str, dict[str, float | None]] = {}
    for stage in STAGES:
        name = f"exitserve_{stage}_duration_seconds"
        if name in a:
            out[stage] = {f"p{round(q * 100)}_ms_at_most": _ms(bucket_quantile(b.get(name, []), a[name], q))
                          for q in (0.5, 0.99)}
    for name in sorted(n for n in a if n.startswith("exitserve_gc_pause_seconds{")):
        counts = dict(b.get(name, []))
        delta = [(bound, total - counts.get(bound, 0.0)) for bound, total in a[name]]
        longest = next((bound for bound, n in delta if n >= delta[-1][1]), None) if delta[-1][1] else None
        out[f"gc {name.split('{')[1].rstrip('}')}"] = {"pauses": delta[-1][1], "longest_ms_at_most": _ms(longest)}
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


async def capacity(url: str, texts: list[str], concurrency: int = 32, seconds: float = 20.0) -> float:
    """Answered requests per second under a closed loop of `concurrency` clients (a warm-up pass first)."""
    parts = urlparse(url)
    client = Client(parts.hostname, parts.port or 80, max_connections=1024)
    try:
        await sustained_rate(client, texts, concurrency, min(2.0, seconds))
        return await sustained_rate(client, texts, concurrency, seconds)
    finally:
        client.close()


async def open_loop(url: str, texts: list[str], fraction: float = 0.7, seconds: float = 60.0,
                    capacity: float | None = None, concurrency: int = 32, measure_seconds: float = 20.0,
                    slo_ms: float | None = None) -> dict:
    """Poisson arrivals at `fraction` x capacity against a server at `url` (its base URL); capacity is
    measured (closed loop, `concurrency` clients) unless given. Every answer is checked against the
    text's answer asked alone; stages are read from exitserve's /metrics (a peer has none). With
    `slo_ms`: the share of answered requests within it."""
    parts = urlparse(url)
    client = Client(parts.hostname, parts.port or 80, max_connections=1024)
    try:
        refs = await references(client, texts)
        measured = capacity is None
        if capacity is None:
            capacity = await sustained_rate(client, texts, concurrency, measure_seconds)
        before_status, before = await client.request("GET", "/metrics")
        phase = Phase("poisson", capacity * fraction, seconds)
        records = await drive(client, [phase], texts, refs)
        _, after = await client.request("GET", "/metrics")
    finally:
        client.close()
    summary = summarise(records, phase.name, 0.0, seconds, phase.rate)
    p50, p99 = summary["ok_p50_ms"], summary["ok_p99_ms"]
    out = {"capacity_rps": round(capacity, 1), "capacity_measured": measured, "fraction": fraction,
           **summary, "p99_over_p50": round(p99 / p50, 2) if p50 and p99 else None}
    if before_status == 200:
        out["server_stages"] = stage_quantiles(before.decode(), after.decode())
    if slo_ms is not None:
        ok = [r.latency * 1000 for r in records if r.status == 200]
        out["within_slo"] = round(sum(x <= slo_ms for x in ok) / len(ok), 4) if ok else None
    return out
