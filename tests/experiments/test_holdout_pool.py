"""The held-out calibration pool: whole sentences and every phrase inside them leave training."""

from __future__ import annotations

import csv

import pytest

from exitserve.experiments.holdout_pool import build, split_out_sentences

# an SST-2-style train split: two sentences, each with some of its phrases, plus a third sentence
TRAIN = [
    ("a gorgeous , witty movie", "1"),
    ("gorgeous , witty", "1"),
    ("witty", "1"),
    ("a dull and tired plot", "0"),
    ("dull and tired", "0"),
    ("tired", "0"),
    ("the cast is fine", "1"),
]
DEV = [("an utterly charming film", "1"), ("flat", "0")]


def write(path, rows) -> None:
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")


def read(path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]


def test_held_out_sentences_take_their_phrases_with_them():
    texts = [t for t, _ in TRAIN]
    for seed in range(10):
        train, held = split_out_sentences(texts, 1, seed)
        assert len(held) == 1 and texts[held[0]] in ("a gorgeous , witty movie", "a dull and tired plot",
                                                     "the cast is fine")  # only sentences, never a phrase
        held_words = texts[held[0]]
        assert all(texts[i] not in held_words for i in train)  # no phrase of a held-out sentence is trained on
        assert not set(train) & set(held)


def test_build_writes_train_dev_and_a_pool_of_held_out_sentences_then_dev(tmp_path):
    src, out = tmp_path / "SST-2", tmp_path / "out" / "SST-2"
    src.mkdir()
    write(src / "train.tsv", TRAIN)
    write(src / "dev.tsv", DEV)
    summary = build(src, out, sentences=2, seed=0)
    train, pool = read(out / "train.tsv"), read(out / "pool.tsv")
    assert read(out / "dev.tsv") == [list(r) for r in DEV]
    held = pool[:2]
    assert pool[2:] == [list(r) for r in DEV]
    assert summary == {"train_rows": len(train), "removed_rows": len(TRAIN) - len(train), "held_out_sentences": 2,
                       "pool_rows": 4}
    for sentence, _ in held:
        assert all(text not in sentence for text, _ in train)


def test_asking_for_more_sentences_than_there_are_is_an_error():
    with pytest.raises(ValueError, match="only 3 sentences to hold out, asked for 4"):
        split_out_sentences([t for t, _ in TRAIN], 4, 0)
