"""exitserve: early-exit (BERxiT) models -- train, evaluate, calibrate, serve."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from exitserve.models.data import DEFAULT_DATA, ColumnOptions

CALIBRATE_DESCRIPTION = """\
Choose the default exit threshold and store it in the checkpoint, with what it does on rows it was
not chosen on. A seeded random --calibration-fraction of the rows (default half) chooses the
threshold; the other rows report it (`exitserve evaluate` on the same data later leaves the
calibration rows out).

methods:
  risk (default)  Learn-then-Test with fixed-sequence testing over the threshold grid: the fastest
                  threshold whose risk is certified <= --max-drop with probability >= --confidence
                  over the draw of the calibration rows (exact binomial p-values; Hoeffding-Bentkus
                  for the regression quality loss). 1.0 (no early exit) when nothing is certified.
  point           the lowest threshold whose calibration score, and the score at every higher
                  threshold, stays >= --min-relative-score x the final layer's. A point estimate
                  with no guarantee: it can fall below its target on new data.

risks (--method risk):
  quality         needs labels. Classification: the rate of answers an exit gets wrong where the
                  final layer is right; it bounds the accuracy drop against the final layer
                  (--max-drop 0.01 = one point of accuracy). Regression: the mean of
                  clip((|exit - y| - |final - y|) / label range, 0, 1), the increase of the absolute
                  error as a fraction of the label range (not a bound on Spearman).
  consistency     needs no labels: the rate of exit answers that differ from the final layer's
                  (regression: by more than --tolerance). Calibrate on raw text from your own
                  traffic: --data texts.txt (one input per line; a pair as two tab-separated columns).

