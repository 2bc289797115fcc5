"""Which runtime the server computes on: onnxruntime by default on the CPU, torch on request or when the
model cannot be exported (with the reason logged), int8 with its own calibrated threshold."""

from __future__ import annotations

import json
import logging
import shutil

from transformers import AutoModel, BertConfig

from exitserve.models.early_exit import EarlyExitModel
from exitserve.server.main import run
from exitserve.server.service import PredictionService
from exitserve.server.settings import Settings
from tests.conftest import TINY_LAYERS, model_checkpoint
from tests.server.conftest import make_client


def test_onnxruntime_is_the_default_on_the_cpu_and_torch_on_a_gpu(monkeypatch):
    assert Settings().runtime == "onnxruntime"
    assert Settings(device="cuda").runtime == "torch"
    monkeypatch.setenv("EXITSERVE_BACKEND", "torch")
    assert Settings().runtime == "torch"


def test_info_shows_the_backend_and_answers_match_across_backends(tiny_checkpoint):
    answers = {}
    for backend in ("onnxruntime", "torch"):
        with make_client(tiny_checkpoint, backend=backend, warmup=False) as client:
            assert client.get("/info").json()["backend"] == {"name": backend, "quantize": "none",
                                                             "calibration_key": None}
            body = client.post("/predict", json={"text": ["a fine film", "dull"], "return_trace": True}).json()
            answers[backend] = body["results"]
    for on_ort, on_torch in zip(answers["onnxruntime"], answers["torch"], strict=True):
        assert on_ort["exit_layer"] == on_torch["exit_layer"] and on_ort["label_id"] == on_torch["label_id"]
        assert abs(on_ort["confidence"] - on_torch["confidence"]) < 1e-4


def test_an_unexportable_model_is_served_on_torch_with_the_reason_logged(tokenizer, tmp_path, caplog):
    config = BertConfig(hidden_size=64, num_hidden_layers=TINY_LAYERS, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=128, hidden_act="silu")
    model = EarlyExitModel(AutoModel.from_config(config), 2, use_lte=False).eval()
    path = model_checkpoint(model, tmp_path / "silu", tokenizer)
    with caplog.at_level(logging.WARNING, logger="exitserve"):
        service = PredictionService.load(Settings(checkpoint=path, warmup=False))
    assert service.backend.name == "torch"
    assert "serving on torch instead of onnxruntime: activation 'silu'" in caplog.text


def test_int8_serves_its_own_calibrated_threshold(tiny_checkpoint, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path, ignore=shutil.ignore_patterns("onnx"))
    config = json.loads((path / "exit_config.json").read_text())
    config["calibration"] = {"variants": {"onnxruntime-int8": {"threshold": 0.75}}}
    (path / "exit_config.json").write_text(json.dumps(config))
    with make_client(path, quantize="int8", warmup=False) as client:
        info = client.get("/info").json()
        assert info["backend"] == {"name": "onnxruntime", "quantize": "int8", "calibration_key": "onnxruntime-int8"}
        assert info["default_threshold"] == 0.75
        assert client.post("/predict", json={"text": "fine"}).json()["threshold"] == 0.75
    with make_client(path, warmup=False) as client:  # fp32 keeps the checkpoint's default
        assert client.get("/info").json()["default_threshold"] == config["default_threshold"]


def test_int8_on_torch_stops_start_up_with_one_line(tiny_checkpoint, capsys):
    assert run(Settings(checkpoint=tiny_checkpoint, backend="torch", quantize="int8")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantize=int8 needs backend=onnxruntime" in err[0]
