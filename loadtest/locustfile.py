"""Locust load test for any exitserve deployment, through each of its APIs.

    pip install locust
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000            # web UI on :8089
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 60s

Sends real GLUE sentences (SST-2 dev; MRPC dev pairs to a model that takes pairs, read from /models),
single texts and small lists, with a mix of thresholds: the calibrated default, lower, higher, and
1.0 (every layer); to exitserve's /predict, the TEI / Hugging Face route (/models/{name}, the threshold
in the x-exit-threshold header) and the Open Inference Protocol (/v2/models/{name}/infer, the threshold
as a parameter). Each simulated user picks one of the served models. Set EXITSERVE_API_KEY if the
deployment requires a key.
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
        model = random.choice(self.client.get("/models", name="/models").json()["models"])
        self.model, self.pairs = model["name"], model["pair_input"]

    def _inputs(self, n: int) -> tuple[list[str], list[str] | None]:
        if self.pairs:
            chosen = random.sample(DATA["pairs"], n)
            return [a for a, _ in chosen], [b for _, b in chosen]
        return random.sample(DATA["texts"], n), None

    def _body(self, n: int) -> dict:
        texts, pairs = self._inputs(n)
        body: dict = {"text": texts if n > 1 else texts[0], "model": self.model}
        if pairs is not None:
            body["text_pair"] = pairs if n > 1 else pairs[0]
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

    @task(3)
    def tei_one(self) -> None:
        """TEI's body as huggingface_hub's InferenceClient(base_url=.../models/NAME) sends it."""
        texts, pairs = self._inputs(1)
        threshold = random.choice(THRESHOLDS)
        headers = {} if threshold is None else {"x-exit-threshold": str(threshold)}
        body = {"inputs": [texts[0], pairs[0]] if pairs else texts[0], "parameters": {}}
        with self.client.post(f"/models/{self.model}", json=body, headers=headers, name="/models/{name} (TEI)",
                              catch_response=True) as r:
            if r.status_code == 200 and "x-exit-layer" not in r.headers:
                r.failure("no x-exit-layer header")

    @task(3)
    def oip_infer(self) -> None:
        """The Open Inference Protocol with BYTES tensors, as tritonclient sends them (JSON form)."""
        n = random.randint(1, 4)
        texts, pairs = self._inputs(n)
        inputs = [{"name": "text", "shape": [n], "datatype": "BYTES", "data": texts}]
        if pairs:
            inputs.append({"name": "text_pair", "shape": [n], "datatype": "BYTES", "data": pairs})
        threshold = random.choice(THRESHOLDS)
        body = {"inputs": inputs, **({"parameters": {"threshold": threshold}} if threshold is not None else {})}
        with self.client.post(f"/v2/models/{self.model}/infer", json=body, name="/v2/models/{name}/infer",
                              catch_response=True) as r:
            if r.status_code == 200 and not {"exit_layer", "confidence"} <= {o["name"] for o in r.json()["outputs"]}:
                r.failure("no exit_layer or confidence output")
