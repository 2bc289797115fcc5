"""The ONNX Runtime backend against the torch model it was written from: every family, padded batches
(the fused attention's mask must really mask), the real MiniLM SST-2 model, int8, the torch fallback."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModel, BertConfig

from exitserve.models.backends import create_backend
from exitserve.models.backends.onnx_backend import OnnxBackend
from exitserve.models.backends.torch_backend import TorchBackend
from exitserve.models.calibration import RiskMethod, calibrate
from exitserve.models.canaries import read
from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.criteria import ExitCriterion
from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.encoding import Encoded, encode
from exitserve.models.evaluation import layer_confidences
from exitserve.models.inference import predict, record_all_layers
from exitserve.server.settings import DEFAULT_MODEL
from tests.conftest import FAMILIES, GLUE, SIZE, TINY_LAYERS, model_checkpoint


def layer_by_layer(backend, samples) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Every layer's hidden states (numpy) and exit outputs for one padded batch."""
    lengths = np.array([len(s) for s in samples])
    hidden, attention = backend.embed(samples), backend.attention(lengths)
    out = []
    for k in range(backend.num_layers):
        hidden, exit_out = backend.layer(k, hidden, attention)
        array = hidden.numpy() if isinstance(hidden, torch.Tensor) else hidden
        out.append((array.copy(), exit_out.logits, exit_out.lte))
    return out


def assert_same_model(onnx_backend, torch_backend, samples, atol=1e-4) -> None:
    lengths = [len(s) for s in samples]
    assert len(set(lengths)) > 3  # a padded batch: rows of many lengths
    real = np.arange(max(lengths))[None, :] < np.array(lengths)[:, None]
    for (h_ort, logits_ort, lte_ort), (h_pt, logits_pt, lte_pt) in zip(
        layer_by_layer(onnx_backend, samples), layer_by_layer(torch_backend, samples), strict=True
    ):
        np.testing.assert_allclose(h_ort[real], h_pt[real], atol=atol)
        np.testing.assert_allclose(logits_ort, logits_pt, atol=atol, rtol=0)
        assert (lte_ort is None) == (lte_pt is None)
        if lte_pt is not None:
            np.testing.assert_allclose(lte_ort, lte_pt, atol=atol, rtol=0)


@pytest.fixture
def samples(tokenizer, sst2_texts):
    return encode(tokenizer, sst2_texts[:24], max_length=64)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_matches_torch_on_a_padded_batch(family, tokenizer, samples, tmp_path):
    torch.manual_seed(0)
    use_lte, pooling = family in ("roberta", "mpnet"), "cls" if family == "distilbert" else "mean"
    final = "relu" if family == "distilbert" else "tanh"  # a retrofitted DistilBERT's own head (pre_classifier)
    model = EarlyExitModel(AutoModel.from_config(FAMILIES[family]), 2, use_lte, pooling, final).eval()
    ckpt = load_checkpoint(model_checkpoint(model, tmp_path / family, tokenizer, pooling=pooling,
                                            final_activation=final))
    backend = create_backend(ckpt, "onnxruntime")
    assert isinstance(backend, OnnxBackend)
    assert_same_model(backend, TorchBackend(ckpt.model, tokenizer.pad_token_id), samples)


