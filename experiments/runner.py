"""The paper's quality experiments, reproduced: one resumable command per plan.

    python -m exitserve.experiments run --plan exp1-minilm [--strategy alternating] [--task SST-2]
                                        [--runs runs/experiments] [--out docs/results/experiments]
    python -m exitserve.experiments report [--out docs/results/experiments]

`run` trains every configuration of a plan that has no checkpoint yet (models.training, the HF
Trainer), evaluates it on the dev split with one recorded pass (layer-wise scores + threshold
sweep, plus wall-clock for the trade-off runs) and writes one JSON per run into --out, so a killed
run resumes where it stopped and finished results can be committed as they come; `--strategy` and
`--task` restrict a plan to some of its runs. `report`
(loadtest/experiment_report.py) turns those JSONs into the markdown tables and PNG plots of
docs/RESULTS.md.

Plans (subset sizes fixed per table so every run of a table sees the same data):
  exp1-minilm  layer-wise curves, minilm-l6: SST-2 (8000 train), MRPC, RTE (full train splits)
               x {raw, two-stage, joint, alternating-epoch, alternating, weighted, self-distill}
  exp1-mpnet   layer-wise curves, mpnet-base (12 layers): SST-2 (2000 train)
               x {raw, two-stage, joint, alternating-epoch}
  exp2         trade-off: SST-2 (2000 train), raw and alternating-epoch on both backbones, plus
               wall-clock at three thresholds, the calibrated one and 1.0 (batch 32)
  exp3         STS-B with LTE (the default strategy, full train, 4 epochs) evaluated with the LTE and
               patience criteria (the report adds the fixed-depth baseline from the same pass)
  exp3-lte     STS-B: Raw (the reference final layer) and the attempts to make LTE beat the fixed
               depth (docs/RESULTS.md, experiment 3)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from exitserve.models.backends import create_backend
from exitserve.models.calibration import choose_threshold
from exitserve.models.checkpoint import load_checkpoint
from exitserve.models.data import GLUE_DIR
from exitserve.models.encoding import encode
from exitserve.models.evaluation import evaluate, load_split_for, wall_clock
from exitserve.models.recipes import DEFAULT_STRATEGY
from exitserve.models.training import TrainOptions, train

ALL_STRATEGIES = ("raw", "two-stage", "joint", "alternating-epoch", "alternating", "weighted", "self-distill")
TRADEOFF_THRESHOLDS = (0.6, 0.8, 0.95)


@dataclass(frozen=True)
class RunSpec:
    task: str  # GLUE directory name
    backbone: str
    strategy: str
    train_samples: int | None
    epochs: int = 2
    batch_size: int = 32
    lte_target: str = "label"  # LTE models only (STS-B): see models.strategies.LteLoss
    lte_weight: float = 1.0

    @property
    def name(self) -> str:
        size = f"n{self.train_samples}" if self.train_samples else "full"
        lte = "" if self.lte_target == "label" else f"-lte-{self.lte_target}"
        lte += "" if self.lte_weight == 1.0 else f"-ltew{self.lte_weight:g}"
        return f"{self.task.lower()}-{self.backbone}-{self.strategy}-{size}{lte}"


PLANS: dict[str, list[RunSpec]] = {
    "exp1-minilm": [
        RunSpec(task, "minilm-l6", s, n)
        for task, n in (("SST-2", 8000), ("MRPC", None), ("RTE", None))
        for s in ALL_STRATEGIES
    ],
    "exp1-mpnet": [
        RunSpec("SST-2", "mpnet-base", s, 2000) for s in ("raw", "two-stage", "joint", "alternating-epoch")
    ],
    # the trade-off table: both backbones on the same 2000 samples (mpnet's two are shared with exp1-mpnet)
    "exp2": [
        RunSpec("SST-2", b, s, 2000) for b in ("mpnet-base", "minilm-l6") for s in ("raw", "alternating-epoch")
    ],
    "exp3": [RunSpec("STS-B", "minilm-l6", DEFAULT_STRATEGY, None, epochs=4)],
    # experiment 3's Raw reference and its measured attempts to make LTE beat the fixed depth
    "exp3-lte": [
        *(RunSpec("STS-B", "minilm-l6", s, None, epochs=4) for s in ("raw", "weighted", "alternating")),
        RunSpec("STS-B", "minilm-l6", DEFAULT_STRATEGY, None, epochs=4, lte_target="final"),
    ],
}


def ensure_trained(spec: RunSpec, runs: Path, glue: str) -> Path:
    path = runs / spec.name
    if (path / "exit_config.json").exists():
        return path
    train(TrainOptions(
        backbone=spec.backbone, data=f"{glue}/{spec.task}", output=str(path), strategy=spec.strategy,
        epochs=spec.epochs, batch_size=spec.batch_size, max_train_samples=spec.train_samples,
        lte_target=spec.lte_target, lte_weight=spec.lte_weight,
    ))
    return path


def quality(spec: RunSpec, runs: Path, out: Path, glue: str) -> None:
    """Train (if needed) and write the layer-wise/sweep report(s) of one run."""
    # STS-B: both regression criteria from one model; its Raw baseline trains no exits (final layer only)
    criteria = ("lte", "patience") if spec.task == "STS-B" and spec.strategy != "raw" else (None,)
    for criterion in criteria:
        target = out / f"{spec.name}{'-' + criterion if criterion else ''}.json"
        if target.exists():
            continue
        ckpt = load_checkpoint(ensure_trained(spec, runs, glue))
        report = evaluate(ckpt, f"{glue}/{spec.task}", "dev", criterion_name=criterion, timed_thresholds=())
        report.update(run=spec.name, task=spec.task, backbone=spec.backbone, strategy=spec.strategy,
                      train_samples=ckpt.exit_config.training["train_samples"], epochs=spec.epochs)
        target.write_text(json.dumps(report, indent=2) + "\n")


def tradeoff(spec: RunSpec, runs: Path, out: Path, glue: str) -> None:
    """Wall-clock at three thresholds, the calibrated (0.99) one, and 1.0, batch 32."""
    target = out / f"{spec.name}-timing.json"
    source = out / f"{spec.name}.json"
    if target.exists() or not source.exists():
        return
    report = json.loads(source.read_text())
    calibrated = choose_threshold(report["sweep"], report["final_layer_score"], 0.99)["threshold"]
    thresholds = [*sorted({*TRADEOFF_THRESHOLDS, calibrated}), 1.0]
    if spec.strategy == "raw":
        thresholds = [1.0]
    ckpt = load_checkpoint(runs / spec.name)
    _, rows = load_split_for(ckpt, f"{glue}/{spec.task}", "dev")
    samples = encode(ckpt.tokenizer, rows.texts, rows.pairs, ckpt.exit_config.max_length)
    timing = wall_clock(create_backend(ckpt), ckpt.exit_config.make_criterion(), samples, thresholds, batch_size=32)
    target.write_text(json.dumps({"run": spec.name, "calibrated_threshold": calibrated, "batch_size": 32,
                                  "samples": len(samples), "runs": timing}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exitserve.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report"])
    p.add_argument("--plan", choices=list(PLANS), action="append", default=None)
    p.add_argument("--strategy", action="append", default=None, help="only these strategies (repeatable)")
    p.add_argument("--task", action="append", default=None, help="only these GLUE tasks (repeatable)")
    p.add_argument("--runs", default="runs/experiments", help="checkpoints (large; not committed)")
    p.add_argument("--out", default="docs/results/experiments", help="JSON reports, tables, plots")
    p.add_argument("--glue", default=GLUE_DIR)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "report":
        from exitserve.experiments.report import write_report

        print(write_report(out))
        return
    for plan in args.plan or list(PLANS):
        specs = [spec for spec in PLANS[plan] if (args.strategy is None or spec.strategy in args.strategy)
                 and (args.task is None or spec.task in args.task)]
        for spec in tqdm(specs, desc=plan, unit="run"):
            quality(spec, Path(args.runs), out, args.glue)
            if plan == "exp2":
                tradeoff(spec, Path(args.runs), out, args.glue)


if __name__ == "__main__":
    main()
