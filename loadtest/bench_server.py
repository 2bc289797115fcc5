"""The server half of `loadtest.bench`: exitserve against the same model run whole on ONNX Runtime.

Both servers run at once (separate processes, each serving from graphs built beforehand) and are
measured interleaved, after a warm-up pass of each: at every concurrency exitserve exits on, exits off
(threshold 1.0 per request) and the peer take their turns, so a change in the machine's load hits all
three. Then, in this order:

  memory      each server's resident memory (VmRSS) after the sweep;
  tail        Poisson arrivals at `fraction` of exitserve's measured capacity (loadtest/open_loop.py);
  same load   Poisson arrivals at `fraction` of the PEER's capacity, to the peer and then to exitserve:
              who answers faster at the same traffic;
  slo         a fresh exitserve with `slo_ms` = `slo_factor` x its unloaded p50 (c=1), Poisson arrivals
              at `slo_load` of its capacity: the share of answers within the SLO, and how fast the shed
              requests were refused;
  policies    a fresh exitserve per other scheduling policy, its capacity (closed loop, 32 clients).
"""

from __future__ import annotations

import asyncio
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from exitserve.loadtest.bench_report import EXITS_OFF, EXITS_ON, ORT_PEER
from exitserve.loadtest.loadgen import run_load
from exitserve.loadtest.open_loop import capacity, open_loop
from exitserve.loadtest.servers import exitserve_command, free_port, ort_peer_command, running


@dataclass
class ServerPlan:
    checkpoint: str
    settings: list[str] = field(default_factory=list)  # exitserve settings, NAME=VALUE
    concurrencies: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    duration: float = 10.0
    fraction: float = 0.7
    tail_seconds: float = 60.0
    measure_seconds: float = 20.0
    slo_factor: float = 3.0
    slo_load: float = 0.9
    policies: list[str] = field(default_factory=lambda: ["layered"])  # compared with the default's capacity


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for process {pid}")


def _exit_layer(resp: dict) -> int | None:
    return resp.get("exit_layer")


def _body(texts: list[str], threshold: float | None):
    def make(i: int) -> dict:
        payload: dict = {"text": texts[i % len(texts)]}
        if threshold is not None:
            payload["threshold"] = threshold
        return payload
    return make


def _sweep(plan: ServerPlan, urls: dict[str, tuple[str, float | None]], texts: list[str]) -> dict[str, list[dict]]:
    """Every server at every concurrency, taking turns; a warm-up pass of each first (not recorded)."""
    for url, threshold in urls.values():
        asyncio.run(run_load(f"{url}/predict", _body(texts, threshold), 4, 2.0))
    results: dict[str, list[dict]] = {name: [] for name in urls}
    with tqdm(total=len(urls) * len(plan.concurrencies), desc="server sweep", unit="point") as bar:
        for c in plan.concurrencies:
            for name, (url, threshold) in urls.items():
                load = asyncio.run(run_load(f"{url}/predict", _body(texts, threshold), c, plan.duration,
                                            exit_layer_of=_exit_layer))
                results[name].append(load.summary())
                bar.update()
    return results


def measure(plan: ServerPlan, hf_dir: Path, texts: list[str]) -> dict:
    """See the module docstring."""
    ports = free_port(), free_port()
    out: dict = {"concurrencies": plan.concurrencies, "duration_s": plan.duration, "settings": plan.settings}
    with ExitStack() as stack:
        ours = stack.enter_context(running(exitserve_command(plan.checkpoint, ports[0], *plan.settings), ports[0]))
        peer_cmd, peer_env = ort_peer_command(hf_dir, ports[1])
        peer = stack.enter_context(running(peer_cmd, ports[1], peer_env))
        out["servers"] = _sweep(plan, {EXITS_ON: (ours, None), EXITS_OFF: (ours, 1.0), ORT_PEER: (peer, None)}, texts)
        out["rss_mib"] = {"exitserve": rss_mib(ours.pid), ORT_PEER: rss_mib(peer.pid)}
        tail = asyncio.run(open_loop(ours, texts[:200], plan.fraction, plan.tail_seconds,
                                     measure_seconds=plan.measure_seconds))
        out["tail"] = tail
        peer_load = asyncio.run(open_loop(peer, texts[:200], plan.fraction, plan.tail_seconds,
                                          measure_seconds=plan.measure_seconds))
        same = asyncio.run(open_loop(ours, texts[:200], plan.fraction, plan.tail_seconds,
                                     capacity=peer_load["capacity_rps"]))
        out["same_load"] = {"peer": peer_load, "exitserve": same}
    unloaded = out["servers"][EXITS_ON][0]["p50_ms"]
    if unloaded and plan.slo_factor:
        out["slo"] = _slo_run(plan, texts, unloaded * plan.slo_factor)
    out["policies"] = {"default": tail["capacity_rps"], **{p: _capacity(plan, p, texts) for p in plan.policies}}
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _slo_run(plan: ServerPlan, texts: list[str], slo_ms: float) -> dict:
    port = free_port()
    settings = [*plan.settings, f"slo_ms={slo_ms:.2f}"]
    with running(exitserve_command(plan.checkpoint, port, *settings), port) as url:
        result = asyncio.run(open_loop(url, texts[:200], plan.slo_load, plan.tail_seconds,
                                       measure_seconds=plan.measure_seconds, slo_ms=slo_ms))
    return {"slo_ms": round(slo_ms, 2), **result}


def _capacity(plan: ServerPlan, policy: str, texts: list[str]) -> float:
    port = free_port()
    with running(exitserve_command(plan.checkpoint, port, *plan.settings, f"policy={policy}"), port) as url:
        return round(asyncio.run(capacity(url, texts[:200], seconds=plan.measure_seconds)), 1)
