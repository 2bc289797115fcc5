"""Retrofit (`exitserve train --from-classifier`): a stock classifier of every supported family keeps
its answers and weights exactly as the final exit; only the early exits train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertModel,
    DistilBertConfig,
    MPNetConfig,
    RobertaConfig,
)

from exitserve.cli import main
from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.encoding import collate, encode
from exitserve.models.export import HEADS
from tests.conftest import GLUE
from tests.server.conftest import make_client

SIZE = dict(vocab_size=30522, max_position_embeddings=128)
LAYERS = 3
CONFIGS = {  # pad id 0: the MiniLM tokenizer's, which these tiny classifiers use
    "bert": lambda: BertConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, **SIZE
    ),
    "roberta": lambda: RobertaConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, pad_token_id=0,
        **{**SIZE, "max_position_embeddings": 130},
    ),
    "distilbert": lambda: DistilBertConfig(dim=32, n_layers=LAYERS, n_heads=4, hidden_dim=64, **SIZE),
    "mpnet": lambda: MPNetConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64, pad_token_id=0,
        **{**SIZE, "max_position_embeddings": 130},
    ),
}
FAST = ["--max-train-samples", "64", "--max-eval-samples", "48", "--epochs", "2", "--batch-size", "16"]


def save_classifier(path: Path, tokenizer, family: str = "bert", labels=("NEGATIVE", "POSITIVE"), seed: int = 0,
                    num_labels: int | None = None) -> str:
    """A random tiny `*ForSequenceClassification` saved with the MiniLM tokenizer (DistilBERT's
    tokenizers give no token type ids, so neither does its copy here)."""
    config = CONFIGS[family]()
    if num_labels == 1:
        config.num_labels, config.problem_type = 1, "regression"
    else:
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    if family == "distilbert":
        tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path, model_input_names=["input_ids",
                                                                                                  "attention_mask"])
    tokenizer.save_pretrained(path)
    return str(path)


def original_logits(classifier: str, texts: list[str]) -> tuple[torch.Tensor, dict]:
    """The stock classifier's logits on `texts`, and the batch (from its own tokenizer)."""
    model = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    tok = AutoTokenizer.from_pretrained(classifier)
    batch = collate(encode(tok, texts), tok.pad_token_id)
    with torch.inference_mode():
        return model(**batch).logits, batch


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_final_exit_is_the_classifier_and_only_early_exits_change(family, tokenizer, tmp_path, sst2_texts):
    classifier = save_classifier(tmp_path / "clf", tokenizer, family)
    out = tmp_path / "ckpt"
    assert main(["train", "--from-classifier", classifier, "--data", str(GLUE / "SST-2"), "-o", str(out), *FAST]) == 0

    # the final exit answers as the classifier does, on fixture text it never trained on
    expected, batch = original_logits(classifier, sst2_texts)
    ckpt = load_checkpoint(out)
    with torch.inference_mode():
        got = ckpt.model(**batch).logits[-1]
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))

    # backbone and final head: byte for byte the classifier's; early exits: trained away from their start
    saved = load_file(str(out / "model.safetensors"))
    original = load_file(str(Path(classifier) / "model.safetensors"))
    prefix, pooler, head = HEADS[family]
    for name, value in original.items():
        if name.startswith(prefix + "."):
            assert torch.equal(saved["encoder." + name[len(prefix) + 1:]], value), name
    final = f"heads.{LAYERS - 1}"
    for ours, theirs in ((f"{final}.pooler", pooler), (f"{final}.classifier", head)):
        for part in ("weight", "bias"):
            assert torch.equal(saved[f"{ours}.{part}"], original[f"{theirs}.{part}"])
    for k in range(LAYERS - 1):  # exit poolers start as copies of the head's dense layer
        assert not torch.equal(saved[f"heads.{k}.pooler.weight"], saved[f"{final}.pooler.weight"])

    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["label_names"] == ["NEGATIVE", "POSITIVE"]  # the classifier's names, SST-2's 0/1 mapped to them
    assert cfg["final_activation"] == ("relu" if family == "distilbert" else "tanh")
    assert cfg["strategy"] == "retrofit"
    check = cfg["training"]["final_exit_check"]
    assert check["texts"] == 48 and check["identical_answers"] == 48
    assert cfg["calibration"]["samples"] == 48
    assert len(cfg["dev_scores"]["per_layer"]) == LAYERS

    # and it exports back to the same stock classifier
    assert main(["export", str(out), "-o", str(tmp_path / "hf")]) == 0
    exported, _ = original_logits(str(tmp_path / "hf"), sst2_texts)
    assert torch.allclose(exported, expected, atol=1e-5)


