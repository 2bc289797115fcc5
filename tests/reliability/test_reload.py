"""Reloading a model in a real `exitserve serve` process under load: a new checkpoint on SIGHUP (the
configured path is a symbolic link switched to the new directory) and through the admin route, damaged
ones refused both ways, on the same port throughout. Every request is answered (0 failed) and every
answer is exactly the one of the model version its response names (0 wrong)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import signal
import subprocess
import threading
import time

import httpx

from exitserve.loadtest.servers import exitserve_command, free_port, wait_ready
from exitserve.models.checkpoint import WEIGHTS
from exitserve.server.registry import model_version
from exitserve.server.service import PredictionService
from exitserve.server.settings import Settings
from tests.conftest import GLUE

ADMIN = {"Authorization": "Bearer adm"}
TIE = 1e-4  # a confidence this close to the threshold may exit a layer apart in another batch (float noise)


def answers_of(checkpoint, texts: list[str]) -> dict[str, tuple[str, int, float]]:
    """Each text's (label, exit layer, confidence) from the checkpoint, asked one at a time in-process."""
    service = PredictionService.load(Settings(checkpoint=checkpoint, warmup=False, gc_freeze=False))
    names = service.config.label_names

    async def ask():
        service.scheduler.start()
        try:
            return [(await service.predict([t])).predictions[0] for t in texts]
        finally:
            service.stop()

    return {t: (names[p.label_id], p.exit_layer, p.confidence) for t, p in zip(texts, asyncio.run(ask()), strict=True)}


def agrees(expected: tuple[str, int, float], label: str, layer: int, threshold: float = 0.55) -> bool:
    return label == expected[0] and (layer == expected[1] or abs(expected[2] - threshold) < TIE)


class Load:
    """Closed-loop clients alternating /predict and the Open Inference Protocol; every outcome recorded as
    (sent, answered, status or error, model version, text, label, exit layer)."""

    def __init__(self, base: str, texts: list[str], clients: int = 4):
        self.base, self.texts, self.stop = base, texts, threading.Event()
        self.outcomes: list[tuple] = []
        self.threads = [threading.Thread(target=self._client, args=(k,)) for k in range(clients)]

    def _ask(self, c: httpx.Client, i: int, text: str) -> tuple:
        if i % 2:
            r = c.post("/predict", json={"text": text})
            body = r.json()
            return r.status_code, r.headers.get("x-model-version"), text, body.get("prediction"), body.get("exit_layer")
        r = c.post("/v2/models/sst/infer", json={"inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]})
        body = r.json()
        out = {o["name"]: o["data"][0] for o in body.get("outputs", [])}
        return r.status_code, body.get("model_version"), text, out.get("label"), out.get("exit_layer")

    def _client(self, k: int) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as c:
            for i in itertools.count(k):
                if self.stop.is_set():
                    return
                text, sent = self.texts[i % len(self.texts)], time.monotonic()
                try:
                    row = self._ask(c, i, text)
                except httpx.HTTPError as exc:
                    row = (f"failed: {type(exc).__name__}", None, text, None, None)
                self.outcomes.append((sent, time.monotonic(), *row))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def wait_for(condition, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.05)


def test_reload_under_load_fails_nothing_and_every_answer_is_its_versions(
        tiny_checkpoint, tiny_other_checkpoint, tmp_path):
    texts = [row.split("\t")[0] for row in (GLUE / "SST-2" / "dev.tsv").read_text().splitlines()[1:17]]
    old, new = model_version(tiny_checkpoint), model_version(tiny_other_checkpoint)
    expected = {old: answers_of(tiny_checkpoint, texts), new: answers_of(tiny_other_checkpoint, texts)}
    assert expected[old] != expected[new]  # two versions a wrong switch could not hide behind
    damaged = shutil.copytree(tiny_checkpoint, tmp_path / "damaged")
    (damaged / WEIGHTS).write_bytes((damaged / WEIGHTS).read_bytes()[: 4096])
    current = tmp_path / "current"
    current.symlink_to(tiny_checkpoint)
    port, base = free_port(), ""
    cmd = exitserve_command(current, port, "admin_key=adm", "drain_timeout=20", names=["sst"])
    with open(tmp_path / "server.log", "w+") as log:
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, server)
            with httpx.Client(base_url=base, timeout=120) as admin, Load(base, texts) as load:

                def serving() -> str:
                    return admin.get("/info").json()["model_version"]

                def reloads(outcome: str) -> float:
                    line = f'exitserve_model_reloads_total{{model="sst",outcome="{outcome}"}}'
                    found = [x for x in admin.get("/metrics").text.splitlines() if x.startswith(line)]
                    return float(found[0].split()[-1]) if found else 0.0

                wait_for(lambda: len(load.outcomes) >= 40)
                current.unlink()
                current.symlink_to(tiny_other_checkpoint)  # the new version where the model's path points
                hup = time.monotonic()
                server.send_signal(signal.SIGHUP)
                wait_for(lambda: serving() == new)
                switched = time.monotonic()
                refused = admin.post("/admin/models/sst/reload", json={"checkpoint": str(damaged)}, headers=ADMIN)
                assert refused.status_code == 422 and refused.json()["error"]["type"] == "reload_refused"
                assert "corrupt or truncated" in refused.json()["error"]["message"]
                current.unlink()
                current.symlink_to(damaged)
                server.send_signal(signal.SIGHUP)  # refused too: logged, the new version keeps serving
                wait_for(lambda: reloads("refused") == 2)
                assert serving() == new
                back_sent = time.monotonic()
                back = admin.post("/admin/models/sst/reload", json={"checkpoint": str(tiny_checkpoint)},
                                  headers=ADMIN)
                assert back.status_code == 200 and back.json()["changed"] and back.json()["version"] == old
                back_done, count = time.monotonic(), len(load.outcomes)
                wait_for(lambda: len(load.outcomes) >= count + 40)
                assert reloads("done") == 2
            assert server.poll() is None  # the same process, on the same port, throughout
        finally:
            server.terminate()
            server.wait(30)
        log.seek(0)
        assert log.read().count("reload refused, the old version keeps serving") == 2
    outcomes = load.outcomes
    failed = [o for o in outcomes if o[2] != 200]
    wrong = [o for o in outcomes if o[2] == 200 and not agrees(expected[o[3]][o[4]], o[5], o[6])]
    print(f"\n{len(outcomes)} requests during 2 reloads and 2 refusals: {len(failed)} failed, {len(wrong)} wrong")
    assert not failed and not wrong, (failed[:5], wrong[:5])
    assert {o[3] for o in outcomes if o[1] < hup} == {old}  # answered before the first reload began
    assert {o[3] for o in outcomes if switched < o[0] and o[1] < back_sent} == {new}
    assert {o[3] for o in outcomes if o[0] > back_done} == {old}
