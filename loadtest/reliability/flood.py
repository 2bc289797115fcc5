"""`flood`: a flood of idle connections against a real server while real clients keep asking.

Opens `idle` connections that send nothing and reopens each one as soon as the server closes it (the
worst case: the flood never shrinks), from an address of its own (127.0.0.2, as an attacker has one;
the real clients come from 127.0.0.1; `address` 127.0.0.1 puts the flood behind the clients' address,
as behind a proxy). Once they are open (plus a second), `clients` real clients send ordinary /predict
requests one after another for `seconds`, each on a new connection, and every second the run counts
the flood's connections still open and the real requests' outcomes. Writes OUT/flood.json and a PNG.
`flood_against` drives a server that is already running (the tests).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import matplotlib.pyplot as plt

from exitserve.loadtest.reliability.process import HOST, ServerProcess
from exitserve.loadtest.reliability.report import write_json
from exitserve.loadtest.reliability.scenarios import Options, machine

FLOOD_ADDRESS = "127.0.0.2"  # Linux routes all of 127.0.0.0/8 to the loopback interface


@dataclass
class Flood:
    opened: int = 0  # connections the flood opened, reopenings included
    closed_by_server: int = 0
    refused: int = 0  # connection attempts that failed
    open_now: int = 0


@dataclass
class Timeline:
    at: list[float] = field(default_factory=list)
    flood_open: list[int] = field(default_factory=list)
    real: list[dict[str, int]] = field(default_factory=list)  # per second: outcomes of the real requests


async def idle_connection(port: int, stop: asyncio.Event, flood: Flood, address: str) -> None:
    """One idle connection from `address`, reopened whenever the server closes it, until `stop`."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(HOST, port, local_addr=(address, 0))
        except OSError:
            flood.refused += 1
            await asyncio.sleep(0.05)
            continue
        flood.opened += 1
        flood.open_now += 1
        try:
            waiting = asyncio.ensure_future(reader.read())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
            if waiting.done():
                flood.closed_by_server += 1
            waiting.cancel()
            stopping.cancel()
        except OSError:
            flood.closed_by_server += 1
        finally:
            flood.open_now -= 1
            writer.close()


async def real_client(port: int, end: float, outcomes: list[tuple[float, str]], start: float,
                      headers: dict[str, str]) -> None:
    """Ordinary requests one after another, each on a new connection, until `end`."""
    async with httpx.AsyncClient(timeout=10, headers={"connection": "close", **headers}) as client:
        while time.monotonic() < end:
            sent = time.monotonic()
            try:
                r = await client.post(f"http://{HOST}:{port}/predict", json={"text": "a fine film"})
                outcome = str(r.status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            outcomes.append((sent - start, outcome))


async def _run(port: int, idle: int, seconds: float, clients: int, headers: dict[str, str], address: str) -> dict:
    stop, flood, timeline, outcomes = asyncio.Event(), Flood(), Timeline(), []
    tasks = [asyncio.create_task(idle_connection(port, stop, flood, address)) for _ in range(idle)]
    settle = time.monotonic() + 10
    while flood.opened < idle and time.monotonic() < settle:  # the flood is in place before the clients come
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # and has held its connections for a moment (a flood, not a burst)
    start = time.monotonic()
    end = start + seconds
    real = [asyncio.create_task(real_client(port, end, outcomes, start, headers)) for _ in range(clients)]
    while time.monotonic() < end:
        await asyncio.sleep(1.0)
        timeline.at.append(round(time.monotonic() - start, 2))
        timeline.flood_open.append(flood.open_now)
        timeline.real.append(dict(Counter(o for t, o in outcomes if timeline.at[-1] - 1 <= t < timeline.at[-1])))
    await asyncio.gather(*real)
    stop.set()
    await asyncio.gather(*tasks)
    statuses = Counter(o for _, o in outcomes)
    return {"idle": idle, "clients": clients, "seconds": seconds, "flood_address": address,
            "flood": {"opened": flood.opened, "closed_by_server": flood.closed_by_server, "refused": flood.refused},
            "real": {"sent": len(outcomes), "statuses": dict(statuses),
                     "success_rate": round(statuses["200"] / len(outcomes), 4) if outcomes else None},
            "timeline": {"at": timeline.at, "flood_open": timeline.flood_open, "real": timeline.real}}


def flood_against(port: int, idle: int = 1000, seconds: float = 30, clients: int = 4,
                  headers: dict[str, str] | None = None, address: str = FLOOD_ADDRESS) -> dict:
    """The flood against a server already listening on 127.0.0.1:`port`."""
    return asyncio.run(_run(port, idle, seconds, clients, headers or {}, address))


def flood(opts: Options, idle: int = 1000, seconds: float = 30, clients: int = 4, address: str = FLOOD_ADDRESS) -> dict:
    with ServerProcess(opts.checkpoint, opts.settings, opts.logs / "flood.log") as server:
        result = flood_against(server.port, idle, seconds, clients, address=address)
    result = {"run": "flood", "machine": machine(opts), "settings": opts.settings, **result}
    real = result["real"]
    print(f"flood: {idle} idle connections (opened {result['flood']['opened']} times in all); real requests: "
          f"{real['sent']} sent, {real['statuses']}, success {real['success_rate']}")
    print(f"wrote {write_json(opts.out / 'flood.json', result)}")
    print(f"wrote {plot(opts.out / 'flood.png', result)}")
    return result


def plot(path, result: dict):
    """The flood's open connections, second by second; the real requests' outcomes below."""
    timeline = result["timeline"]
    fig, (held, real) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, height_ratios=(2, 2))
    held.plot(timeline["at"], timeline["flood_open"], label=f"idle flood ({result['idle']} connections)")
    held.set_ylabel("flood connections open")
    held.set_title("idle-connection flood: " + (" ".join(result["settings"]) or "default settings"), fontsize=10)
    held.legend()
    outcomes = sorted({o for row in timeline["real"] for o in row})
    for outcome in outcomes:
        real.plot(timeline["at"], [row.get(outcome, 0) for row in timeline["real"]], marker=".", label=outcome)
    real.set_ylabel("real requests\nper second")
    real.set_xlabel("seconds since the real clients started")
    real.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
