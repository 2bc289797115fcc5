"""The Open Inference Protocol routes (server/oip.py): health, metadata, versions, inference with JSON
and with binary tensor data (hand-built bytes here; tritonclient in test_clients.py), the error format."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tests.conftest import TINY_LAYERS
from tests.server.conftest import make_client

TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is a mess", "fine"]
V2 = "/v2/models/tiny-sst2"


def oip_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


def text_input(texts, name: str = "text", **extra) -> dict:
    return {"name": name, "shape": [len(texts)], "datatype": "BYTES", "data": texts, **extra}


def outputs(body: dict) -> dict:
    return {o["name"]: o for o in body["outputs"]}


def test_health_and_metadata(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    server = client.get("/v2").json()
    assert server["name"] == "exitserve" and "binary_tensor_data" in server["extensions"]
    meta = client.get(V2).json()
    version = meta["versions"][0]
    assert meta["name"] == "tiny-sst2" and meta["platform"] == "exitserve_onnxruntime"
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert {(o["name"], o["datatype"], tuple(o["shape"])) for o in meta["outputs"]} == {
        ("label", "BYTES", (-1,)), ("probabilities", "FP32", (-1, 2)), ("confidence", "FP32", (-1,)),
        ("exit_layer", "INT32", (-1,))}
    assert version == client.get("/info").json()["model_version"]
    assert client.get(f"{V2}/versions/{version}").json() == meta
    assert client.get(f"{V2}/ready").json() == {"name": "tiny-sst2", "ready": True}
    assert client.get(f"{V2}/versions/{version}/ready").status_code == 200
    assert "no version" in oip_error(client.get(f"{V2}/versions/0000/ready"), 404)
    assert "no model named" in oip_error(client.get("/v2/models/nope"), 404)


def test_infer_answers_as_predict_does(client):
    mine = client.post("/predict", json={"text": TEXTS}).json()["results"]
    r = client.post(f"{V2}/infer", json={"id": "42", "inputs": [text_input(TEXTS)]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "42" and body["model_name"] == "tiny-sst2"
    assert body["model_version"] == r.headers["x-model-version"]
    out = outputs(body)
    assert out["label"]["data"] == [m["prediction"] for m in mine]
    assert out["exit_layer"] == {"name": "exit_layer", "datatype": "INT32", "shape": [3],
                                 "data": [m["exit_layer"] for m in mine]}
    assert out["confidence"]["data"] == pytest.approx([m["confidence"] for m in mine], abs=1e-6)
    assert out["probabilities"]["shape"] == [3, 2]
    assert out["probabilities"]["data"] == pytest.approx(
        [m["probabilities"][label] for m in mine for label in ("negative", "positive")], abs=1e-6)


def test_named_outputs_parameters_and_nested_data(client):
    body = {"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["x"], ["y"]]}],
            "outputs": [{"name": "exit_layer"}], "parameters": {"threshold": 1.0}}
    r = client.post(f"{V2}/versions/{client.get(V2).json()['versions'][0]}/infer", json=body)
    assert [o["name"] for o in r.json()["outputs"]] == ["exit_layer"]
    assert r.json()["outputs"][0]["data"] == [TINY_LAYERS] * 2 and r.json()["parameters"] == {"threshold": 1.0}
    r = client.post(f"{V2}/infer", json={"inputs": [text_input(["x"])]}, headers={"x-exit-threshold": "0"})
    assert outputs(r.json())["exit_layer"]["data"] == [1]


def test_binary_tensor_data_in_and_out(client):
    """Triton's extension, byte for byte: length-prefixed BYTES in, little-endian tensors out."""
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in TEXTS)
    header = json.dumps({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    r = client.post(f"{V2}/infer", content=header + raw, headers={"inference-header-content-length": str(len(header))})
    assert r.status_code == 200, r.text
    length = int(r.headers["inference-header-content-length"])
    meta, tail = json.loads(r.content[:length]), r.content[length:]
    sizes = [o["parameters"]["binary_data_size"] for o in meta["outputs"]]
    assert all("data" not in o for o in meta["outputs"]) and sum(sizes) == len(tail)
    chunks = dict(zip((o["name"] for o in meta["outputs"]), np.split(np.frombuffer(tail, np.uint8),
                                                                      np.cumsum(sizes)[:-1]), strict=True))
    expected = outputs(client.post(f"{V2}/infer", json={"inputs": [text_input(TEXTS)]}).json())
    assert chunks["exit_layer"].view("<i4").tolist() == expected["exit_layer"]["data"]
    assert chunks["confidence"].view("<f4").tolist() == pytest.approx(expected["confidence"]["data"], abs=1e-6)
    labels, data = [], chunks["label"].tobytes()
    while data:
        (n,) = struct.unpack_from("<I", data)
        labels, data = [*labels, data[4:4 + n].decode()], data[4 + n:]
    assert labels == expected["label"]["data"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": [text_input(["x"], name="words")]}, "takes text"),
        ({"inputs": [text_input(["x"]), text_input(["y"])]}, "once each"),
        ({"inputs": [{**text_input(["x"]), "datatype": "FP32"}]}, "texts are BYTES"),
        ({"inputs": [{**text_input(["x"]), "shape": [1, 2]}]}, "[N] or [N, 1]"),
        ({"inputs": [{**text_input(["x", "y"]), "shape": [3]}]}, "but 2 texts"),
        ({"inputs": [text_input([1])]}, "data"),
        ({"inputs": [text_input([""])]}, "empty text"),
        ({"inputs": [text_input([])]}, "at least one"),
        ({"inputs": [text_input(["x"] * 9)]}, "at most 8"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}, "no data"),
        ({"inputs": []}, "missing text"),
        ({"inputs": [text_input(["x"])], "outputs": [{"name": "logits"}]}, "no output 'logits'"),
        ({"inputs": [text_input(["x"])], "parameters": {"threshold": 2}}, "threshold"),
        ({"inputs": [text_input(["x"])], "parameters": {"threshold": True}}, "threshold"),
        ({"inputs": [text_input(["x"])], "parameters": {"truncate": "yes"}}, "truncate"),
        ({"inputs": [{**text_input(["x"]), "parameters": {"binary_data_size": 4}}]}, "binary_data_size"),
        ({"input": []}, "inputs"),
    ],
)
def test_bad_input_gets_the_protocols_error_and_a_4xx(client, body, fragment):
    assert fragment in oip_error(client.post(f"{V2}/infer", json=body), 422)
    assert client.post(f"{V2}/infer", json={"inputs": [text_input(["still serving"])]}).status_code == 200


