"""A small closed-loop load generator: N concurrent clients, each sending requests back to back
over keep-alive connections of the light client in loadtest.http_client.

Bounded in time and in count, loopback only by default. The generator shares the machine with the
server it measures, so keep it light and compare ratios from the same run, not absolute numbers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

from exitserve.loadtest.http_client import Client

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    exit_layers: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms)

        def pct(p: float) -> float | None:
            return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else None

        ok = self.statuses.get(200, 0)
        return {
            "concurrency": self.concurrency,
            "requests": sum(self.statuses.values()),
            "ok": ok,
            "errors": sum(v for k, v in self.statuses.items() if k != 200),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "throughput_rps": ok / self.seconds if self.seconds else 0.0,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "mean_ms": statistics.fmean(lat) if lat else None,
            "mean_exit_layer": statistics.fmean(self.exit_layers) if self.exit_layers else None,
        }


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"refusing to load {host}: the load generator targets loopback only")


async def run_load(
    url: str,
    make_body: Callable[[int], dict],
    concurrency: int,
    duration: float,
    max_requests: int = 100_000,
    warmup: float = 1.0,
    exit_layer_of: Callable[[dict], int | None] | None = None,
) -> LoadResult:
    """Closed loop for `warmup + duration` seconds; only the last `duration` seconds are measured."""
    check_loopback(url)
    parts = urlparse(url)
    counter = itertools.count()
    result = LoadResult(concurrency, duration)
    client = Client(parts.hostname, parts.port or 80, max_connections=concurrency)
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    async def worker() -> None:
        while (sent := time.perf_counter()) < stop_at:
            i = next(counter)
            if i >= max_requests:
                return
            try:
                status, payload = await client.request("POST", parts.path, json.dumps(make_body(i)).encode())
            except (OSError, asyncio.IncompleteReadError, ValueError):
                status, payload = -1, b""
            done = time.perf_counter()
            if sent < measure_from or done > stop_at:
                continue
            result.statuses[status] += 1
            if status == 200:
                result.latencies_ms.append((done - sent) * 1000)
                if exit_layer_of is not None:
                    layer = exit_layer_of(json.loads(payload))
                    if layer is not None:
                        result.exit_layers.append(layer)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        client.close()
    return result
