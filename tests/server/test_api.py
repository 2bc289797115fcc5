"""The HTTP contract, on a tiny real checkpoint (the real scheduler runs underneath)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import TINY_LAYERS
from tests.server.conftest import make_client


def error_of(response, status: int, type_: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    if type_:
        assert body["error"]["type"] == type_
    return body["error"]["message"]


def test_single_text(client):
    r = client.post("/predict", json={"text": "a gorgeous, witty, seductive movie."})
    assert r.status_code == 200
    body = r.json()
    assert body["prediction"] in ("negative", "positive")
    assert body["label_id"] == ["negative", "positive"].index(body["prediction"])
    assert 1 <= body["exit_layer"] <= TINY_LAYERS and body["num_layers"] == TINY_LAYERS
    assert body["threshold"] == 0.55  # the checkpoint's default
    assert set(body["probabilities"]) == {"negative", "positive"}
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["confidence"] == pytest.approx(max(body["probabilities"].values()), abs=1e-6)
    assert "trace" not in body
    for header in ("x-total-time", "x-queue-time", "x-inference-time", "x-tokenization-time"):
        assert float(r.headers[header]) >= 0
    assert r.headers["x-exit-layer"] == str(body["exit_layer"])


def test_list_keeps_input_order_and_matches_single_calls(client, sst2_texts):
    texts = sst2_texts[:6]
    batch = client.post("/predict", json={"text": texts}).json()["results"]
    singles = [client.post("/predict", json={"text": t}).json() for t in texts]
    assert [b["exit_layer"] for b in batch] == [s["exit_layer"] for s in singles]
    assert [b["prediction"] for b in batch] == [s["prediction"] for s in singles]


def test_threshold_override_and_trace(client):
    text = {"text": "the plot is nothing but boilerplate clichés"}
    assert client.post("/predict", json={**text, "threshold": 1.0}).json()["exit_layer"] == TINY_LAYERS
    assert client.post("/predict", json={**text, "threshold": 0.0}).json()["exit_layer"] == 1
    body = client.post("/predict", json={**text, "threshold": 1.0, "return_trace": True}).json()
    assert [t["layer"] for t in body["trace"]] == list(range(1, TINY_LAYERS + 1))
    assert body["trace"][-1]["prediction"] == body["prediction"]
    assert body["threshold"] == 1.0


@pytest.mark.parametrize("trace", [False, True])
def test_answers_have_exactly_the_documented_shape(client, tiny_pair_checkpoint, trace):
    """The route builds its answers as plain JSON (one serialisation, no second validation): they must
    still be what /openapi.json documents, for classification and regression, single and batched."""
    from exitserve.server.schemas import PredictBatchResponse, PredictResult

    single = client.post("/predict", json={"text": "a fine film", "return_trace": trace}).json()
    assert PredictResult.model_validate(single).model_dump(exclude_none=True) == single
    batch = client.post("/predict", json={"text": ["a fine film", "a dull one"], "return_trace": trace}).json()
    assert PredictBatchResponse.model_validate(batch).model_dump(exclude_none=True) == batch
    with make_client(tiny_pair_checkpoint, warmup=False) as pairs:
        value = pairs.post("/predict", json={"text": "a", "text_pair": "b", "return_trace": trace}).json()
    assert PredictResult.model_validate(value).model_dump(exclude_none=True) == value
    assert "label_id" not in value and "probabilities" not in value and isinstance(value["prediction"], float)


def test_health_ready_info_metrics_docs(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}
    info = client.get("/info").json()
    assert info["labels"] == ["negative", "positive"] and info["num_layers"] == TINY_LAYERS
    assert info["default_threshold"] == 0.55 and info["criterion"] == "max-prob"
    assert info["limits"]["max_inputs_per_request"] == 8 and info["version"]
    client.post("/predict", json={"text": ["one", "two"], "threshold": 0.0})
    metrics = client.get("/metrics").text
    for name in ("exitserve_requests_total", "exitserve_predictions_total", "exitserve_exit_layer_bucket",
                 "exitserve_layers_saved_total", "exitserve_average_layers_saved",
                 "exitserve_request_duration_seconds_bucket", "exitserve_tokenization_duration_seconds_bucket",
                 "exitserve_queue_duration_seconds_bucket", "exitserve_inference_duration_seconds_bucket",
                 "exitserve_batch_size_bucket", "exitserve_queue_size"):
        assert name in metrics, name
    assert 'exitserve_requests_total{route="/predict",status="200"}' in metrics
    assert client.get("/openapi.json").json()["paths"]["/predict"]["post"]
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("warmup", [False, True])  # warm-up batches are not traffic: never counted
def test_average_layers_saved_is_layers_saved_per_prediction(tiny_checkpoint, warmup):
    with make_client(tiny_checkpoint, warmup=warmup) as c:
        c.post("/predict", json={"text": ["a", "b", "c"], "threshold": 0.0})  # 3 x (L - 1) saved
        c.post("/predict", json={"text": "d", "threshold": 1.0})  # 0 saved
        text = c.get("/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("exitserve_average_layers_saved{"))
    assert float(line.split()[-1]) == pytest.approx(3 * (TINY_LAYERS - 1) / 4)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"text": ""}, "empty text"),
        ({"text": "   "}, "empty text"),
        ({"text": []}, "at least one text"),
        ({"text": 42}, "text"),
        ({"text": ["ok", 3]}, "text"),
        ({"text": "ok", "threshold": 1.5}, "threshold"),
        ({"text": "ok", "threshold": -0.1}, "threshold"),
        ({"text": "ok", "threshold": "high"}, "threshold"),
        ({"text": ["x"] * 9}, "at most 8 per request"),
        ({"text": "x" * 501}, "at most 500"),
        ({"text": "ok", "text_pair": "other"}, "takes single texts"),
        ({"text": "ok", "colour": "red"}, "colour"),
        ({}, "text"),
    ],
)
def test_bad_input_gets_a_clear_422(client, body, fragment):
    assert fragment in error_of(client.post("/predict", json=body), 422)
    assert client.post("/predict", json={"text": "still serving"}).status_code == 200


def test_invalid_json_body_too_large_and_unknown_route(client):
    error_of(client.post("/predict", content=b"{not json", headers={"content-type": "application/json"}), 422)
    error_of(client.post("/predict", json={"text": "x" * 30_000}), 413, "payload_too_large")
    error_of(client.get("/nope"), 404, "not_found")
    error_of(client.get("/predict"), 405)


def test_truncation_default_and_reject_mode(tiny_checkpoint):
    long_text = "word " * 400  # > 128 tokens
    with make_client(tiny_checkpoint, warmup=False) as c:
        assert c.post("/predict", json={"text": long_text}).status_code == 200
    with make_client(tiny_checkpoint, warmup=False, truncate=False) as c:
        assert "at most 128" in error_of(c.post("/predict", json={"text": long_text}), 422, "input_too_long")


def test_api_key_guards_predict_and_info_only(tiny_checkpoint):
    with make_client(tiny_checkpoint, warmup=False, api_key="s3cret") as c:
        error_of(c.post("/predict", json={"text": "hi"}), 401, "unauthorized")
        error_of(c.post("/predict", json={"text": "hi"}, headers={"Authorization": "Bearer wrong"}), 401)
        error_of(c.get("/info"), 401)
        ok = c.post("/predict", json={"text": "hi"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        for route in ("/health", "/ready", "/metrics"):
            assert c.get(route).status_code == 200


def test_pair_regression_model(tiny_pair_checkpoint):
    with make_client(tiny_pair_checkpoint, warmup=False) as c:
        r = c.post("/predict", json={"text": "A man plays guitar.", "text_pair": "Someone plays a guitar."})
        body = r.json()
        assert isinstance(body["prediction"], float) and "probabilities" not in body and "label_id" not in body
        batch = c.post("/predict", json={"text": ["a", "b"], "text_pair": ["c", "d"]}).json()["results"]
        assert len(batch) == 2
        assert "scores pairs" in error_of(c.post("/predict", json={"text": "a"}), 422)
        assert "same length" in error_of(c.post("/predict", json={"text": ["a", "b"], "text_pair": ["c"]}), 422)
        assert c.get("/info").json()["pair_input"] is True


def test_info_stays_small_however_large_the_calibration_record(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    path = ckpt / "exit_config.json"
    tests = [{"threshold": i / 1e5, "risk": 0.01, "p_value": 0.5} for i in range(15_000)]  # ~0.8 MB, three times
    record = {"method": "risk", "threshold": 0.55, "tests": tests, "note": "x" * 100_000,
              "report": {"samples": 100, "layers_saved": 0.4, "rows": tests},
              "variants": {"onnxruntime-int8": {"threshold": [0.6, 0.6, 0.7, 1.0], "tests": tests}}}
    path.write_text(json.dumps({**json.loads(path.read_text()), "calibration": record}))
    with make_client(ckpt, warmup=False) as c:
        r = c.get("/info")
    assert r.status_code == 200 and len(r.content) < 5_000  # was the whole record: megabytes
    calibration = r.json()["calibration"]
    assert calibration["threshold"] == 0.55 and calibration["report"] == {"samples": 100, "layers_saved": 0.4}
    assert calibration["variants"]["onnxruntime-int8"] == {"threshold": [0.6, 0.6, 0.7, 1.0]}
    assert "tests" not in calibration and len(calibration["note"]) == 200
