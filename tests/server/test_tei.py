"""The text-embeddings-inference / Hugging Face Inference API routes (server/tei.py): TEI's request and
answer shapes, the Hub client's payload, the early-exit extras in headers, TEI's error format."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_LAYERS
from tests.server.conftest import make_client

TEXT = "a gorgeous, witty, seductive movie."


def tei_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and isinstance(body["error"], str)
    return body["error"]


def ranked(labels: list[dict]) -> bool:
    return [x["score"] for x in labels] == sorted((x["score"] for x in labels), reverse=True)


@pytest.mark.parametrize("path", ["/", "/invocations", "/predict", "/models/tiny-sst2"])
def test_a_text_gets_teis_ranked_labels_and_the_same_answer_as_predict(client, path):
    mine = client.post("/predict", json={"text": TEXT}).json()
    r = client.post(path, json={"inputs": TEXT})
    assert r.status_code == 200, r.text
    labels = r.json()
    assert {x["label"] for x in labels} == {"negative", "positive"} and ranked(labels)
    assert labels[0] == {"label": mine["prediction"], "score": pytest.approx(mine["confidence"], abs=1e-6)}
    assert {x["label"]: x["score"] for x in labels} == pytest.approx(mine["probabilities"], abs=1e-6)
    assert r.headers["x-exit-layer"] == str(mine["exit_layer"])
    assert r.headers["x-model"] == "tiny-sst2" and len(r.headers["x-model-version"]) == 12
    assert float(r.headers["x-exit-threshold"]) == 0.55 and float(r.headers["x-total-time"]) >= 0


def test_a_batch_is_a_list_of_lists_and_keeps_input_order(client, sst2_texts):
    texts = sst2_texts[:5]
    r = client.post("/", json={"inputs": [[t] for t in texts]})
    singles = [client.post("/predict", json={"text": t}).json() for t in texts]
    assert [answer[0]["label"] for answer in r.json()] == [s["prediction"] for s in singles]
    assert r.headers["x-exit-layers"] == ",".join(str(s["exit_layer"]) for s in singles)


def test_the_hub_clients_payload_gets_a_list_of_one_list_with_top_k(client):
    full = client.post("/", json={"inputs": TEXT, "parameters": {}}).json()
    assert len(full) == 1 and len(full[0]) == 2 and ranked(full[0])
    top = client.post("/", json={"inputs": TEXT, "parameters": {"top_k": 1, "function_to_apply": "softmax"}}).json()
    assert top == [full[0][:1]]


def test_the_threshold_comes_from_the_body_or_the_header(client):
    def layer(**kwargs) -> str:
        return client.post("/", **kwargs).headers["x-exit-layer"]

    assert layer(json={"inputs": TEXT, "threshold": 1.0}) == str(TINY_LAYERS)
    assert layer(json={"inputs": TEXT}, headers={"x-exit-threshold": "1"}) == str(TINY_LAYERS)
    assert layer(json={"inputs": TEXT}, headers={"x-exit-threshold": "0"}) == "1"
    assert layer(json={"inputs": TEXT, "threshold": 0.0}, headers={"x-exit-threshold": "1"}) == "1"  # body first
    assert "x-exit-threshold" in tei_error(client.post("/", json={"inputs": TEXT},
                                                       headers={"x-exit-threshold": "nan"}), 422)


def test_pairs_are_teis_two_string_list(tiny_pair_checkpoint):
    with make_client(tiny_pair_checkpoint, warmup=False) as c:
        mine = c.post("/predict", json={"text": "a man plays", "text_pair": "someone plays"}).json()
        one = c.post("/", json={"inputs": ["a man plays", "someone plays"]}).json()
        assert one == [{"label": "value", "score": pytest.approx(mine["prediction"], abs=1e-6)}]
        assert len(c.post("/", json={"inputs": [["a", "b"], ["c", "d"]]}).json()) == 2
        assert "scores pairs" in tei_error(c.post("/", json={"inputs": "alone"}), 422)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": ["a", "b"]}, "[a, b] is one pair"),  # TEI's pair, to a single-text model
        ({"inputs": ["a", "b", "c"]}, "list of 3 strings"),
        ({"inputs": []}, "at least one"),
        ({"inputs": [["a"], []]}, "inputs[1]"),
        ({"inputs": ""}, "empty text"),
        ({"inputs": [["x"]] * 9}, "at most 8"),
        ({"inputs": TEXT, "raw_scores": True}, "raw_scores"),
        ({"inputs": TEXT, "parameters": {"function_to_apply": "sigmoid"}}, "function_to_apply"),
        ({"inputs": TEXT, "truncation_direction": "left"}, "right truncation"),
        ({"inputs": TEXT, "threshold": 2}, "threshold"),
        ({"inputs": 3}, "inputs"),
        ({"inputs": TEXT, "colour": "red"}, "colour"),
        ({"inputs": TEXT, "model": "other"}, "no model named 'other'"),
    ],
)
def test_bad_input_gets_teis_error_format_and_a_4xx(client, body, fragment):
    r = client.post("/", json=body)
    assert fragment in tei_error(r, 404 if "model" in body else 422)
    assert r.json()["error_type"] == "Validation"
    assert client.post("/", json={"inputs": "still serving"}).status_code == 200


def test_refusals_before_the_route_are_in_teis_format_too(tiny_checkpoint):
    with make_client(tiny_checkpoint, warmup=False, api_key="s3cret", max_body_bytes=1000) as c:
        tei_error(c.post("/", json={"inputs": TEXT}), 401)
        tei_error(c.post("/models/tiny-sst2", json={"inputs": TEXT}), 401)
        key = {"Authorization": "Bearer s3cret"}
        assert c.post("/", json={"inputs": TEXT}, headers=key).status_code == 200
        tei_error(c.post("/", json={"inputs": "x" * 2000}, headers=key), 413)
        tei_error(c.post("/", content=b"{not json", headers={**key, "content-type": "application/json"}), 422)
        r = c.post("/", content=b'{"inputs": "x"}', headers={**key, "content-type": "text/plain"})
        assert tei_error(r, 415) and r.json()["error_type"] == "Validation"
