"""The tokenizer a server runs (`TextEncoder`, the `tokenizers` library alone) against the Hugging Face
tokenizer it was saved from: the same ids and token types, single texts and pairs, truncated or refused."""

from __future__ import annotations

import string

import numpy as np
import pytest
from transformers import MPNetTokenizerFast, RobertaTokenizerFast

from exitserve.models.encoding import (
    EmptyInput,
    Encoded,
    InputTooLong,
    TextEncoder,
    encode,
    mean_pool_weights,
    pad_tokens,
)

TEXTS = ["a gorgeous, witty, seductive movie.", "The Acting IS wooden", "naïve café déjà vu",
         "x" * 300, "the " * 200, "emoji 🎬 and [MASK] and [PAD] spelled out"]
PAIRS = ["a man plays a guitar", "SOMEONE plays", "ok", "y " * 150, "short", "[SEP] inside"]


def hf_ids(tokenizer, texts, pairs=None, max_length=64, truncate=True):
    out = tokenizer(texts, pairs, truncation="longest_first" if truncate else False,
                    max_length=max_length if truncate else None)
    types = out.get("token_type_ids")
    return [(ids, types[i] if types is not None else None) for i, ids in enumerate(out["input_ids"])]


def roberta(tmp_path):
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *string.ascii_lowercase])}
    (tmp_path / "vocab.json").write_text(__import__("json").dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return RobertaTokenizerFast(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))


def mpnet():
    tokens = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>", "the", *string.ascii_lowercase]
    return MPNetTokenizerFast(vocab={t: i for i, t in enumerate(tokens)})


@pytest.fixture(params=["minilm", "roberta", "mpnet"])
def hf_tokenizer(request, tokenizer, tmp_path):
    return {"minilm": lambda: tokenizer, "roberta": lambda: roberta(tmp_path), "mpnet": mpnet}[request.param]()


@pytest.mark.parametrize("max_length", [16, 64])
def test_the_same_ids_as_the_hugging_face_tokenizer(hf_tokenizer, tmp_path, max_length):
    hf_tokenizer.save_pretrained(tmp_path / "saved")
    for encoder in (TextEncoder.from_hf(hf_tokenizer, max_length),
                    TextEncoder.from_directory(tmp_path / "saved", max_length)):
        assert encoder.pad_id == hf_tokenizer.pad_token_id
        for pairs in (None, PAIRS):
            expected = hf_ids(hf_tokenizer, TEXTS, pairs, max_length)
            got = encoder.encode(TEXTS, pairs)
            assert [e.input_ids for e in got] == [ids for ids, _ in expected]
            if expected[0][1] is not None:  # the tokenizer has token types (BERT): the same ones
                assert [e.token_type_ids for e in got] == [types for _, types in expected]
            alone = [encoder.encode([t], None if pairs is None else [p])[0] for t, p in zip(TEXTS, pairs or TEXTS,
                                                                                             strict=True)]
            assert [e.input_ids for e in alone] == [e.input_ids for e in got]  # one input: the same ids


def test_too_long_is_refused_when_truncation_is_off(tokenizer):
    encoder = TextEncoder.from_hf(tokenizer, 16)
    assert len(encoder.encode(["word " * 40])[0]) == 16
    with pytest.raises(InputTooLong, match=r"input 1 has \d+ tokens; the model takes at most 16"):
        encoder.encode(["short", "word " * 40], truncate=False)
    assert len(encoder.encode(["word " * 40])[0]) == 16  # the truncating copy was not changed by the other


def test_padding_and_mean_pool_weights():
    tokens = pad_tokens([Encoded([5, 6, 7], [0, 0, 1]), Encoded([8], [0])], pad_id=0)
    assert tokens.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]] and tokens.token_type_ids.tolist() == [[0, 0, 1],
                                                                                                      [0, 0, 0]]
    pool = mean_pool_weights(tokens.lengths, 3)
    assert pool.shape == (2, 1, 3) and pool.dtype == np.float32
    assert pool[0, 0].tolist() == pytest.approx([1 / 3] * 3) and pool[1, 0].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("text", ["\u0301\u0308", "\ufe0f", "\ue000\ue001", "\ufffd", "\u200b \u00ad"])
def test_a_text_the_tokenizer_keeps_nothing_of_is_refused(tokenizer, text):
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == []  # the premise: all of it is dropped
    for encoder in (tokenizer, TextEncoder.from_hf(tokenizer, 64)):  # the library's callers and a server's
        with pytest.raises(EmptyInput, match=r"^text\[1\]: empty text"):
            encode(encoder, ["fine", text], max_length=64)


def test_an_empty_second_text_of_a_pair_is_refused(tokenizer):
    with pytest.raises(EmptyInput, match=r"^text_pair\[0\]: empty text"):
        encode(tokenizer, ["fine"], ["\ufe0f"])


def test_texts_with_something_to_keep_are_encoded(tokenizer):
    (single,), (pair,) = encode(tokenizer, ["\u2800"]), encode(tokenizer, ["fine"], ["ok\u0301"])
    assert len(single) == 3 and pair.token_type_ids is not None  # [CLS] [UNK] [SEP]: for the route to refuse
