"""Calibration rows and report rows: a threshold is never reported on the rows that chose it.

`exitserve calibrate` splits the rows it is given with a fixed seed: a fraction (default half)
chooses the threshold and the complement reports it (for GLUE: half of dev calibrates, the other
half reports). The checkpoint's calibration record keeps the seed, the fraction, the row subset
(`--max-samples`) and a fingerprint of the rows, so `exitserve evaluate` on the same data finds the
calibration rows again — wherever the data now lives — and by default reports only on the others.

A learned exit rule (models/exit_rule.py) is fitted on rows of its own: `exitserve fit-exit-rule`
takes a seeded fraction of the rows it is given and records it (`rule_selection`). When the checkpoint
is calibrated on the same rows, those rows are left out first, and the calibration record keeps a copy
of that selection, so the rule's rows, the calibration rows and the report rows never overlap.
"""

from __future__ import annotations

import hashlib

import numpy as np

from exitserve.models.data import Examples, subset_rows


def fingerprint(rows: Examples) -> str:
    """A short hash of the inputs, in order (labels are not part of it: text files have none)."""
    digest = hashlib.sha256()
    for i, text in enumerate(rows.texts):
        pair = rows.pairs[i] if rows.pairs is not None else ""
        digest.update(f"{text}\x1f{pair}\x1e".encode())
    return digest.hexdigest()[:16]


def split_rows(total: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration rows, report rows) of `total` rows: a random `fraction` of them, and the rest."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError("--calibration-fraction must lie in (0, 1]")
    size = round(total * fraction)
    if size < 1:
        raise ValueError(f"a calibration fraction of {fraction} of {total} rows leaves no calibration row")
    order = np.random.default_rng(seed).permutation(total)
    return np.sort(order[:size]), np.sort(order[size:])


def rule_selection(rows: Examples, fraction: float, seed: int) -> dict:
    """Which rows of `rows` (the whole loaded split) fit an exit rule, for the rule's record."""
    return {"data_fingerprint": fingerprint(rows), "fit_fraction": fraction, "seed": seed}


def rule_rows(record: dict | None, rows: Examples) -> np.ndarray:
    """The rows of `rows` (a whole loaded split) that fitted a rule, from its `rule_selection` record:
    none when the rule was fitted on other data."""
    if not record or record.get("data_fingerprint") != fingerprint(rows):
        return np.zeros(0, dtype=int)
    return split_rows(len(rows), record["fit_fraction"], record["seed"])[0]


def selection(rows: Examples, max_samples: int | None, fraction: float, seed: int,
              rule: dict | None = None) -> dict:
    """How calibration picked its rows out of `rows` (the whole loaded split), for the record; `rule` is
    the checkpoint's rule selection, kept when the rule was fitted on these rows."""
    fitted = {k: rule[k] for k in ("data_fingerprint", "fit_fraction", "seed")} \
        if rule and len(rule_rows(rule, rows)) else None
    return {"data_fingerprint": fingerprint(rows), "max_samples": max_samples,
            "calibration_fraction": fraction, "seed": seed, "rule_rows": fitted}


def available_rows(record: dict, rows: Examples) -> np.ndarray:
    """The rows of `rows` that calibration splits into calibration and report rows: all but the
    rule's, then a `--max-samples` subset of them."""
    kept = np.setdiff1d(np.arange(len(rows)), rule_rows(record.get("rule_rows"), rows))
    return kept[subset_rows(len(kept), record["max_samples"], seed=0)]


def calibration_rows(record: dict | None, rows: Examples) -> np.ndarray | None:
    """The rows of `rows` (a whole loaded split) that chose the recorded threshold, or None when
    the record was not made on these rows."""
    if not record or record.get("data_fingerprint") != fingerprint(rows):
        return None
    kept = available_rows(record, rows)
    chosen, _ = split_rows(len(kept), record["calibration_fraction"], record["seed"])
    return kept[chosen]


def report_rows(record: dict | None, rows: Examples, include_calibration_rows: bool = False) -> tuple[Examples, dict]:
    """The rows to report on and a description of the choice: every row except those the threshold
    was calibrated on (unless `include_calibration_rows`, or the record was not made on these rows)."""
    chosen = calibration_rows(record, rows)
    total = len(rows)
    if chosen is None:
        if not record:
            note = f"all {total} rows (the checkpoint has no calibration record)"
        elif "data_fingerprint" not in record:
            note = (f"all {total} rows; the calibration record predates held-out calibration (chosen on "
                    f"{record.get('split', '?')} of {record.get('data', '?')}): if that is this data, "
                    "these scores include the rows that chose the threshold")
        else:
            note = (f"all {total} rows (the checkpoint's threshold was calibrated on other data, "
                    f"{record.get('split') or 'rows'} of {record.get('data', '?')}: rows this data shares with "
                    "it are not detected)")
        return rows, {"rows": "all", "samples": total, "calibration_rows_included": None, "note": note}
    if include_calibration_rows:
        note = f"all {total} rows, INCLUDING the {len(chosen)} rows the threshold was calibrated on"
        return rows, {"rows": "all", "samples": total, "calibration_rows_included": len(chosen), "note": note}
    fitted = rule_rows(record.get("rule_rows"), rows)
    keep = np.setdiff1d(np.arange(total), np.union1d(chosen, fitted))
    if not len(keep):
        raise ValueError("every row of this data chose the calibrated threshold or fitted the exit rule; "
                         "evaluate on other data or pass --all-rows")
    rule = f", {len(fitted)} fitted the exit rule" if len(fitted) else ""
    note = (f"report rows only: {len(keep)} of {total} ({len(chosen)} chose the calibrated "
            f"threshold{rule}; --all-rows includes them)")
    return rows.take(keep.tolist()), {"rows": "report", "samples": len(keep), "calibration_rows_included": 0,
                                      "note": note}
