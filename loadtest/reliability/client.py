"""The open-loop driver that records every request (on the light client of loadtest.http_client).

Latency is counted from a request's *scheduled* send time, so a generator that falls behind cannot
hide a slow server (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from exitserve.loadtest.http_client import Client


@dataclass
class Record:
    phase: str
    at: float  # scheduled send time, seconds since the run started
    latency: float  # scheduled send -> whole response read, seconds
    status: int  # HTTP status; 0 = transport error
    error: str = ""  # the error type from the body, or the transport exception's name
    correct: bool | None = None  # 200s: same prediction and exit layer as the reference answer
    late: float = 0.0  # how far behind schedule the generator sent it, seconds (it must stay near 0)


@dataclass
class Phase:
    name: str
    rate: float  # offered requests per second (Poisson arrivals)
    seconds: float


def predict_body(text: str) -> bytes:
    return json.dumps({"text": text}).encode()


def answer_key(answer: dict) -> tuple:
    """What must not change under load: exitserve's prediction and exit layer (a peer's label)."""
    return answer.get("prediction", answer.get("label")), answer.get("exit_layer")


async def references(client: Client, texts: list[str]) -> dict[str, tuple]:
    """Each text's answer (`answer_key`) asked alone, one at a time: the answers under load must match."""
    refs = {}
    for text in texts:
        status, body = await client.request("POST", "/predict", predict_body(text))
        if status != 200:
            raise RuntimeError(f"reference request failed with {status}: {body[:200]!r}")
        refs[text] = answer_key(json.loads(body))
    return refs


async def timed(client: Client, phase: str, at: float, start: float, text: str,
                refs: dict[str, tuple]) -> Record:
    """One /predict scheduled `at` seconds after `start` (time.monotonic())."""
    late = time.monotonic() - start - at
    try:
        status, body = await client.request("POST", "/predict", predict_body(text))
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        return Record(phase, at, time.monotonic() - start - at, 0, type(exc).__name__, late=late)
    latency = time.monotonic() - start - at
    answer = json.loads(body)
    if status == 200:
        correct = answer_key(answer) == refs[text]
        return Record(phase, at, latency, status, correct=correct, late=late)
    return Record(phase, at, latency, status, answer.get("error", {}).get("type", "?"), late=late)


async def drive(client: Client, phases: list[Phase], texts: list[str], refs: dict[str, tuple],
                seed: int = 0, on_done: Callable[[Record], None] | None = None) -> list[Record]:
    """Open loop: Poisson arrivals at each phase's rate, whatever the server's answers."""
    rng = random.Random(seed)
    start = time.monotonic()
    tasks: list[asyncio.Task] = []
    offset = 0.0
    for phase in phases:
        t = rng.expovariate(phase.rate)
        while t < phase.seconds:
            delay = start + offset + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(timed(client, phase.name, offset + t, start, rng.choice(texts), refs))
            if on_done is not None:
                task.add_done_callback(lambda done: on_done(done.result()))
            tasks.append(task)
            t += rng.expovariate(phase.rate)
        offset += phase.seconds
    return list(await asyncio.gather(*tasks))


async def sustained_rate(client: Client, texts: list[str], concurrency: int, seconds: float) -> float:
    """Closed loop: `concurrency` clients back to back for `seconds`; answered (200) requests per second."""
    end = time.monotonic() + seconds
    answered = 0
    rng = random.Random(1)

    async def worker() -> None:
        nonlocal answered
        while time.monotonic() < end:
            status, _ = await client.request("POST", "/predict", predict_body(rng.choice(texts)))
            answered += status == 200

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answered / (time.monotonic() - started)
