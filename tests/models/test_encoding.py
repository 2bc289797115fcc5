"""Tokenising: an input the tokenizer keeps nothing of is refused, whatever the characters."""

from __future__ import annotations

import pytest

from exitserve.models.encoding import EmptyInput, encode


@pytest.mark.parametrize("text", ["\u0301\u0308", "\ufe0f", "\ue000\ue001", "\ufffd", "\u200b \u00ad"])
def test_a_text_the_tokenizer_keeps_nothing_of_is_refused(tokenizer, text):
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == []  # the premise: all of it is dropped
    with pytest.raises(EmptyInput, match=r"^text\[1\]: empty text"):
        encode(tokenizer, ["fine", text])


def test_an_empty_second_text_of_a_pair_is_refused(tokenizer):
    with pytest.raises(EmptyInput, match=r"^text_pair\[0\]: empty text"):
        encode(tokenizer, ["fine"], ["\ufe0f"])


def test_texts_with_something_to_keep_are_encoded(tokenizer):
    (single,), (pair,) = encode(tokenizer, ["\u2800"]), encode(tokenizer, ["fine"], ["ok\u0301"])
    assert len(single) == 3 and pair.token_type_ids is not None  # [CLS] [UNK] [SEP]: for the route to refuse
