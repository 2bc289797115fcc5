"""The tamper run on the tiny model: every damaged tokenizer is refused, every damaged graph is found
and rebuilt, and the run writes its record."""

from __future__ import annotations

import json

from exitserve.loadtest.reliability.tamper import TOKENIZER_DAMAGE, tamper
from exitserve.models.checkpoint import save_checkpoint
from tests.conftest import make_exit_config, make_model


def test_the_tamper_run_refuses_tokenizers_and_rebuilds_graphs(tiny_checkpoint, tokenizer, sst2_texts, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("EXITSERVE_CACHE", str(tmp_path / "cache"))
    foreign = save_checkpoint(tmp_path / "foreign", make_model(seed=99), tokenizer,
                              make_exit_config(default_threshold=0.55))
    result = tamper(tiny_checkpoint, sst2_texts[:16], tmp_path / "out", foreign=foreign)
    cases = {c["damage"]: c for c in result["cases"]}
    for name in TOKENIZER_DAMAGE:
        assert cases[name]["self_test"].startswith("refused: self-test on torch: tokenizer does not reproduce")
    graphs = [c for c in result["cases"] if c["runtime"] == "onnxruntime"]
    assert len(graphs) == 5  # the composed early-exit graph of another model too
    for case in graphs:
        assert case["self_test"] == "graphs rebuilt, then passed" and case["answers_differing_after"] == 0, case
    assert cases["layer 3 <- layer 2"]["canary_errors"]["first_over_tolerance"][0] == "layer 3"
    # the served early-exit graph is a file of its own: the broken layer graph fails the canaries' layer run
    assert cases["layer 2 not a graph"]["answers_differing_without_self_test"] == "PartFailed"
    undamaged = result["undamaged_canary_errors"]
    assert all(row["first_over_tolerance"] is None for row in undamaged)
    written = json.loads((tmp_path / "out" / "tamper.json").read_text())["cases"]
    assert [(c["damage"], c["self_test"]) for c in written] == [(c["damage"], c["self_test"]) for c in result["cases"]]
