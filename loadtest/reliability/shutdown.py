"""SIGTERM under load: /ready should turn 503 first, every accepted request be answered, and the
process exit within the drain timeout.

Every request opens its own connection here (`connection: close`), so each one is either refused
(the listener is closed: never accepted), answered, or lost (accepted, then no answer).
"""

from __future__ import annotations

import asyncio
import time

from exitserve.loadtest.http_client import Client
from exitserve.loadtest.reliability.client import Phase, Record
from exitserve.loadtest.reliability.process import HOST, ServerProcess
from exitserve.loadtest.reliability.report import ms, summarise, windows
from exitserve.loadtest.reliability.scenarios import Options, finish, prepare, run_phases


async def poll_ready(port: int, log: list[tuple[float, str]], every: float = 0.01, limit: float = 120) -> None:
    """GET /ready on a fresh connection every `every` s until the connection is refused."""
    probe = Client(HOST, port, 1, keep_alive=False)
    end = time.monotonic() + limit
    while time.monotonic() < end:
        at = time.monotonic()
        try:
            status, _ = await probe.request("GET", "/ready")
            log.append((at, str(status)))
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.append((at, type(exc).__name__))
            if isinstance(exc, ConnectionRefusedError):
                return
        await asyncio.sleep(every)


def outcome(record: Record) -> str:
    if record.status == 200:
        return "answered"
    return "refused" if record.error == "ConnectionRefusedError" else f"lost:{record.status}:{record.error}"


def shutdown(opts: Options, fraction: float = 0.7, before: float = 10, after: float = 15) -> dict:
    drain = next((float(s.split("=", 1)[1]) for s in opts.settings if s.startswith("drain_timeout=")), 30.0)
    with ServerProcess(opts.checkpoint, opts.settings, opts.logs / "shutdown.log") as server:
        async def main() -> tuple[float, list[Record], float, float, float, int, list[tuple[float, str]]]:
            client, refs, rate = await prepare(server, opts, keep_alive=False)
            ready: list[tuple[float, str]] = []

            async def terminate() -> tuple[float, float, int]:
                await asyncio.sleep(before)
                sent = server.terminate()
                code = await asyncio.to_thread(server.proc.wait, drain + 60)
                return sent, time.monotonic() - sent, code

            start = time.monotonic()
            (records, offset), (sent, exit_s, code), _ = await asyncio.gather(
                run_phases(server, client, [Phase("load", rate * fraction, before + after)], opts.texts, refs),
                terminate(), poll_ready(server.port, ready))
            return rate, records, offset, sent - start, exit_s, code, [(t - sent, s) for t, s in ready]

        rate, records, offset, sigterm_at, exit_s, code, ready = asyncio.run(main())
        samples = list(server.samples)
    in_flight = [r for r in records if r.at < sigterm_at < r.at + r.latency]
    after_signal = [r for r in records if r.at >= sigterm_at]
    counts: dict[str, dict[str, int]] = {}
    for name, rows in (("before_sigterm", [r for r in records if r.at < sigterm_at]), ("in_flight_at_sigterm",
                       in_flight), ("after_sigterm", after_signal)):
        counts[name] = {}
        for r in rows:
            counts[name][outcome(r)] = counts[name].get(outcome(r), 0) + 1
    first = {status: next((round(t * 1000, 1) for t, s in ready if s == status and t >= 0), None)
             for status in ("503", "ConnectionRefusedError")}
    answered_after = [r.at + r.latency - sigterm_at for r in records
                      if r.status == 200 and r.at + r.latency > sigterm_at]
    result = {
        "drain_timeout_s": drain, "exit_code": code, "exit_after_sigterm_s": round(exit_s, 2),
        "outcomes": counts, "lost": sum(n for c in counts.values() for k, n in c.items() if k.startswith("lost")),
        "last_answer_after_sigterm_ms": ms(max(answered_after, default=None)),
        "ready": {"first_503_after_sigterm_ms": first["503"],
                  "first_refused_after_sigterm_ms": first["ConnectionRefusedError"],
                  "statuses_after_sigterm": sorted({s for t, s in ready if t >= 0})},
        "summary": summarise(records, "load", 0.0, before + after, rate * fraction),
    }
    print(f"SIGTERM at {sigterm_at:.1f} s; exit code {code} after {exit_s:.2f} s (drain timeout {drain:g} s)")
    print(f"outcomes: {counts}")
    print(f"/ready after SIGTERM: {result['ready']}")
    return finish(opts, "shutdown", result, windows(records, samples, 1.0, offset), 1.0,
                  "SIGTERM under load", {"SIGTERM": sigterm_at})
