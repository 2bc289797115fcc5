"""Steady closed-loop load on a cluster, every answer checked, and what a timeline of it shows.

`SteadyLoad` runs `clients` workers in a thread of its own inside the cluster's client namespace;
each sends single-text /predict requests back to back until stopped. Every answer is checked
against the answer of the model that says it answered it (the `x-exitserve-model` header), asked
beforehand from the plain app in this process (`expected_answers`): an answer is `ok`, `wrong` (a
200 that matches no model's answer: wrong model, wrong prediction or exit layer), or `failed` (any
other status, or no response at all).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient

from exitserve.loadtest import netns
from exitserve.loadtest.http_client import Client
from exitserve.loadtest.reliability.report import pct
from exitserve.server.app import create_app
from exitserve.server.ray_proxy import RETRIES_HEADER
from exitserve.server.ray_serve import MODEL_HEADER, REPLICA_HEADER
from exitserve.server.settings import Settings

SENTENCES = Path(__file__).parent / "data" / "sentences.json"
CONFIDENCE_TOLERANCE = 1e-4  # replicas batch rows differently from the one-at-a-time reference


def sentences(count: int = 64) -> list[str]:
    return json.loads(SENTENCES.read_text())["texts"][:count]


def expected_answers(checkpoint: str | Path, texts: list[str]) -> tuple[str, list[dict]]:
    """(the model's name as the replicas report it, its answer to each text asked alone)."""
    with TestClient(create_app(Settings(checkpoint=checkpoint, warmup=False))) as plain:
        name = plain.get("/info").json()["model"]
        return name.lower(), [plain.post("/predict", json={"text": t}).json() for t in texts]


def parsed(payload: bytes) -> dict:
    try:
        answer = json.loads(payload)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def same_answer(got: dict, want: dict) -> bool:
    return (got.get("prediction"), got.get("exit_layer")) == (want["prediction"], want["exit_layer"]) and abs(
        got.get("confidence", -1) - want["confidence"]) <= CONFIDENCE_TOLERANCE


@dataclass
class Answer:
    sent: float  # seconds since the load started
    done: float
    status: int  # 0: no HTTP response (connection refused or reset)
    verdict: str  # ok | wrong | failed
    model: str = ""
    replica: str = ""
    retries: int = 0  # attempts the proxy needed beyond the first (server/ray_proxy.py)


class SteadyLoad:
    """Closed-loop load on host:port's /predict from inside `namespace`; `start()`, then `stop()` -> answers
    (requests still in flight at `stop()` are dropped, not counted)."""

    def __init__(self, namespace: str, host: str, port: int, texts: list[str], expected: dict[str, list[dict]],
                 clients: int = 4):
        self.namespace, self.host, self.port, self.texts, self.expected = namespace, host, port, texts, expected
        self.clients = clients
        self.answers: list[Answer] = []
        self.start_time = 0.0
        self._next = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)

    def start(self) -> SteadyLoad:
        self.start_time = time.monotonic()
        self._thread.start()
        return self

    def clients_now(self, clients: int) -> None:
        """Change the number of clients (a load step); takes effect within one request."""
        self.clients = clients

    def now(self) -> float:
        return time.monotonic() - self.start_time

    def stop(self) -> list[Answer]:
        self._stop.set()
        self._thread.join()
        return self.answers

    def _run(self) -> None:
        with netns.entered(self.namespace):
            asyncio.run(self._load())

    async def _load(self) -> None:
        client = Client(self.host, self.port)
        workers: list[asyncio.Task] = []
        try:
            while not self._stop.is_set():
                while len(workers) < self.clients:
                    workers.append(asyncio.create_task(self._worker(client)))
                while len(workers) > self.clients:
                    workers.pop().cancel()
                await asyncio.sleep(0.05)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            client.close()

    async def _worker(self, client: Client) -> None:
        while True:
            text_index = next(self._next) % len(self.texts)
            body = json.dumps({"text": self.texts[text_index]}).encode()
            sent = self.now()
            try:
                status, headers, payload = await client.fetch("POST", "/predict", body)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                status, headers, payload = 0, {}, b""
            answer = Answer(sent, self.now(), status, "failed", headers.get(MODEL_HEADER, ""),
                            headers.get(REPLICA_HEADER, ""), int(headers.get(RETRIES_HEADER, 0)))
            if status == 200:
                want = self.expected.get(answer.model)
                answer.verdict = "ok" if want and same_answer(parsed(payload), want[text_index]) else "wrong"
            self.answers.append(answer)
            if status == 0:
                await asyncio.sleep(0.05)  # nothing listening: do not spin


