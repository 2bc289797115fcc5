"""Checkpoints round-trip, and every kind of damage stops loading with a clear one-line reason."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from exitserve.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.conftest import make_exit_config, make_model


def edit_json(path, **changes) -> None:
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.fixture
def ckpt_dir(tmp_path, tokenizer):
    return save_checkpoint(tmp_path / "ckpt", make_model(), tokenizer, make_exit_config())


def test_round_trip_keeps_weights_config_and_tokenizer(ckpt_dir):
    for name in ("config.json", "model.safetensors", "exit_config.json", "tokenizer.json"):
        assert (ckpt_dir / name).is_file()
    loaded = load_checkpoint(ckpt_dir)
    original = make_model().state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert loaded.exit_config.label_names == ["negative", "positive"]
    assert loaded.exit_config.thresholds() == [0.9] * 4
    assert not loaded.model.training


def test_fp16_weights_halve_the_file_and_load_as_fp32(tmp_path, tokenizer, ckpt_dir):
    half = save_checkpoint(tmp_path / "half", make_model(), tokenizer, make_exit_config(), fp16=True)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (ckpt_dir / "model.safetensors").stat().st_size
    model = load_checkpoint(half).model
    assert next(model.parameters()).dtype == torch.float32


def test_missing_weights(ckpt_dir):
    (ckpt_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors"):
        load_checkpoint(ckpt_dir)


def test_missing_tokenizer_files(ckpt_dir):
    (ckpt_dir / "tokenizer.json").unlink()  # transformers would build a 5-token tokenizer from config.json
    with pytest.raises(CheckpointError, match="no tokenizer vocabulary"):
        load_checkpoint(ckpt_dir)


def test_missing_exit_config(ckpt_dir):
    (ckpt_dir / "exit_config.json").unlink()
    with pytest.raises(CheckpointError, match="not an exitserve checkpoint"):
        load_checkpoint(ckpt_dir)


def test_truncated_weights(ckpt_dir):
    path = ckpt_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(ckpt_dir)


def test_pickle_file_in_place_of_weights_is_refused(ckpt_dir):
    (ckpt_dir / "model.safetensors").write_bytes(pickle.dumps({"x": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(ckpt_dir)


def test_wrong_schema_version(ckpt_dir):
    edit_json(ckpt_dir / "exit_config.json", schema_version=99)
    with pytest.raises(CheckpointError, match="schema version 99 is not supported"):
        load_checkpoint(ckpt_dir)


def test_head_shapes_that_do_not_match_the_backbone(ckpt_dir):
    path = ckpt_dir / "model.safetensors"
    state = load_file(str(path))
    state["heads.0.classifier.weight"] = torch.zeros(3, 64)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="does not match the backbone"):
        load_checkpoint(ckpt_dir)


def test_layer_count_mismatch(ckpt_dir):
    edit_json(ckpt_dir / "exit_config.json", num_layers=12)
    with pytest.raises(CheckpointError, match="12 layers but the backbone has 4"):
        load_checkpoint(ckpt_dir)


def test_tokenizer_that_does_not_match(ckpt_dir):
    edit_json(ckpt_dir / "config.json", vocab_size=1000)
    with pytest.raises(CheckpointError, match="do not belong together"):
        load_checkpoint(ckpt_dir)


def test_invalid_exit_config_values(ckpt_dir):
    edit_json(ckpt_dir / "exit_config.json", default_threshold=3.0)
    with pytest.raises(CheckpointError, match=r"thresholds must lie in \[0, 1\]"):
        load_checkpoint(ckpt_dir)
    (ckpt_dir / "exit_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt_dir)


def test_reference_cls_pooling_round_trips_and_unknown_pooling_is_refused(tmp_path, tokenizer):
    from transformers import BertModel

    from exitserve.models.early_exit import EarlyExitModel
    from tests.conftest import tiny_bert_config

    torch.manual_seed(0)
    model = EarlyExitModel(BertModel(tiny_bert_config()), 2, use_lte=False, pooling="cls").eval()
    path = save_checkpoint(tmp_path / "cls", model, tokenizer, make_exit_config(pooling="cls"))
    loaded = load_checkpoint(path)
    assert [h.pooling for h in loaded.model.heads] == ["cls"] * 4
    edit_json(path / "exit_config.json", pooling="max")
    with pytest.raises(CheckpointError, match="unknown pooling 'max'"):
        load_checkpoint(path)


def test_relu_final_head_round_trips_and_older_configs_default_to_tanh(tmp_path, tokenizer, sst2_texts):
    from transformers import BertModel

    from exitserve.models.early_exit import EarlyExitModel
    from exitserve.models.encoding import collate, encode
    from tests.conftest import tiny_bert_config

    torch.manual_seed(0)
    model = EarlyExitModel(BertModel(tiny_bert_config()), 2, use_lte=False, final_activation="relu").eval()
    path = save_checkpoint(tmp_path / "relu", model, tokenizer, make_exit_config(final_activation="relu"))
    loaded = load_checkpoint(path).model
    assert [h.activation for h in loaded.heads] == ["tanh"] * 3 + ["relu"]
    batch = collate(encode(tokenizer, sst2_texts[:8]), tokenizer.pad_token_id)
    with torch.inference_mode():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    raw = json.loads((path / "exit_config.json").read_text())
    del raw["final_activation"]  # a checkpoint written before the field existed
    (path / "exit_config.json").write_text(json.dumps(raw))
    assert load_checkpoint(path).model.heads[-1].activation == "tanh"
    edit_json(path / "exit_config.json", final_activation="gelu")
    with pytest.raises(CheckpointError, match="unknown final_activation 'gelu'"):
        load_checkpoint(path)
