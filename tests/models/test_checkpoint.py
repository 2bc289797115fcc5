"""Checkpoints round-trip, and every kind of damage stops loading with a clear one-line reason."""

from __future__ import annotations

import json
import pickle
import string

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    DistilBertConfig,
    MPNetConfig,
    MPNetTokenizerFast,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaTokenizerFast,
)

from exitserve.models.checkpoint import check_tokenizer, load_checkpoint, save_checkpoint
from exitserve.models.exit_config import CheckpointError, max_tokens
from exitserve.server.settings import DEFAULT_MODEL
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
    with pytest.raises(CheckpointError, match=r"default_threshold: Input should be less than or equal to 1"):
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


# ---- the typed exit-config schema, finite weights, the tokenizer, max_length ------------------------

@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_layers": "6"}, r"num_layers: Input should be a valid integer \(got '6'\)"),
        ({"label_names": [1, {"x": 2}]}, r"label_names\[0\]: Input should be a valid string"),
        ({"label_names": ["pos", "pos"]}, "label_names repeat a name"),
        ({"max_length": 0}, "max_length: Input should be greater than or equal to 8"),
        ({"default_threshold": [0.5, "x", 0.5, 0.5]}, r"default_threshold\[1\]: Input should be a valid number"),
        ({"use_lte": "yes"}, "use_lte: Input should be a valid boolean"),
        ({"task_type": "ranking"}, "unknown task_type 'ranking'"),
        ({"criterion": "vibes"}, "unknown criterion 'vibes'"),
        ({"patience_delta": -1}, "patience_delta: Input should be greater than or equal to 0"),
        ({"pair_column": ""}, "pair_column: String should have at least 1 character"),
        ({"task": None}, "task: Input should be a valid string"),
    ],
)
def test_exit_config_fields_are_typed_and_range_checked_in_one_line(ckpt_dir, changes, message):
    edit_json(ckpt_dir / "exit_config.json", **changes)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_checkpoint(ckpt_dir)
    assert "\n" not in str(caught.value)


def test_a_missing_exit_config_field_is_named(ckpt_dir):
    path = ckpt_dir / "exit_config.json"
    raw = json.loads(path.read_text())
    del raw["num_layers"]
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="num_layers: missing"):
        load_checkpoint(ckpt_dir)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(ckpt_dir, value):
    path = ckpt_dir / "model.safetensors"
    state = load_file(str(path))
    state["encoder.encoder.layer.2.output.dense.bias"][5] = value
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"layer\.2\.output\.dense\.bias holds 1 non-finite values"):
        load_checkpoint(ckpt_dir)


def test_max_length_beyond_the_position_embeddings_is_refused(ckpt_dir):
    edit_json(ckpt_dir / "exit_config.json", max_length=129)  # the tiny backbone has 128 positions
    with pytest.raises(CheckpointError, match="max_length 129 is more than the 128 positions"):
        load_checkpoint(ckpt_dir)
    edit_json(ckpt_dir / "exit_config.json", max_length=128)
    assert load_checkpoint(ckpt_dir).exit_config.max_length == 128


def test_usable_positions_per_family():
    assert max_tokens(BertConfig(max_position_embeddings=512).to_dict()) == 512
    assert max_tokens(DistilBertConfig(max_position_embeddings=512).to_dict()) == 512
    # RoBERTa and MPNet number positions from padding_idx + 1: 514 embeddings hold 512 tokens
    assert max_tokens(RobertaConfig(max_position_embeddings=514, pad_token_id=1).to_dict()) == 512
    assert max_tokens(MPNetConfig(max_position_embeddings=514, pad_token_id=1).to_dict()) == 512


def test_a_few_token_vocabulary_in_place_of_the_tokenizer_is_refused(ckpt_dir):
    # the hostile case: every word would be [UNK] and the model would still answer
    (ckpt_dir / "tokenizer.json").unlink()
    (ckpt_dir / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(CheckpointError, match="only 5 tokens for the backbone's 30522"):
        load_checkpoint(ckpt_dir)


def roberta_tokenizer(tmp_path) -> RobertaTokenizerFast:
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_lowercase))}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return RobertaTokenizerFast(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))


def mpnet_tokenizer() -> MPNetTokenizerFast:
    tokens = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>", "the", *string.ascii_lowercase]
    return MPNetTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})


def test_every_family_s_tokenizer_passes_the_tokenizer_check(tokenizer, tmp_path):
    check_tokenizer(tokenizer, BertConfig())  # MiniLM's (BERT) tokenizer, 30522 tokens
    check_tokenizer(tokenizer, DistilBertConfig())
    roberta, mpnet = roberta_tokenizer(tmp_path), mpnet_tokenizer()
    check_tokenizer(roberta, RobertaConfig(vocab_size=len(roberta)))
    check_tokenizer(mpnet, MPNetConfig(vocab_size=len(mpnet) + 1))  # a padded vocabulary is fine
    assert load_checkpoint(DEFAULT_MODEL).exit_config.num_layers == 6  # the embedded default model


def test_a_tokenizer_without_the_model_s_special_tokens_is_refused(tmp_path):
    roberta = roberta_tokenizer(tmp_path)
    plain = PreTrainedTokenizerFast(tokenizer_object=roberta.backend_tokenizer, unk_token="<unk>")
    with pytest.raises(CheckpointError, match="no pad_token"):
        check_tokenizer(plain, RobertaConfig(vocab_size=len(plain)))
    plain.add_special_tokens({"pad_token": "<pad>", "cls_token": "<s>", "sep_token": "</s>"})
    check_tokenizer(plain, RobertaConfig(vocab_size=len(plain)))  # its post-processor wraps inputs in <s> </s>
    plain.backend_tokenizer.post_processor = None  # knows the tokens but does not put them around inputs
    with pytest.raises(CheckpointError, match=r"special tokens around an input \(it encodes 'the' as \['t'"):
        check_tokenizer(plain, RobertaConfig(vocab_size=len(plain)))


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
