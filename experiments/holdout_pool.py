"""A calibration pool for a treebank-style task: whole sentences held out of training, plus dev.

    python -m exitserve.experiments.holdout_pool --data ../shared/data/glue/SST-2 \\
        --sentences 2000 --seed 0 --out runs/sst2-holdout/SST-2

Why: a risk-controlled threshold (models/risk_control.py) is only as tight as its calibration set is
large — with 436 rows (half of SST-2 dev) Learn-then-Test at max-drop 0.01 and confidence 0.9 can
certify a threshold only where at most one calibration row is hurt. A larger pool needs labelled
inputs that the model never saw and that come from the same distribution as the inputs it will
answer. SST-2's training split lists every sentence together with all of its parse-tree phrases
(67,349 rows from ~6,900 sentences); dev holds whole sentences only. So:

  - a *sentence* is a training row that is no word-span of another row (the root of its tree);
  - `--sentences` of them, drawn with `--seed`, are held out, together with every training row that
    is a word-span of a held-out sentence (its phrases: otherwise the model would have been trained
    on most of the held-out sentence);
  - the rest is the new training split.

Writes a GLUE-style directory: `train.tsv` (what to train on), `dev.tsv` (the original dev, for the
layer-wise scores) and `pool.tsv` (the held-out sentences followed by dev: held-out train sentences
and dev sentences are both random sentences of the same corpus), which `exitserve calibrate --split
pool --calibration-fraction F` splits into calibration and report rows.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
from pathlib import Path


def word_spans(text: str, proper_only: bool = False) -> set[str]:
    """Every contiguous run of words of `text` (without `text` itself when `proper_only`)."""
    words = text.split()
    n = len(words)
    return {
        " ".join(words[i:j]) for i in range(n) for j in range(i + 1, n + 1) if not (proper_only and j - i == n)
    }


def split_out_sentences(texts: list[str], count: int, seed: int) -> tuple[list[int], list[int]]:
    """(rows to train on, held-out sentence rows): see the module docstring."""
    inside_others: set[str] = set()
    for text in texts:
        inside_others |= word_spans(text, proper_only=True)
    sentences = [i for i, text in enumerate(texts) if text.strip() not in inside_others]
    if count > len(sentences):
        raise ValueError(f"only {len(sentences)} sentences to hold out, asked for {count}")
    held = sorted(random.Random(seed).sample(sentences, count))
    covered: set[str] = set()
    for i in held:
        covered |= word_spans(texts[i])
    train = [i for i, text in enumerate(texts) if text.strip() not in covered]
    return train, held


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], rows[1:]


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.write_text("".join("\t".join(row) + "\n" for row in [header, *rows]), encoding="utf-8")


def build(data: Path, out: Path, sentences: int, seed: int) -> dict:
    header, train_rows = _read(data / "train.tsv")
    dev_header, dev_rows = _read(data / "dev.tsv")
    if header != dev_header:
        raise ValueError(f"{data}: train.tsv and dev.tsv have different columns")
    keep, held = split_out_sentences([row[0] for row in train_rows], sentences, seed)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "train.tsv", header, [train_rows[i] for i in keep])
    shutil.copyfile(data / "dev.tsv", out / "dev.tsv")
    _write(out / "pool.tsv", header, [train_rows[i] for i in held] + dev_rows)
    return {"train_rows": len(keep), "removed_rows": len(train_rows) - len(keep), "held_out_sentences": len(held),
            "pool_rows": len(held) + len(dev_rows)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.experiments.holdout_pool", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a GLUE-style task directory whose first column is the text")
    p.add_argument("--sentences", type=int, default=2000, help="whole sentences to hold out of training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the new task directory (name it like the task, e.g. .../SST-2)")
    args = p.parse_args(argv)
    print(build(Path(args.data), Path(args.out), args.sentences, args.seed))


if __name__ == "__main__":
    main()
