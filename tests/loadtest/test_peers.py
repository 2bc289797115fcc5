"""The peers the benchmark compares against: the ONNX Runtime whole-model peer reproduces the model it
was exported from (padded batches included) and answers like the pipeline peer; infinity's commands."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from exitserve.loadtest.bench import infinity_dir
from exitserve.loadtest.peer_ort import OPTIMIZED_FILE, WholeGraph, build, create_app
from exitserve.loadtest.servers import infinity_command
from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.export import export_hf

TEXTS = ["fine", "a much longer review that needs more tokens than the first one, so the first is padded"]


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    hf = export_hf(load_checkpoint(tiny_checkpoint), tmp_path_factory.mktemp("peer") / "hf")
    build(hf)
    return hf


def test_the_fused_graph_reproduces_the_exported_model_on_a_padded_batch(exported):
    model = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    batch = AutoTokenizer.from_pretrained(exported)(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = model(**batch).logits.numpy()
    graph = WholeGraph(exported, threads=1)
    np.testing.assert_allclose(graph.logits(TEXTS), expected, atol=1e-4)
    alone = np.concatenate([graph.logits([t]) for t in TEXTS])
    np.testing.assert_allclose(alone, expected, atol=1e-4)  # padding is masked
    fused = {node.op_type for node in onnx.load(str(exported / OPTIMIZED_FILE)).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= fused  # ORT's transformer fusions applied


def test_the_ort_peer_answers_single_texts_and_lists(exported, monkeypatch):
    monkeypatch.setenv("PEER_MODEL", str(exported))
    labels = WholeGraph(exported).classify(TEXTS)
    with TestClient(create_app()) as client:
        assert client.get("/ready").json() == {"status": "ready"}
        one = client.post("/predict", json={"text": TEXTS[0]})
        many = client.post("/predict", json={"text": TEXTS})
    assert one.status_code == 200 and one.json()["label"] == labels[0]["label"]
    results = many.json()["results"]
    assert [r["label"] for r in results] == [r["label"] for r in labels]
    assert [r["score"] for r in results] == pytest.approx([r["score"] for r in labels])


def test_infinity_commands(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors", "model.onnx", "model_optimized.onnx"):
        (hf / name).write_text("x")
    served = infinity_dir(hf, "optimum", tmp_path)
    assert sorted(p.name for p in served.iterdir()) == ["config.json", "model.onnx", "tokenizer.json"]
    cmd, env, cwd = infinity_command("/venv/bin/infinity_emb", served, 8123, "optimum")
    assert cwd == served and cmd[cmd.index("--model-id") + 1] == "." and "--no-model-warmup" in cmd
    assert cmd[cmd.index("--engine") + 1] == "optimum" and env["HF_HOME"].startswith(str(served))
    cmd, _, _ = infinity_command("/venv/bin/infinity_emb", hf, 8123, "torch")
    assert cmd[cmd.index("--model-id") + 1] == str(hf) and infinity_dir(hf, "torch", tmp_path) == hf
    with pytest.raises(ValueError, match="unknown infinity engine"):
        infinity_command("x", hf, 1, "tensorrt")
