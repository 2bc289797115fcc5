"""The client libraries people already run, unchanged, against a real `exitserve serve` process serving
two models at once (the embedded SST-2 model on real MiniLM weights, and a tiny one): huggingface_hub's
InferenceClient and AsyncInferenceClient (TEI / Inference API routes) and tritonclient's HTTP client
(Open Inference Protocol, binary and JSON tensors) answer as /predict does, on the 200 SST-2 sentences
of the fixtures, for both models."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from tritonclient.utils import InferenceServerException

from exitserve.loadtest.servers import exitserve_command, free_port, running
from exitserve.server.settings import DEFAULT_MODEL
from tests.conftest import GLUE

KEY = "s3cret"
MODELS = ("sst2", "tiny")
TIE = 1e-4  # a confidence this close to the threshold may exit a layer apart in another batch (float noise)

pytestmark = pytest.mark.slow  # the real MiniLM weights


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    rows = (GLUE / "SST-2" / "dev.tsv").read_text().splitlines()[1:]
    assert len(rows) == 200
    return [row.split("\t")[0] for row in rows]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    """Both models in one process; the embedded model linked into a directory its ONNX export may write to."""
    sst2 = tmp_path_factory.mktemp("models") / "sst2"
    sst2.mkdir()
    for path in DEFAULT_MODEL.iterdir():
        if path.is_file():
            (sst2 / path.name).symlink_to(path)
    port = free_port()
    cmd = exitserve_command([sst2, tiny_checkpoint], port, f"api_key={KEY}", "max_inputs_per_request=200",
                            "log_level=warning", names=list(MODELS))
    with running(cmd, port) as base:
        yield base


@pytest.fixture(scope="module")
def expected(server, sentences) -> dict[str, list[dict]]:
    """What /predict answers, per model."""
    auth = {"Authorization": f"Bearer {KEY}"}
    out = {}
    for name in MODELS:
        r = httpx.post(f"{server}/predict", json={"text": sentences, "model": name}, headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        out[name] = r.json()["results"]
    assert {r["prediction"] for r in out["sst2"]} == {"negative", "positive"}
    return out


def same(mine: dict, label: str, score: float, exit_layer: int | None = None) -> bool:
    """The TEI routes score a label by its probability; the OIP `confidence` output is /predict's (the exit
    rule's value, which for the learned rule is not a class probability)."""
    expected = mine["confidence"] if exit_layer is not None else mine["probabilities"][label]
    if label != mine["prediction"] or abs(score - expected) > TIE:
        return False
    return exit_layer in (None, mine["exit_layer"]) or abs(mine["confidence"] - mine["threshold"]) < TIE


@pytest.mark.parametrize("name", MODELS)
def test_inference_client_answers_as_predict(server, sentences, expected, name):
    client = InferenceClient(base_url=f"{server}/models/{name}", api_key=KEY)
    for text, mine in zip(sentences, expected[name], strict=True):
        labels = client.text_classification(text)
        assert [x.label for x in labels] == sorted(mine["probabilities"], key=mine["probabilities"].get, reverse=True)
        assert same(mine, labels[0].label, labels[0].score), (text, labels, mine)
    top = client.text_classification(sentences[0], top_k=1)
    assert len(top) == 1 and top[0].label == expected[name][0]["prediction"]


@pytest.mark.parametrize("name", MODELS)
def test_async_inference_client_answers_as_predict(server, sentences, expected, name):
    async def ask_all():
        client = AsyncInferenceClient(base_url=f"{server}/models/{name}", api_key=KEY)
        return await asyncio.gather(*(client.text_classification(t) for t in sentences))

    for labels, mine in zip(asyncio.run(ask_all()), expected[name], strict=True):
        assert same(mine, labels[0].label, labels[0].score), (labels, mine)


def test_inference_client_sends_the_threshold_in_a_header(server, sentences):
    """InferenceClient(headers={"x-exit-threshold": ...}): every request at that threshold."""
    deepest = httpx.post(f"{server}/predict", json={"text": sentences[:20], "model": "sst2", "threshold": 1.0},
                         headers={"Authorization": f"Bearer {KEY}"}).json()["results"]
    client = InferenceClient(base_url=f"{server}/models/sst2", api_key=KEY, headers={"x-exit-threshold": "1"})
    for text, mine in zip(sentences[:20], deepest, strict=True):
        labels = client.text_classification(text)
        assert same(mine, labels[0].label, labels[0].score), (text, labels, mine)


def test_inference_client_at_the_root_must_name_a_model_while_two_are_served(server):
    with pytest.raises(HfHubHTTPError) as caught:
        InferenceClient(base_url=server, api_key=KEY).text_classification("fine")
    assert caught.value.response.status_code == 422 and "serves sst2, tiny" in caught.value.response.text


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
@pytest.mark.parametrize("name", MODELS)
def test_tritonclient_answers_as_predict(server, sentences, expected, name, binary):
    client = triton.InferenceServerClient(url=server.removeprefix("http://"))
    auth = {"Authorization": f"Bearer {KEY}"}  # tritonclient adds its own headers to this dict: copied per call
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(name, headers=dict(auth))
    meta = client.get_model_metadata(name, headers=dict(auth))
    assert [i["name"] for i in meta["inputs"]] == ["text"]
    text = triton.InferInput("text", [len(sentences)], "BYTES")
    text.set_data_from_numpy(np.array([s.encode() for s in sentences], dtype=object), binary_data=binary)
    outputs = None if binary else [triton.InferRequestedOutput(o["name"], binary_data=False)
                                   for o in meta["outputs"]]
    result = client.infer(name, [text], outputs=outputs, headers=dict(auth), request_id="r1")
    assert result.get_response()["model_version"] == meta["versions"][0] and result.get_response()["id"] == "r1"
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
    layers, confidence = result.as_numpy("exit_layer"), result.as_numpy("confidence")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(sentences), 2) and layers.dtype == np.int32
    for i, mine in enumerate(expected[name]):
        assert same(mine, labels[i], float(confidence[i]), int(layers[i])), (i, mine)
        assert np.allclose(probabilities[i], [mine["probabilities"][k] for k in ("negative", "positive")], atol=TIE)
    deepest = client.infer(name, [text], headers=dict(auth), parameters={"threshold": 1.0}).as_numpy("exit_layer")
    layers = httpx.get(f"{server}/info", params={"model": name}, headers=auth).json()["num_layers"]
    assert set(deepest.tolist()) == {layers}
    with pytest.raises(InferenceServerException) as caught:
        client.infer("nope", [text], headers=dict(auth))
    assert caught.value.status() == "404" and "no model named 'nope'" in caught.value.message()
