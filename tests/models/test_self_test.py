"""The load-time self-test: a checkpoint's canaries pass on every runtime; a tokenizer or a graph that
does not reproduce them is named (tokenizer, layer k, exit k), graphs are rebuilt rather than served,
and a refusal is one line."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from exitserve.cli import main
from exitserve.loadtest.reliability.tamper import TOKENIZER_DAMAGE, graph_damage, replace_graphs, stored_graphs
from exitserve.models import self_test
from exitserve.models.backends import Backend, create_backend, onnx_store
from exitserve.models.backends.onnx_backend import OnnxBackend
from exitserve.models.backends.onnx_store import COMPOSED, COMPOSED_WEIGHTS, OnnxStoreError
from exitserve.models.canaries import CANARIES, REFERENCE, TEXTS, read, record_canaries
from exitserve.models.checkpoint import load_checkpoint, save_checkpoint
from exitserve.models.encoding import encode
from exitserve.models.exit_config import ExitConfig
from exitserve.models.inference import record_all_layers
from exitserve.models.self_test import SelfTestFailed
from exitserve.models.served import load_served
from tests.conftest import make_exit_config, make_model


def verified_backend(directory, name: str, quantize: str = "none") -> Backend:
    """What a server serves on: loaded, then self-tested (models/served.py)."""
    return load_served(directory, name, quantize).backend


@pytest.fixture(scope="module")
def foreign_graphs(tmp_path_factory, tokenizer):
    """fp32 graphs of another model of the same shape (other weights)."""
    path = save_checkpoint(tmp_path_factory.mktemp("foreign") / "ckpt", make_model(seed=99), tokenizer,
                           make_exit_config(default_threshold=0.55))
    return stored_graphs(path)


def test_save_records_canaries_that_every_runtime_reproduces(ckpt_dir, caplog):
    canaries = read(ckpt_dir)
    assert canaries is not None and canaries.texts == list(TEXTS) and canaries.pairs is None
    assert len(canaries.input_ids) == 16 and max(map(len, canaries.input_ids)) == 128  # one is truncated
    assert set(canaries.references) == {REFERENCE}
    ckpt = load_checkpoint(ckpt_dir)
    with caplog.at_level(logging.INFO, logger="exitserve"):
        for name in ("torch", "onnxruntime"):
            assert verified_backend(ckpt.path, name).name == name
    assert caplog.text.count("self-test passed") == 2


def test_a_pair_regressor_s_canaries_cover_the_pairs_and_the_lte(tiny_pair_checkpoint):
    canaries = read(tiny_pair_checkpoint)
    assert canaries.pairs is not None and canaries.token_type_ids is not None
    assert canaries.reference().lte is not None
    ckpt = load_checkpoint(tiny_pair_checkpoint)
    for name in ("torch", "onnxruntime"):
        verified_backend(ckpt.path, name)


@pytest.mark.parametrize("how", list(TOKENIZER_DAMAGE))
def test_a_tampered_tokenizer_is_named(ckpt_dir, how):
    TOKENIZER_DAMAGE[how](ckpt_dir)
    ckpt = load_checkpoint(ckpt_dir)  # of the right size: the load checks cannot tell
    with pytest.raises(SelfTestFailed, match=r"^self-test on torch: tokenizer does not reproduce") as err:
        verified_backend(ckpt.path, "torch")
    assert "\n" not in str(err.value)


def self_test_on(directory, quantize: str = "none"):
    """The self-test of the graphs stored in `directory`, as they are (no rebuild)."""
    ckpt = load_checkpoint(directory)
    backend = OnnxBackend(stored_graphs(directory, quantize), ckpt.tokenizer.pad_token_id,
                          ckpt.exit_config.make_criterion(), None, quantize)

    def encode_fn(texts, pairs):
        return encode(ckpt.tokenizer, texts, pairs, ckpt.exit_config.max_length)

    return self_test.self_test(read(directory), encode_fn, ckpt.tokenizer.get_vocab(), backend)


@pytest.mark.parametrize(("damage", "part"), [
    ("layer 3 <- layer 2", "layer 3"), ("exit 4 <- exit 1", "exit 4"),
    ("layer 2 and exit 2 of another model", "layer 2"),
])
def test_a_swapped_or_foreign_graph_is_named_whatever_its_manifest_says(ckpt_dir, foreign_graphs, damage, part):
    graphs = stored_graphs(ckpt_dir)
    replace_graphs(graphs, graph_damage(graphs, foreign_graphs, 4)[damage])
    source = onnx_store.Source.of(ckpt_dir, ExitConfig.read(ckpt_dir))
    assert onnx_store.problem(graphs, source, "fp32") is None  # the hashes pass
    mismatch = self_test_on(ckpt_dir)
    assert mismatch is not None and mismatch.part == part, mismatch


def test_an_exit_of_another_model_is_named_as_the_exit(ckpt_dir, foreign_graphs):
    graphs = stored_graphs(ckpt_dir)
    replace_graphs(graphs, {"exit_01.onnx": foreign_graphs / "exit_01.onnx"})
    assert self_test_on(ckpt_dir).part == "exit 2"


REBUILT = ["layer 3 <- layer 2", "layer 2 and exit 2 of another model", "layer 2 not a graph",
           "the early-exit graph of another model"]


def test_an_early_exit_graph_of_another_model_is_named(ckpt_dir, foreign_graphs):
    """The composed graph is what serves: checked against the layer graphs at thresholds 0, default, 1."""
    graphs = stored_graphs(ckpt_dir)
    replace_graphs(graphs, {n: foreign_graphs / n for n in (COMPOSED, COMPOSED_WEIGHTS)})
    ckpt = load_checkpoint(ckpt_dir)
    backend = OnnxBackend(graphs, ckpt.tokenizer.pad_token_id, ckpt.exit_config.make_criterion())
    canaries = read(ckpt_dir)
    assert self_test.self_test(canaries, lambda t, p: encode(ckpt.tokenizer, t, p, 128), ckpt.tokenizer.get_vocab(),
                               backend) is None  # the layer graphs are fine
    thresholds = [[0.0] * backend.num_layers, [1.0] * backend.num_layers]
    mismatch = self_test.check_whole_batches(canaries, backend, ckpt.exit_config.make_criterion(), thresholds)
    assert mismatch is not None and mismatch.part == self_test.COMPOSED_PART, mismatch


@pytest.mark.parametrize("damage", REBUILT)
def test_a_graph_that_fails_is_rebuilt_and_never_served(ckpt_dir, foreign_graphs, tokenizer, sst2_texts, caplog,
                                                        damage):
    ckpt = load_checkpoint(ckpt_dir)
    graphs = stored_graphs(ckpt_dir)
    replace_graphs(graphs, graph_damage(graphs, foreign_graphs, 4)[damage])
    with caplog.at_level(logging.INFO, logger="exitserve"):
        backend = verified_backend(ckpt.path, "onnxruntime")
    assert "building the ONNX Runtime graphs" in caplog.text and "self-test passed" in caplog.text
    samples = encode(tokenizer, sst2_texts[:16], max_length=64)
    served, reference = (record_all_layers(b, samples).logits for b in (backend, create_backend(ckpt)))
    assert np.abs(served - reference).max() < 1e-4
    assert self_test_on(ckpt_dir) is None  # the stored graphs are the rebuilt ones


def test_graphs_that_fail_and_cannot_be_rebuilt_are_refused(ckpt_dir, foreign_graphs, monkeypatch):
    graphs = stored_graphs(ckpt_dir)
    replace_graphs(graphs, graph_damage(graphs, foreign_graphs, 4)["layer 3 <- layer 2"])
    monkeypatch.setattr(onnx_store, "_writable", lambda d: False)
    with pytest.raises(OnnxStoreError, match="no valid ONNX export"):
        verified_backend(ckpt_dir, "onnxruntime")


def test_weights_replaced_without_new_canaries_are_refused_with_a_hint(ckpt_dir, tmp_path, tokenizer):
    other = save_checkpoint(tmp_path / "other", make_model(seed=99), tokenizer,
                            make_exit_config(default_threshold=0.55))
    shutil.copyfile(other / "model.safetensors", ckpt_dir / "model.safetensors")
    with pytest.raises(SelfTestFailed) as err:
        verified_backend(ckpt_dir, "onnxruntime")  # rebuilt for the new weights, still not them
    message = str(err.value)
    assert message.startswith("self-test on onnxruntime: embeddings does not reproduce the recorded canaries")
    assert "was recorded for another model.safetensors" in message and "\n" not in message


def test_int8_is_checked_against_its_own_record(ckpt_dir, foreign_graphs, caplog):
    ckpt = load_checkpoint(ckpt_dir)
    with caplog.at_level(logging.WARNING, logger="exitserve"):
        verified_backend(ckpt.path, "onnxruntime", "int8")
    assert "no canaries recorded for onnxruntime-int8" in caplog.text  # not checked until recorded
    record_canaries(ckpt, ["int8"])
    assert set(read(ckpt_dir).references) == {REFERENCE, "onnxruntime-int8"}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="exitserve"):
        verified_backend(ckpt_dir, "onnxruntime", "int8")
    assert "self-test passed" in caplog.text
    graphs = stored_graphs(ckpt_dir, "int8")
    replace_graphs(graphs, {"layer_02.onnx": graphs / "layer_01.onnx"})
    # caught at layer 3 or, within int8's wider tolerance on this tiny random model, where it has grown
    assert self_test_on(ckpt_dir, "int8").part in ("layer 3", "exit 3", "layer 4", "exit 4")


def test_an_int8_record_from_another_onnxruntime_says_so_when_it_fails(ckpt_dir):
    record_canaries(load_checkpoint(ckpt_dir), ["int8"])
    raw = json.loads((ckpt_dir / CANARIES).read_text())
    int8 = raw["references"]["onnxruntime-int8"]
    int8["recorded_with"]["onnxruntime"] = "0.0.1"
    int8["logits"][0][0][0] += 10.0  # as if that onnxruntime's quantiser had computed otherwise
    (ckpt_dir / CANARIES).write_text(json.dumps(raw))
    with pytest.raises(SelfTestFailed, match=r"exit 1 does not reproduce .* \(recorded with onnxruntime 0\.0\.1, "
                                              r"this is .*record-canaries .* --quantize int8`\)$"):
        verified_backend(ckpt_dir, "onnxruntime", "int8")


def test_an_old_checkpoint_without_canaries_warns_until_they_are_recorded(ckpt_dir, caplog, capsys):
    (ckpt_dir / CANARIES).unlink()
    with caplog.at_level(logging.WARNING, logger="exitserve"):
        verified_backend(ckpt_dir, "torch")
    assert f"has no {CANARIES}" in caplog.text and "exitserve record-canaries" in caplog.text
    assert main(["record-canaries", str(ckpt_dir)]) == 0
    assert f"wrote {ckpt_dir / CANARIES}" in capsys.readouterr().out
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="exitserve"):
        verified_backend(ckpt_dir, "torch")
    assert "self-test passed" in caplog.text


@pytest.mark.parametrize(("content", "reason"), [
    ("{not json", "is not valid JSON"), ('{"format": 7}', "format 7 is not supported"),
    ('{"format": 1, "texts": []}', "damaged: pairs, input_ids"), ("[" * 1000 + "]" * 1000, "nests deeper"),
])
def test_damaged_canaries_stop_the_load_with_one_line(ckpt_dir, content, reason):
    (ckpt_dir / CANARIES).write_text(content)
    with pytest.raises(Exception, match=reason) as err:
        verified_backend(ckpt_dir, "torch")
    assert "\n" not in str(err.value)


def test_a_damaged_reference_value_is_caught(ckpt_dir):
    raw = json.loads((ckpt_dir / CANARIES).read_text())
    raw["references"][REFERENCE]["logits"][2][5][0] += 10.0  # exit 3, canary 5
    (ckpt_dir / CANARIES).write_text(json.dumps(raw))
    with pytest.raises(SelfTestFailed, match=r"exit 3 does not reproduce the recorded canaries: canary 5 "):
        verified_backend(ckpt_dir, "torch")