def test_padding_is_masked_whatever_it_holds(tokenizer, tiny_checkpoint, samples):
    """A row's states do not depend on how much padding follows it nor on what the padding holds."""
    backend = create_backend(load_checkpoint(tiny_checkpoint), "onnxruntime")
    alone = layer_by_layer(backend, samples[:1])
    lengths = np.array([len(samples[0]), 60])
    hidden = backend.embed(samples[:1])
    wide = np.concatenate([hidden, np.random.default_rng(0).normal(size=(1, 60 - hidden.shape[1], 64))], axis=1)
    wide = np.concatenate([wide, wide]).astype(np.float32)
    attention = backend.attention(lengths)
    for k in range(backend.num_layers):
        wide, out = backend.layer(k, wide, attention)
        np.testing.assert_allclose(wide[0, : lengths[0]], alone[k][0][0], atol=1e-5)
        np.testing.assert_allclose(out.logits[0], alone[k][1][0], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def sst2_model(tmp_path_factory):
    """The embedded SST-2 model (real MiniLM weights), linked into a directory the export may write to."""
    directory = tmp_path_factory.mktemp("default-model")
    for path in DEFAULT_MODEL.iterdir():
        if path.is_file():
            (directory / path.name).symlink_to(path)
    return load_checkpoint(directory)


def test_real_minilm_on_onnxruntime_answers_as_torch(sst2_model):
    """Fixture SST-2 sentences in padded batches: hidden states close, and the same exit layer and label
    for every sentence at several thresholds, except where a confidence lies within 1e-4 of a threshold."""
    texts = [line.split("\t")[0] for line in (GLUE / "SST-2" / "dev.tsv").read_text().splitlines()[1:97]]
    samples = encode(sst2_model.tokenizer, texts, max_length=sst2_model.exit_config.max_length)
    ort_backend = create_backend(sst2_model, "onnxruntime")
    pt_backend = create_backend(sst2_model, "torch")
    assert_same_model(ort_backend, pt_backend, samples[:32], atol=2e-4)
    criterion = sst2_model.exit_config.make_criterion()
    confidence = layer_confidences(record_all_layers(pt_backend, samples), criterion)  # [L, N]
    for threshold in (sst2_model.exit_config.default_threshold, 0.95):
        thresholds = [threshold] * criterion.num_layers
        on_ort = predict(ort_backend, criterion, samples, thresholds, batch_size=16)
        on_pt = predict(pt_backend, criterion, samples, thresholds, batch_size=16)
        tie = (np.abs(confidence - threshold) < 1e-4).any(0)
        differ = [i for i, (a, b) in enumerate(zip(on_ort, on_pt, strict=True))
                  if (a.exit_layer, a.label_id) != (b.exit_layer, b.label_id)]
        assert all(tie[i] for i in differ), f"threshold {threshold}: rows {differ} differ without a tie"
        assert len({r.exit_layer for r in on_pt}) >= 2  # a real mix of exits


def test_int8_is_opt_in_close_to_fp32_and_calibrated_as_its_own_variant(sst2_model, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(sst2_model.path, ckpt_dir, symlinks=False, ignore=shutil.ignore_patterns("onnx"))
    ckpt = load_checkpoint(ckpt_dir)
    int8 = create_backend(ckpt, "onnxruntime", quantize="int8")
    assert int8.quantize == "int8" and int8.calibration_key == "onnxruntime-int8"
    assert (ckpt_dir / "onnx" / "int8" / "manifest.json").is_file()
    texts = [line.split("\t")[0] for line in (GLUE / "SST-2" / "dev.tsv").read_text().splitlines()[1:]]
    samples = encode(ckpt.tokenizer, texts[:64])
    final_int8 = record_all_layers(int8, samples).logits[-1]
    final_fp32 = record_all_layers(create_backend(ckpt, "torch"), samples).logits[-1]
    assert not np.array_equal(final_int8, final_fp32)  # the weights really are quantised
    assert (final_int8.argmax(-1) == final_fp32.argmax(-1)).mean() >= 0.9
    default = ckpt.exit_config.default_threshold
    cfg = calibrate(ckpt, str(GLUE / "SST-2"), RiskMethod(), max_samples=64, backend=int8)
    stored = cfg.calibration["variants"]["onnxruntime-int8"]
    assert cfg.default_threshold == default  # the fp32 default is untouched
    assert stored["quantize"] == "int8" and stored["backend"] == "onnxruntime"
    reread = load_checkpoint(ckpt_dir).exit_config
    assert reread.threshold_for("onnxruntime-int8") == stored["threshold"]
    assert reread.threshold_for(None) == default
    assert "onnxruntime-int8" in read(ckpt_dir).references  # the self-test checks the variant on its own record


def test_quantize_needs_onnxruntime(tiny_checkpoint):
    with pytest.raises(ValueError, match="needs backend=onnxruntime"):
        create_backend(load_checkpoint(tiny_checkpoint), "torch", quantize="int8")


def test_a_model_without_a_fused_activation_is_served_on_torch_with_the_reason_logged(tokenizer, tmp_path, caplog):
    config = BertConfig(**SIZE, max_position_embeddings=128, hidden_act="relu")
    model = EarlyExitModel(AutoModel.from_config(config), 2, use_lte=False).eval()
    ckpt = load_checkpoint(model_checkpoint(model, tmp_path / "relu", tokenizer))
    with caplog.at_level(logging.WARNING, logger="exitserve"):
        backend = create_backend(ckpt, "onnxruntime")
    assert isinstance(backend, TorchBackend)
    assert "serving on torch instead of onnxruntime: activation 'relu'" in caplog.text
    assert not (tmp_path / "relu" / "onnx").exists()


def test_mpnet_batches_wider_than_the_model_are_refused(tokenizer, tmp_path):
    model = EarlyExitModel(AutoModel.from_config(FAMILIES["mpnet"]), 2, use_lte=False).eval()
    ckpt = load_checkpoint(model_checkpoint(model, tmp_path / "mpnet", tokenizer, max_length=16))
    backend = create_backend(ckpt, "onnxruntime")
    backend.attention(np.array([16, 3]))
    with pytest.raises(ValueError, match="wider"):
        backend.attention(np.array([17]))
    with pytest.raises(ValueError, match="wider"):
        backend.run([Encoded(list(range(5, 22)))], np.ones((1, TINY_LAYERS), np.float32), backend.criterion)


def test_exit_criteria_get_float32_numpy_arrays(tiny_pair_checkpoint, tokenizer):
    ckpt = load_checkpoint(tiny_pair_checkpoint)
    backend = create_backend(ckpt, "onnxruntime")
    samples = encode(tokenizer, ["a pair", "of texts"], ["and its", "second halves here"])
    results = predict(backend, ExitCriterion("lte", TINY_LAYERS, regression=True), samples, [0.5] * TINY_LAYERS)
    assert all(isinstance(r.value, float) and r.label_id is None for r in results)
    out = layer_by_layer(backend, samples)[0]
    assert out[1].dtype == np.float32 and out[2].dtype == np.float32 and out[2].shape == (2,)