def test_bad_binary_bodies_and_refusals_before_the_route(tiny_checkpoint):
    with make_client(tiny_checkpoint, warmup=False, api_key="s3cret", max_body_bytes=1000) as c:
        oip_error(c.post(f"{V2}/infer", json={"inputs": [text_input(["x"])]}), 401)
        assert c.get("/v2/health/ready").status_code == 200  # probes need no key
        key = {"Authorization": "Bearer s3cret"}
        binary = {**key, "inference-header-content-length": "999"}
        assert "not a length within" in oip_error(c.post(f"{V2}/infer", content=b"{}", headers=binary), 400)
        header = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                         "parameters": {"binary_data_size": 6}}]}).encode()
        cut = header + struct.pack("<I", 9) + b"ab"  # the element claims 9 bytes, 2 follow
        lengths = {**key, "inference-header-content-length": str(len(header))}
        assert "cut short" in oip_error(c.post(f"{V2}/infer", content=cut, headers=lengths), 422)
        extra = header + struct.pack("<I", 2) + b"ab" + b"zz"
        assert "belong to no input" in oip_error(c.post(f"{V2}/infer", content=extra, headers=lengths), 422)
        bad_utf8 = header + struct.pack("<I", 2) + b"\xff\xfe"
        assert "UTF-8" in oip_error(c.post(f"{V2}/infer", content=bad_utf8, headers=lengths), 422)
        oip_error(c.post(f"{V2}/infer", json={"inputs": [text_input(["x" * 2000])]}, headers=key), 413)
        oip_error(c.post(f"{V2}/infer", content=b"{not json", headers=key), 422)
        oip_error(c.get("/v2/nothing/here", headers=key), 404)