def counts(answers: list[Answer]) -> dict:
    verdicts = Counter(a.verdict for a in answers)
    failed = verdicts["failed"]
    return {"requests": len(answers), "ok": verdicts["ok"], "wrong": verdicts["wrong"], "failed": failed,
            "failed_pct": round(100 * failed / len(answers), 3) if answers else None,
            "statuses": dict(Counter(str(a.status) for a in answers if a.verdict == "failed")),
            "retried": sum(a.retries > 0 for a in answers),
            "models": dict(Counter(a.model for a in answers if a.verdict == "ok"))}


def latencies(answers: list[Answer]) -> dict:
    """p50/p99/max of the answers' latency, in ms."""
    values = [(a.done - a.sent) * 1000 for a in answers]
    return {f"p{p}": round(pct(values, p), 1) if values else None for p in (50, 99)} | {
        "max": round(max(values), 1) if values else None}


def throughput(answers: list[Answer], bucket: float = 1.0) -> list[tuple[float, float]]:
    """(bucket start, ok answers per second completed in it) over the whole run."""
    if not answers:
        return []
    per = Counter(int(a.done // bucket) for a in answers if a.verdict == "ok")
    return [(k * bucket, per.get(k, 0) / bucket) for k in range(int(max(a.done for a in answers) // bucket) + 1)]


def recovered_after(answers: list[Answer], event: float, baseline_from: float, fraction: float = 0.8,
                    hold: int = 3) -> tuple[float, float | None]:
    """(the ok-rate before `event`, the seconds after it until `hold` consecutive seconds run at
    >= `fraction` of that rate again; None if they never do). The first second after the event is
    never counted as recovered: a rate from before the event would carry over."""
    rates = throughput(answers)
    before = [r for t, r in rates if baseline_from <= t < event - 1]
    baseline = statistics.median(before) if before else 0.0
    after = [(t, r) for t, r in rates if t >= event]
    for k in range(1, len(after) - hold + 1):
        if all(r >= fraction * baseline for _, r in after[k:k + hold]):
            return baseline, round(after[k][0] - event, 1)
    return baseline, None


def plot_timeline(path: Path, answers: list[Answer], events: dict[str, float],
                  replicas: list[tuple[float, int]], title: str) -> None:
    """Ok answers per second, failed/wrong answers (red), the running replicas (steps) and the events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    rates = throughput(answers)
    ax.plot([t for t, _ in rates], [r for _, r in rates], label="ok answers/s")
    bad = [a.done for a in answers if a.verdict != "ok"]
    if bad:
        ax.plot(bad, [0] * len(bad), "rx", label=f"failed or wrong ({len(bad)})")
    for name, t in events.items():
        ax.axvline(t, color="grey", linestyle="--")
        ax.annotate(name, (t, ax.get_ylim()[1]), rotation=90, va="top", ha="right", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_ylabel("answers per second")
    if replicas:
        twin = ax.twinx()
        twin.step([t for t, _ in replicas], [n for _, n in replicas], where="post", color="green", alpha=0.6,
                  label="running replicas")
        twin.set_ylabel("running replicas")
        twin.set_ylim(0, max(n for _, n in replicas) + 1)
        twin.legend(loc="lower right")
    ax.legend(loc="lower left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
