"""Locust load test for any exitserve deployment.

    pip install locust
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000            # web UI on :8089
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 60s

Sends real GLUE sentences (SST-2 dev; MRPC dev pairs when the model takes pairs, read from /info),
single texts and small lists, with a mix of thresholds: the calibrated default, lower, higher, and
1.0 (every layer). Set EXITSERVE_API_KEY if the deployment requires a key.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from locust import HttpUser, between, task

DATA = json.loads((Path(__file__).parent / "data" / "sentences.json").read_text())
THRESHOLDS = [None, None, 0.6, 0.8, 0.95, 1.0]  # None: the server's calibrated default


class ExitserveUser(HttpUser):
    wait_time = between(0.0, 0.2)

    def on_start(self) -> None:
        key = os.environ.get("EXITSERVE_API_KEY")
        self.client.headers.update({"Authorization": f"Bearer {key}"} if key else {})
        info = self.client.get("/info", name="/info").json()
        self.pairs = bool(info.get("pair_input"))

    def _body(self, n: int) -> dict:
        body: dict = {}
        if self.pairs:
            chosen = random.sample(DATA["pairs"], n)
            body["text"] = [a for a, _ in chosen] if n > 1 else chosen[0][0]
            body["text_pair"] = [b for _, b in chosen] if n > 1 else chosen[0][1]
        else:
            chosen = random.sample(DATA["texts"], n)
            body["text"] = chosen if n > 1 else chosen[0]
        threshold = random.choice(THRESHOLDS)
        if threshold is not None:
            body["threshold"] = threshold
        return body

    @task(8)
    def predict_one(self) -> None:
        with self.client.post("/predict", json=self._body(1), name="/predict (1)", catch_response=True) as r:
            if r.status_code == 200 and "exit_layer" not in r.json():
                r.failure("no exit_layer in the response")

    @task(2)
    def predict_batch(self) -> None:
        n = random.randint(2, 8)
        with self.client.post("/predict", json=self._body(n), name="/predict (list)", catch_response=True) as r:
            if r.status_code == 200 and len(r.json().get("results", [])) != n:
                r.failure("wrong number of results")