def test_distill_attaches_exits_with_unlabelled_text(tokenizer, tmp_path, sst2_texts):
    classifier = save_classifier(tmp_path / "clf", tokenizer, labels=("a", "b", "c"))
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(sst2_texts[:40]) + "\n")
    out = tmp_path / "ckpt"
    assert main(["train", "--from-classifier", classifier, "--data", str(texts), "--distill", "-o", str(out),
                 "--epochs", "2", "--batch-size", "8"]) == 0
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["strategy"] == "retrofit-distill" and cfg["label_names"] == ["a", "b", "c"]
    assert cfg["calibration"] is None and cfg["dev_scores"] == {}  # no labelled dev split to score or calibrate on
    assert cfg["training"]["final_exit_check"] == {
        "split": "train", "texts": 40, "identical_answers": 40, "max_abs_logit_difference": 0.0
    }
    saved = load_file(str(out / "model.safetensors"))
    assert not torch.equal(saved["heads.0.pooler.weight"], saved[f"heads.{LAYERS - 1}.pooler.weight"])

    # served unchanged: with every layer run, the server answers with the classifier's label and probabilities
    expected, _ = original_logits(classifier, sst2_texts[:4])
    with make_client(out) as client:
        reply = client.post("/predict", json={"text": sst2_texts[:4], "threshold": 1.0})
    assert reply.status_code == 200
    results = reply.json()["results"]
    assert [r["prediction"] for r in results] == [["a", "b", "c"][i] for i in expected.argmax(-1).tolist()]
    assert all(r["exit_layer"] == LAYERS for r in results)
    probs = torch.tensor([[r["probabilities"][name] for name in "abc"] for r in results])
    assert torch.allclose(probs, expected.softmax(-1), atol=1e-5)


def test_regression_classifier_gets_the_lte_criterion(tokenizer, tmp_path):
    classifier = save_classifier(tmp_path / "reg", tokenizer, num_labels=1)
    out = tmp_path / "ckpt"
    assert main(["train", "--from-classifier", classifier, "--data", str(GLUE / "STS-B"), "-o", str(out),
                 *FAST]) == 0
    cfg = load_checkpoint(out).exit_config
    assert cfg.regression and cfg.use_lte and cfg.criterion == "lte" and cfg.pair_column == "sentence2"
    assert cfg.training["final_exit_check"]["identical_answers"] == 48
    assert cfg.calibration is not None and cfg.calibration["criterion"] == "lte"


def test_real_minilm_classifier(tmp_path, minilm_dir, tokenizer, sst2_texts):
    """A stock BertForSequenceClassification on the real all-MiniLM-L6-v2 weights (head random)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        minilm_dir, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    out = tmp_path / "ckpt"
    assert main(["train", "--from-classifier", str(tmp_path / "clf"), "--data", str(GLUE / "SST-2"), "-o", str(out),
                 "--max-train-samples", "32", "--max-eval-samples", "100", "--epochs", "1"]) == 0
    ckpt = load_checkpoint(out)
    check = ckpt.exit_config.training["final_exit_check"]
    assert check["texts"] == 100 == check["identical_answers"]
    assert check["max_abs_logit_difference"] < 1e-5
    assert ckpt.model.num_layers == 6


def assert_one_line_error(stderr: str, message: str) -> None:
    """The CLI's error is its last line (transformers' loading bars may come before it)."""
    last = stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("exitserve train: error: ") and message in last, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("make", "data", "extra", "message"),
    [
        (dict(labels=("neg", "pos")), "SST-2", [], "data label '0 (negative)' matches none of the model's labels"),
        (dict(labels=("x", "y", "z")), "SST-2", [], "matches none of the model's labels ['x', 'y', 'z']"),
        (dict(num_labels=1), "SST-2", [], "SST-2 is a classification task but the classifier is a regression"),
        (dict(), "STS-B", [], "STS-B is a regression task but the classifier is a classification model"),
        (dict(), "SST-2", ["--backbone", "minilm-l6"], "--backbone does not apply to --from-classifier"),
        (dict(), "SST-2", ["--raw"], "--raw does not apply"),
        (dict(), "SST-2", ["--task-type", "regression"], "--task-type regression, but the classifier is a classif"),
    ],
)
def test_mismatches_are_one_line_errors_before_any_work(make, data, extra, message, tokenizer, tmp_path, capsys):
    classifier = save_classifier(tmp_path / "clf", tokenizer, **make)
    out = tmp_path / "ckpt"
    capsys.readouterr()
    code = main(["train", "--from-classifier", classifier, "--data", str(GLUE / data), "-o", str(out), *extra])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, message)
    assert not out.exists()


def test_bad_classifiers_and_flags_are_refused(tokenizer, tmp_path, capsys):
    bare = tmp_path / "bare"
    BertModel(CONFIGS["bert"]()).save_pretrained(bare)
    tokenizer.save_pretrained(bare)
    texts = tmp_path / "t.txt"
    texts.write_text("one\ntwo\n")
    classifier = save_classifier(tmp_path / "clf", tokenizer)
    sst2 = str(GLUE / "SST-2")
    capsys.readouterr()
    cases = [
        (["--from-classifier", str(bare), "--data", sst2], "no trained weights for classifier.bias"),
        (["--from-classifier", str(tmp_path / "nowhere"), "--data", sst2], "no such directory"),
        (["--from-classifier", classifier, "--data", str(texts)], "is unlabelled text: add --distill"),
        (["--data", sst2, "--distill"], "--distill needs --from-classifier"),
    ]
    for args, message in cases:
        assert main(["train", *args, "-o", str(tmp_path / "out")]) == 2
        assert_one_line_error(capsys.readouterr().err, message)