What is guaranteed: with probability >= confidence over the calibration rows, the expected risk on
new inputs from the SAME distribution is <= max-drop. Not guaranteed: any single batch, another
distribution (drift breaks it), or a metric other than the risk (F1, Matthews, Spearman).
"""


def _add_data_args(p: argparse.ArgumentParser, required: bool, texts: bool = False) -> None:
    p.add_argument("--data", required=required, default=None if required else DEFAULT_DATA,
                   help="GLUE task dir, CSV/TSV/JSONL file, or HF dataset name (e.g. glue/sst2)"
                   + (", or a .txt file of unlabelled inputs (--risk consistency)" if texts else ""))
    p.add_argument("--text-column", default=None, help="generic files: the text column (default: text)")
    p.add_argument("--pair-column", default=None, help="generic files: the second text of a pair task")
    p.add_argument("--label-column", default="label", help="generic files: the label column")
    p.add_argument("--task-type", choices=["classification", "regression"], default=None,
                   help="generic files: default guessed from the labels")


def _columns(args: argparse.Namespace, default_text: str = "text") -> ColumnOptions:
    return ColumnOptions(args.text_column or default_text, args.pair_column, args.label_column, args.task_type)


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="runtime to evaluate on (onnxruntime: the graphs `serve` uses on the CPU, built and "
                   "cached on first use; see export-onnx)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="onnxruntime weights: none (fp32) or int8 (dynamic quantisation)")


def _backend(args: argparse.Namespace, checkpoint):
    from exitserve.models.backends import create_backend

    return create_backend(checkpoint, args.backend, args.quantize)


def build_parser() -> argparse.ArgumentParser:
    # imported here, not at the top: they load torch, which `exitserve serve` must not do before it
    # has re-executed itself on jemalloc (main, server/allocator.py)
    from exitserve.models.criteria import CRITERIA
    from exitserve.models.recipes import DEFAULT_STRATEGY, LTE_TARGETS, STRATEGIES

    parser = argparse.ArgumentParser(prog="exitserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune an early-exit model (Hugging Face Trainer), or attach exits "
                       "to a fine-tuned classifier (--from-classifier)")
    p.add_argument("--backbone", default=None,
                   help="minilm-l6 (default), mpnet-base, or any HF encoder id / local directory")
    _add_data_args(p, required=False)
    p.add_argument("--output", "-o", required=True, help="checkpoint directory to write")
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help=f"fine-tuning strategy (models/strategies.py; README table); default: {DEFAULT_STRATEGY}")
    p.add_argument("--raw", action="store_true", help="plain fine-tune baseline (no exits trained)")
    p.add_argument("--epochs", type=int, default=None, help="default 2 (--from-classifier: 3, over the cache)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (--from-classifier: 128)")
    p.add_argument("--learning-rate", type=float, default=None, help="default 5e-5 (--from-classifier: 1e-3)")
    p.add_argument("--max-length", type=int, default=128, help="max tokens per input")
    p.add_argument("--max-train-samples", type=int, default=None, help="random training subset")
    p.add_argument("--max-eval-samples", type=int, default=None, help="dev subset for the stored scores")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean",
                   help="what early exits read: mean of the tokens, or the first token (reference code); "
                   "the final classifier always reads the first token (stock HF head)")
    p.add_argument("--lte", action=argparse.BooleanOptionalAction, default=None,
                   help="train the LTE module (default: on for regression)")
    p.add_argument("--lte-weight", type=float, default=1.0, help="weight of the LTE loss (reference: 1)")
    p.add_argument("--lte-target", choices=LTE_TARGETS, default="label",
                   help="what the LTE predicts: closeness of each exit to the label (reference) or to the "
                   "final layer's answer")
    p.add_argument("--criterion", choices=CRITERIA, default=None,
                   help="default: lte for regression, max-prob for classification")
    p.add_argument("--fp16-weights", action="store_true",
                   help="store weights as fp16 (half the size; with --from-classifier the final answers may "
                   "then differ slightly from the classifier's)")
    retro = p.add_argument_group("attach exits to a fine-tuned classifier (docs/RETROFIT.md)")
    retro.add_argument("--from-classifier", default=None, metavar="PATH_OR_HUB_ID",
                       help="a stock *ForSequenceClassification (BERT/MiniLM, RoBERTa/XLM-R/CamemBERT, DistilBERT, "
                       "MPNet): its backbone and head stay unchanged as the final exit; only the early exits train, "
                       "on features cached in one pass")
    retro.add_argument("--distill", action="store_true",
                       help="train the exits on the classifier's own outputs instead of labels "
                       "(then --data may be unlabelled text: a .txt file, one input per line)")

    p = sub.add_parser("evaluate", help="layer-wise scores, threshold sweep, wall-clock, plots")
    p.add_argument("checkpoint")
    _add_data_args(p, required=True)
    p.add_argument("--split", default="dev")
    p.add_argument("--criterion", choices=CRITERIA, default=None, help="default: the checkpoint's")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-timing", action="store_true", help="skip the wall-clock runs")
    p.add_argument("--json", default=None, help="write the report here (plots go beside it)")
    p.add_argument("--all-rows", action="store_true",
                   help="also report on the rows the checkpoint's threshold was calibrated on (by default, when "
                   "its calibration record names this data, those rows are left out); the report says so")
    _add_backend_args(p)

    p = sub.add_parser("calibrate", help="choose and store the default threshold (risk-controlled by default)",
                       description=CALIBRATE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    _add_data_args(p, required=True, texts=True)
    p.add_argument("--split", default="dev", help="the split of labelled data to use (default: dev)")
    p.add_argument("--method", choices=["risk", "point"], default="risk",
                   help="risk: Learn-then-Test, a guarantee (default); point: today's point estimate")
    p.add_argument("--risk", choices=["quality", "consistency"], default=None,
                   help="--method risk: what to bound (default quality; see above)")
    p.add_argument("--max-drop", type=float, default=None,
                   help="--method risk: the largest allowed risk, e.g. 0.01 = one point of accuracy (default 0.01)")
    p.add_argument("--confidence", type=float, default=None,
                   help="--method risk: probability over the calibration draw that the bound holds (default 0.9)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="--risk consistency on a regression model (required there): an exit answer farther than "
                   "this from the final layer's, in output units, counts as a disagreement")
    p.add_argument("--min-relative-score", type=float, default=None,
                   help="--method point: keep the calibration score >= this x the final layer's (default 0.99)")
    p.add_argument("--calibration-fraction", type=float, default=0.5,
                   help="the random fraction of the rows that chooses the threshold; the rest reports it (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration/report split (default 0)")
    p.add_argument("--max-samples", type=int, default=None, help="a random subset of the rows first")
    p.add_argument("--criterion", choices=CRITERIA, default=None,
                   help="calibrate this criterion's threshold and make it the checkpoint's (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=32)
    _add_backend_args(p)

    p = sub.add_parser("fit-exit-rule", help="fit the learned exit rule (criterion learned) on text, without labels",
                       description="Fits a small per-layer model that predicts whether the final layer would give "
                       "an exit's answer (models/exit_rule.py), on a seeded --fit-fraction of the rows; labels are "
                       "never read. Then `exitserve calibrate CHECKPOINT --criterion learned` on the same data "
                       "chooses its threshold on the other rows.")
    p.add_argument("checkpoint")
    _add_data_args(p, required=True, texts=True)
    p.add_argument("--split", default="dev", help="the split of a labelled data set to use (default: dev)")
    p.add_argument("--fit-fraction", type=float, default=0.25,
                   help="the random fraction of the rows that fits the rule (default 0.25); the rest is left "
                   "for calibration and report")
    p.add_argument("--seed", type=int, default=0, help="seed of the row selection (default 0)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="regression models (required there): an exit within this of the final layer's answer, "
                   "in output units, counts as agreeing")
    p.add_argument("--batch-size", type=int, default=32)
    _add_backend_args(p)
    p = sub.add_parser("export", help="export the final layer as a stock Hugging Face classifier")
    p.add_argument("checkpoint")
    p.add_argument("--output", "-o", required=True)

    p = sub.add_parser("export-onnx", help="write the ONNX Runtime backend's per-layer graphs (what serve runs)",
                       description="Writes the embeddings and every layer and exit as ONNX graphs with a manifest "
                       "into CHECKPOINT/onnx/<fp32|int8>, or, when the checkpoint is not writable, into "
                       "$EXITSERVE_CACHE/onnx/<weights hash>/ (default ~/.cache/exitserve). An up-to-date export "
                       "is kept; a stale or broken one is rebuilt.")
    p.add_argument("checkpoint", nargs="?", default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="int8: dynamically quantised weights")

    p = sub.add_parser("record-canaries", help="record the inputs the load-time self-test checks (for a checkpoint "
                       "saved before they existed, or after its weights or tokenizer were replaced on purpose)",
                       description="Runs 16 fixed inputs through the checkpoint's torch model and writes their token "
                       "ids and every layer's and exit's outputs into CHECKPOINT/canaries.json; `serve` refuses to "
                       "start on a tokenizer or a runtime that does not reproduce them (models/self_test.py). "
                       "Checkpoints saved by train record them themselves.")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--quantize", choices=["int8"], action="append", default=[],
                   help="also record what ONNX Runtime with these weights computes (from graphs built afresh), "
                   "so that serving with quantize=int8 is checked too")

    p = sub.add_parser("serve", help="serve checkpoints over HTTP (default: the embedded SST-2 model)")
    p.add_argument("checkpoint", nargs="*", default=[],
                   help="checkpoint directories: one (env EXITSERVE_CHECKPOINT) or several, each a model of its "
                   "own (env EXITSERVE_MODELS, JSON name -> directory)")
    p.add_argument("--name", action="append", default=[],
                   help="the name a model is served under, once per checkpoint in order (default: its directory's "
                   "name); every API addresses models by it")
    p.add_argument("--host", default=None, help="default 127.0.0.1 (env EXITSERVE_HOST)")
    p.add_argument("--port", type=int, default=None, help="default 8000 (env EXITSERVE_PORT)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any other setting, e.g. --set max_batch_size=16 (see server/settings.py)")
    ray = p.add_argument_group("Ray Serve (--ray; docs/RAY.md)")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve replicas instead of one uvicorn process")
    ray.add_argument("--ray-address", default=None,
                     help="join this Ray cluster (e.g. auto, 10.0.0.5:6379); default: start a local one")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (the minimum with --max-replicas)")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscale between --replicas and this")
    ray.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                     help="CPUs reserved per replica; also its torch threads unless torch_threads is set")
    ray.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="with --set device=cuda")
    ray.add_argument("--max-ongoing-requests", type=int, default=16, help="requests a replica works on at once")
    ray.add_argument("--max-queued-requests", type=int, default=64, help="requests each proxy queues; beyond: 429")
    ray.add_argument("--metrics-port", type=int, default=None,
                     help="replica k on a node also serves /metrics on this port + k")
    return parser


def _tuned(args: argparse.Namespace) -> dict:
    """The options whose defaults differ between a fine-tune and a retrofit, where given."""
    given = {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate}
    return {k: v for k, v in given.items() if v is not None}


def _common(args: argparse.Namespace) -> dict:
    return dict(
        data=args.data, output=args.output, max_length=args.max_length, max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples, seed=args.seed, pooling=args.pooling, lte=args.lte,
        criterion=args.criterion, fp16_weights=args.fp16_weights, columns=_columns(args), **_tuned(args),
    )


def cmd_train(args: argparse.Namespace) -> None:
    if args.from_classifier:
        path = _retrofit(args)
    else:
        from exitserve.models.recipes import DEFAULT_STRATEGY
        from exitserve.models.training import TrainOptions, train

        if args.distill:
            raise ValueError("--distill needs --from-classifier (it distils a classifier's answers into exits)")
        strategy = "raw" if args.raw else args.strategy or DEFAULT_STRATEGY
        path = train(TrainOptions(backbone=args.backbone or "minilm-l6", strategy=strategy, lte_weight=args.lte_weight,
                                  lte_target=args.lte_target, **_common(args)))
    from exitserve.models.exit_config import ExitConfig

    cfg = ExitConfig.read(path)
    scores = cfg.dev_scores
    for row in scores.get("per_layer", []):
        print(f"layer {row['layer']}: {scores['metric']} {row['score']:.4f}")
    if args.from_classifier:
        from exitserve.models.retrofit import summary

        print("\n".join(summary(cfg)))
    print(f"checkpoint written to {path}")


def _retrofit(args: argparse.Namespace) -> Path:
    from exitserve.models.retrofit import RetrofitOptions, retrofit

    for flag, value in (("--backbone", args.backbone), ("--strategy", args.strategy), ("--raw", args.raw)):
        if value:
            raise ValueError(f"{flag} does not apply to --from-classifier (the classifier is the backbone and "
                             "only its early exits train)")
    return retrofit(RetrofitOptions(
        classifier=args.from_classifier, distill=args.distill, **_common(args),
    ))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from exitserve.models.checkpoint import load_checkpoint
    from exitserve.models.evaluation import TIMED_THRESHOLDS, evaluate, format_report, write_report

    ckpt = load_checkpoint(args.checkpoint)
    columns = _columns(args, ckpt.exit_config.text_column) if args.text_column or args.pair_column else None
    report = evaluate(ckpt, args.data, args.split, columns, args.criterion, args.max_samples, args.batch_size,
                      () if args.no_timing else TIMED_THRESHOLDS, include_calibration_rows=args.all_rows,
                      backend=_backend(args, ckpt))
    print(format_report(report))
    if args.json:
        for path in write_report(report, Path(args.json)):
            print(f"wrote {path}")


def calibration_method(args: argparse.Namespace):
    """The calibration method the options ask for; an option of the other method is an error."""
    from exitserve.models.calibration import PointMethod, RiskMethod

    risk_options = {"--risk": args.risk, "--max-drop": args.max_drop, "--confidence": args.confidence,
                    "--tolerance": args.tolerance}
    if args.method == "point":
        given = [name for name, value in risk_options.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} applies to --method risk, not point")
        return PointMethod(0.99 if args.min_relative_score is None else args.min_relative_score)
    if args.min_relative_score is not None:
        raise ValueError("--min-relative-score applies to --method point; --method risk takes --max-drop")
    return RiskMethod(args.risk or "quality", 0.01 if args.max_drop is None else args.max_drop,
                      0.9 if args.confidence is None else args.confidence, args.tolerance)


def cmd_calibrate(args: argparse.Namespace) -> None:
    from exitserve.models.calibration import calibrate
    from exitserve.models.checkpoint import load_checkpoint

    method = calibration_method(args)
    ckpt = load_checkpoint(args.checkpoint)
    columns = _columns(args, ckpt.exit_config.text_column) if args.text_column or args.pair_column else None
    cfg = calibrate(ckpt, args.data, method, args.split, args.calibration_fraction, args.seed, args.max_samples,
                    columns, args.batch_size, _backend(args, ckpt), args.criterion)
    print(json.dumps(cfg.calibration, indent=2))


def cmd_fit_exit_rule(args: argparse.Namespace) -> None:
    from exitserve.models.checkpoint import load_checkpoint
    from exitserve.models.rule_fitting import fit_exit_rule

    ckpt = load_checkpoint(args.checkpoint)
    columns = _columns(args, ckpt.exit_config.text_column) if args.text_column or args.pair_column else None
    cfg = fit_exit_rule(ckpt, args.data, args.split, args.fit_fraction, args.seed, args.tolerance, columns,
                        args.batch_size, _backend(args, ckpt))
    print(json.dumps(cfg.exit_rule.describe(), indent=2))
    split = "" if args.data.endswith(".txt") else f" --split {args.split}"
    print(f"next: exitserve calibrate {args.checkpoint} --data {args.data}{split} --criterion learned (the rule's "
          f"{cfg.exit_rule.fitted['rows']} rows are left out)")


def cmd_export_onnx(args: argparse.Namespace) -> None:
    from exitserve.models.backends.onnx_families import check_exportable
    from exitserve.models.backends.onnx_store import UnsupportedModel, export_graphs
    from exitserve.models.checkpoint import load_checkpoint
    from exitserve.server.settings import DEFAULT_MODEL

    ckpt = load_checkpoint(args.checkpoint or DEFAULT_MODEL)
    try:
        check_exportable(ckpt.model)
    except UnsupportedModel as exc:
        raise ValueError(f"{ckpt.path} cannot run on onnxruntime (it is served on torch): {exc}") from exc
    directory, built = export_graphs(ckpt.path, ckpt.exit_config, lambda: ckpt.model, args.quantize)
    print(f"{'wrote' if built else 'up to date:'} {directory}")


def cmd_record_canaries(args: argparse.Namespace) -> None:
    from exitserve.models.canaries import record_canaries
    from exitserve.models.checkpoint import load_checkpoint

    print(f"wrote {record_canaries(load_checkpoint(args.checkpoint), args.quantize)}")


def cmd_export(args: argparse.Namespace) -> None:
    from exitserve.models.checkpoint import load_checkpoint
    from exitserve.models.export import export_hf

    print(f"exported to {export_hf(load_checkpoint(args.checkpoint), args.output)}")


def _served(checkpoints: list[str], names: list[str]) -> dict:
    """The settings for the checkpoints and --name's given: `checkpoint` for one unnamed, else `models`."""
    if names and len(names) != len(checkpoints):
        raise ValueError(f"{len(names)} --name for {len(checkpoints)} checkpoints: give one per checkpoint, in order")
    if len(checkpoints) == 1 and not names:
        return {"checkpoint": checkpoints[0]}
    if not checkpoints:
        return {}
    names = names or [Path(c).resolve().name for c in checkpoints]
    if len(set(names)) != len(names):
        raise ValueError(f"two models would be called the same ({', '.join(names)}): name each with --name")
    return {"models": dict(zip(names, checkpoints, strict=True))}


