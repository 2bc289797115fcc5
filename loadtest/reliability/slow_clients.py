"""`slow-clients`: how many connections that never finish a request a real server holds, and how long.

Opens `count` connections of each kind at once: `idle` (sends nothing), `head` (trickles a request
head, one byte a second, that never ends) and `body` (a whole head announcing 100 body bytes, then 10
of them and nothing more). Every second it counts the connections of each kind the server still holds
open, and sends one ordinary /predict on a new connection (its status shows whether the server still
serves). After `seconds` it closes whatever is left. Writes OUT/slow-clients.json and a PNG.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import matplotlib.pyplot as plt

from exitserve.loadtest.reliability.process import HOST, ServerProcess
from exitserve.loadtest.reliability.report import MIB, write_json
from exitserve.loadtest.reliability.scenarios import Options, machine

HEAD = b"POST /predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
OPENING = {"idle": b"", "head": HEAD + b"x-trickle: ", "body": HEAD + b'content-length: 100\r\n\r\n{"text": "a'}
KINDS = tuple(OPENING)


@dataclass
class Held:
    kind: str
    closed_at: float | None = None  # seconds after the start, when the server closed it
    answer: int | None = None  # the HTTP status the server sent before closing, if any


@dataclass
class Timeline:
    at: list[float] = field(default_factory=list)  # seconds since the start, of each tick (about one a second)
    held: list[dict[str, int]] = field(default_factory=list)  # per tick: connections still open, per kind
    probes: list[str] = field(default_factory=list)  # per tick: an ordinary request's status


async def hold(kind: str, port: int, start: float, end: float) -> Held:
    """One slow connection, until the server closes it or `end`."""
    held = Held(kind)
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        held.closed_at = time.monotonic() - start
        return held
    data = b""
    try:
        writer.write(OPENING[kind])
        while time.monotonic() < end:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 1.0)
            except asyncio.TimeoutError:
                if kind == "head":
                    writer.write(b"a")  # one more byte of a header that never ends
                continue
            if not chunk:
                held.closed_at = time.monotonic() - start
                break
            data += chunk
    except OSError:  # reset by the server
        held.closed_at = time.monotonic() - start
    finally:
        writer.close()
    if data.startswith(b"HTTP/1.1 "):
        held.answer = int(data[9:12])
    return held


async def watch(port: int, conns: list[asyncio.Task], kinds: list[str], start: float, end: float) -> Timeline:
    timeline = Timeline()
    async with httpx.AsyncClient(timeout=5, headers={"connection": "close"}) as client:
        while time.monotonic() < end:
            tick = time.monotonic()
            timeline.at.append(round(tick - start, 2))
            still = Counter(k for k, task in zip(kinds, conns, strict=True) if not task.done())
            timeline.held.append({k: still[k] for k in KINDS})
            try:
                r = await client.post(f"http://{HOST}:{port}/predict", json={"text": "a fine film"})
                timeline.probes.append(str(r.status_code))
            except httpx.HTTPError as exc:
                timeline.probes.append(type(exc).__name__)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    return timeline


def slow_clients(opts: Options, count: int = 300, seconds: float = 45) -> dict:
    with ServerProcess(opts.checkpoint, opts.settings, opts.logs / "slow-clients.log") as server:
        async def main() -> tuple[list[Held], Timeline]:
            start = time.monotonic()
            end = start + seconds
            kinds = [kind for kind in KINDS for _ in range(count)]
            conns = [asyncio.create_task(hold(kind, server.port, start, end)) for kind in kinds]
            timeline = await watch(server.port, conns, kinds, start, end)
            return list(await asyncio.gather(*conns)), timeline

        helds, timeline = asyncio.run(main())
        peak_rss = max(s[1] for s in server.samples) / MIB
    summary = {}
    for kind in KINDS:
        rows = [h for h in helds if h.kind == kind]
        closed = sorted(h.closed_at for h in rows if h.closed_at is not None)
        summary[kind] = {
            "opened": len(rows), "still_open_at_end": len(rows) - len(closed),
            "closed_within_s": {f"{t}": sum(c <= t for c in closed) for t in (1, 5, 11, 21, 40) if t < seconds},
            "answers": dict(Counter(str(h.answer) for h in rows if h.closed_at is not None)),
        }
        print(f"{kind:>5}: {summary[kind]}")
    probes = dict(Counter(timeline.probes))
    print(f"ordinary requests during the run (one a second): {probes}; server RSS peak {peak_rss:.0f} MiB")
    result = {"run": "slow-clients", "machine": machine(opts), "settings": opts.settings, "count_per_kind": count,
              "seconds": seconds, "kinds": summary, "probes": probes, "peak_rss_mib": round(peak_rss, 1),
              "timeline": {"at": timeline.at, "held": timeline.held, "probes": timeline.probes}}
    print(f"wrote {write_json(opts.out / 'slow-clients.json', result)}")
    print(f"wrote {plot(opts.out / 'slow-clients.png', timeline, count, opts.settings)}")
    return result


def plot(path, timeline: Timeline, count: int, settings: list[str]):
    """Connections still held per kind, second by second; the ordinary requests' outcomes below."""
    fig, (held, probes) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, height_ratios=(3, 1))
    for kind in KINDS:
        held.plot(timeline.at, [row[kind] for row in timeline.held], label=f"{kind} ({count} opened)")
    held.set_ylabel("connections held open")
    held.set_title("slow clients: " + (" ".join(settings) or "default settings"), fontsize=10)
    held.legend()
    statuses = sorted(set(timeline.probes))
    probes.scatter(timeline.at, [statuses.index(p) for p in timeline.probes], s=12)
    probes.set_yticks(range(len(statuses)), statuses)
    probes.set_ylabel("ordinary\nrequest")
    probes.set_xlabel("seconds since the slow clients connected")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
