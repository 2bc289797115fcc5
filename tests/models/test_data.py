from __future__ import annotations

import json

import pytest

from exitserve.models.data import ColumnOptions, load_examples, load_texts
from tests.conftest import GLUE


@pytest.mark.parametrize(
    ("task", "split", "rows", "pairs", "regression"),
    [
        ("SST-2", "dev", 200, False, False),
        ("MRPC", "dev", 60, True, False),  # UTF-8 BOM header
        ("STS-B", "dev", 100, True, True),  # ten columns, float scores
        ("RTE", "train", 60, True, False),  # string labels
        ("CoLA", "dev", 60, False, False),  # no header, no trailing newline
        ("QNLI", "dev", 40, True, False),
    ],
)
def test_glue_directories(task, split, rows, pairs, regression):
    spec, ex = load_examples(str(GLUE / task), split)
    assert len(ex) == rows
    assert (ex.pairs is not None) == pairs
    assert spec.is_regression == regression
    assert all(t.strip() for t in ex.texts)
    if regression:
        assert all(0.0 <= y <= 5.0 for y in ex.labels)
    else:
        assert set(ex.labels) <= set(range(len(spec.label_names)))
        assert len(set(ex.labels)) == 2


def test_mrpc_bom_does_not_hide_the_label_column():
    spec, ex = load_examples(str(GLUE / "MRPC"), "dev")
    assert spec.label_names == ("not_equivalent", "equivalent")
    assert ex.texts[0] and ex.pairs[0]


def test_cola_last_row_without_newline_is_kept():
    _, ex = load_examples(str(GLUE / "CoLA"), "dev")
    last_line = (GLUE / "CoLA" / "dev.tsv").read_text().split("\n")[-1]
    assert ex.texts[-1] == last_line.split("\t")[3]


def test_missing_split_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no train split"):
        load_examples(str(GLUE / "QNLI"), "train")


def test_generic_csv_and_jsonl(tmp_path):
    csv_file = tmp_path / "reviews.csv"
    csv_file.write_text('review,stars\n"good, really",pos\nbad,neg\nfine,pos\n')
    spec, ex = load_examples(str(csv_file), options=ColumnOptions("review", None, "stars"))
    assert spec.label_names == ("neg", "pos")
    assert ex.texts == ["good, really", "bad", "fine"] and ex.labels == [1, 0, 1]

    jsonl = tmp_path / "sim.jsonl"
    jsonl.write_text("\n".join(json.dumps({"a": f"x{i}", "b": "y", "s": i / 2}) for i in range(4)))
    spec, ex = load_examples(str(jsonl), options=ColumnOptions("a", "b", "s"))
    assert spec.is_regression and ex.labels == [0.0, 0.5, 1.0, 1.5] and ex.pairs == ["y"] * 4


def test_unknown_column_names_the_columns(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("sentence\tlabel\nhi\t1\n")
    with pytest.raises(ValueError, match=r"no column 'text'; columns are \['label', 'sentence'\]"):
        load_examples(str(f))


def test_checkpoint_label_names_fix_the_mapping(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,label\na,pos\nb,pos\n")
    _, ex = load_examples(str(f), label_names=("neg", "pos"))
    assert ex.labels == [1, 1]


def test_hub_dataset_name_goes_to_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"sentence": "great", "label": 1, "idx": 0}, {"sentence": "awful", "label": 0, "idx": 1}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    spec, ex = load_examples("glue/sst2", "dev")
    assert calls == [("nyu-mll/glue", "sst2", "validation")]
    assert spec.name == "sst2" and ex.labels == [1, 0]


def test_subset_is_seeded_and_bounded():
    _, ex = load_examples(str(GLUE / "SST-2"), "train")
    a, b = ex.subset(50, seed=1), ex.subset(50, seed=1)
    assert len(a) == 50 and a.texts == b.texts
    assert ex.subset(None, 0) is ex


def test_a_missing_local_path_is_a_clear_error_not_a_hub_lookup(tmp_path):
    for data in (str(tmp_path / "nope"), "./no-such-dir/SST-2", "missing.tsv", "tests/no-such-task"):
        with pytest.raises(FileNotFoundError, match="no such file or directory"):
            load_examples(data, "dev")


def test_unlabelled_text_files(tmp_path):
    single = tmp_path / "texts.txt"
    single.write_text("a fine film\n\n  \nawful\n")
    ex = load_texts(str(single))
    assert ex.texts == ["a fine film", "awful"] and ex.pairs is None and ex.labels is None
    assert len(ex.subset(1, seed=0)) == 1
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a man sings\tsomeone sings\nit rains\tthe sun shines\n")
    ex = load_texts(str(pairs))
    assert ex.texts == ["a man sings", "it rains"] and ex.pairs == ["someone sings", "the sun shines"]
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("one text\na\tpair\n")
    with pytest.raises(ValueError, match="tab-separated"):
        load_texts(str(mixed))
    with pytest.raises(ValueError, match="unlabelled"):
        load_examples(str(single), "dev")


@pytest.mark.parametrize("names", [("NEGATIVE", "POSITIVE"), ("LABEL_0", "LABEL_1"), ("negative", "positive")])
def test_a_models_label_names_are_matched_by_name(names):
    """SST-2's raw 0/1 (negative/positive) reach a model's labels by name, case ignored, or HF's LABEL_k."""
    _, plain = load_examples(str(GLUE / "SST-2"), "dev")
    spec, mapped = load_examples(str(GLUE / "SST-2"), "dev", label_names=names)
    assert spec.label_names == names and mapped.labels == plain.labels


def test_label_names_that_match_nothing_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"data label '1 \(positive\)' matches none of the model's labels \['neg'"):
        load_examples(str(GLUE / "SST-2"), "dev", label_names=("neg", "negative"))
    f = tmp_path / "d.csv"
    f.write_text("text,label\na,2\n")
    with pytest.raises(ValueError, match=r"data label '2' matches none"):  # only LABEL_k take a bare integer k
        load_examples(str(f), label_names=("LABEL_0", "LABEL_1"))
