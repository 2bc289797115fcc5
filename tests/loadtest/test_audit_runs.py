"""The drift demonstration and the audit-cost benchmark run end to end on the tiny checkpoint
(their numbers are not asserted, their bookkeeping is)."""

from __future__ import annotations

import json

from tqdm.auto import tqdm

from exitserve.loadtest import audit_cost, drift
from exitserve.models.data import load_examples
from tests.conftest import GLUE
from tests.server.conftest import make_client


def test_mixed_reviews_join_sentences_of_opposite_labels():
    _, rows = load_examples(str(GLUE / "SST-2"), "dev")
    label_of = {t.strip().rstrip(" ."): int(y) for t, y in zip(rows.texts, rows.labels, strict=True)}
    mixed = drift.mixed_reviews(rows.texts, [int(y) for y in rows.labels], 20, seed=3)
    assert len(mixed) == 20 and mixed == drift.mixed_reviews(rows.texts, [int(y) for y in rows.labels], 20, seed=3)
    for review in mixed:  # some sentence holds " , but " itself: one of the joins is ours
        parts = review.split(" , but ")
        joins = [(" , but ".join(parts[:i]), " , but ".join(parts[i:])) for i in range(1, len(parts))]
        assert any({label_of.get(a), label_of.get(b.strip().rstrip(" ."))} == {0, 1} for a, b in joins), review


def test_batches_never_span_two_phases():
    stream = [("a", "x")] * 5 + [("b", "y")] * 3
    assert [len(b) for b in drift.batches(stream, 4)] == [4, 1, 3]
    assert all(len({phase for phase, _ in b}) == 1 for b in drift.batches(stream, 4))


def test_recovery_counts_audited_inputs_since_the_shift():
    def rec(phase: int, audited: int, agreement: float) -> dict:
        return {"phase": drift.PHASES[phase], "audited": audited, "agreement": agreement}

    records = [rec(0, 10, 0.95), rec(0, 20, 0.96), rec(1, 30, 0.93), rec(1, 40, 0.85), rec(1, 50, 0.91),
               rec(1, 60, 0.94), rec(1, 70, 0.95), rec(2, 80, 0.97)]
    out = drift.recovery(records, 0.92, "agreement")
    assert out == {"min": 0.85, "end": 0.95, "first_below_after": 20, "back_after": 40}
    assert drift.recovery(records[:5], 0.92, "agreement")["back_after"] is None  # still below at the end
    assert drift.recovery(records, 0.8, "agreement")["back_after"] == 0  # never fell below


def test_drift_feed_records_what_info_reports_after_each_request(tiny_checkpoint, tmp_path):
    stream = drift.make_stream(str(GLUE / "SST-2"), shifted=16, seed=0, dev=32)
    settings = dict(audit_rate=1.0, audit_window=16, target_agreement=0.99, autopilot_min_samples=8, warmup=False)
    with make_client(tiny_checkpoint, **settings) as client:
        records, info = drift.feed(client, stream, 8, tqdm(disable=True))
    assert [r["sent"] for r in records] == list(range(8, 49, 8))  # 16 dev, 16 mixed, 16 dev
    assert [r["audited"] for r in records] == [r["sent"] for r in records]  # every request's audits were waited for
    assert [r["phase"] for r in records] == [p for p in drift.PHASES for _ in range(2)]
    thresholds = [r["threshold"] for r in records]
    assert thresholds == sorted(thresholds) and thresholds[-1] > thresholds[0]  # the tiny model's exits disagree
    report = {"machine": {}, "load_start": (0, 0, 0), "load_end": (0, 0, 0), "target": 0.99, "settings": "",
              "runs": {"autopilot on": drift.summary(records, info, 0.99)}}
    assert [row["inputs"] for row in report["runs"]["autopilot on"]["phases"]] == [16, 16, 16]
    assert "| autopilot on | shifted | 16 |" in drift.markdown(report)
    assert drift.plot(report, tmp_path / "drift.png").read_bytes()[:4] == b"\x89PNG"


def test_audit_cost_measures_both_servers_in_alternating_rounds(tiny_checkpoint, tmp_path):
    audit_cost.main(["--checkpoint", str(tiny_checkpoint), "--data", str(GLUE / "SST-2"), "--rate", "0.5",
                     "--concurrency", "2", "--duration", "1", "--rounds", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "audit_cost.json").read_text())
    assert [(p["round"], p["server"]) for p in report["points"]] == [
        (0, "audits off"), (0, "audit_rate=0.5"), (1, "audit_rate=0.5"), (1, "audits off")]
    assert all(p["ok"] > 0 and p["errors"] == 0 for p in report["points"])
    assert all(p["audits"]["audited"] == 0 for p in report["points"] if p["server"] == "audits off")
    assert len(report["ratios"]) == 2 and "median" in (tmp_path / "audit_cost.md").read_text()