def cmd_serve(args: argparse.Namespace) -> int:
    from exitserve.server.main import run
    from exitserve.server.settings import SettingsError, settings_from

    malformed = [item for item in args.set if "=" not in item]
    if malformed:
        raise SettingsError(f"--set takes NAME=VALUE (got {malformed[0]!r})")
    overrides = dict(item.split("=", 1) for item in args.set)
    for name, value in (("host", args.host), ("port", args.port)):
        if value is not None:
            overrides[name] = value
    overrides.update(_served(args.checkpoint, args.name))
    if args.ray and "models" in overrides:
        raise ValueError("--ray serves one model; start one deployment per model")
    if args.ray:
        from exitserve.server import ray_serve

        options = ray_serve.RayOptions(
            num_replicas=args.replicas, max_replicas=args.max_replicas, num_cpus=args.num_cpus_per_replica,
            num_gpus=args.num_gpus_per_replica, max_ongoing_requests=args.max_ongoing_requests,
            max_queued_requests=args.max_queued_requests, metrics_port=args.metrics_port,
        )
        return ray_serve.run(settings_from(overrides), options, args.ray_address)
    return run(settings_from(overrides))


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "calibrate": cmd_calibrate,
            "fit-exit-rule": cmd_fit_exit_rule, "export": cmd_export, "export-onnx": cmd_export_onnx,
            "record-canaries": cmd_record_canaries, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as the `exitserve` program: `serve` first re-executes itself on jemalloc, if found
        from exitserve.server.allocator import AllocatorError, preload_for

        try:
            preload_for(sys.argv[1:])
        except AllocatorError as exc:
            print(f"exitserve serve: error: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    from exitserve.models.backends.onnx_store import OnnxStoreError
    from exitserve.models.exit_config import BackboneError, CheckpointError

    logger, handler = logging.getLogger("exitserve"), None
    if args.command != "serve" and not logger.handlers:  # serve configures logging itself; elsewhere show
        handler = logging.StreamHandler()  # exitserve's progress lines (e.g. building the ONNX graphs)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        return COMMANDS[args.command](args) or 0
    except (CheckpointError, BackboneError, OnnxStoreError, FileNotFoundError, ValueError) as exc:
        print(f"exitserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:  # for this command only: a caller that runs main() in its process keeps its own logging
        if handler is not None:
            logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
