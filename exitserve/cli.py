"""exitserve: early-exit (BERxiT) models -- train, evaluate, calibrate, serve."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from exitserve.models.criteria import CRITERIA
from exitserve.models.data import DEFAULT_DATA, ColumnOptions
from exitserve.models.strategies import STRATEGIES


def _add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", required=required, default=None if required else DEFAULT_DATA,
                   help="GLUE task dir, CSV/TSV/JSONL file, or HF dataset name (e.g. glue/sst2)")
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
    parser = argparse.ArgumentParser(prog="exitserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune an early-exit model (Hugging Face Trainer)")
    p.add_argument("--backbone", default="minilm-l6",
                   help="minilm-l6, mpnet-base, or any HF encoder id / local directory")
    _add_data_args(p, required=False)
    p.add_argument("--output", "-o", required=True, help="checkpoint directory to write")
    p.add_argument("--strategy", choices=STRATEGIES, default="alternating")
    p.add_argument("--raw", action="store_true", help="plain fine-tune baseline (no exits trained)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128, help="max tokens per input")
    p.add_argument("--max-train-samples", type=int, default=None, help="random training subset")
    p.add_argument("--max-eval-samples", type=int, default=None, help="dev subset for the stored scores")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean",
                   help="what early exits read: mean of the tokens, or the first token (reference code); "
                   "the final classifier always reads the first token (stock HF head)")
    p.add_argument("--lte", action=argparse.BooleanOptionalAction, default=None,
                   help="train the LTE module (default: on for regression)")
    p.add_argument("--criterion", choices=CRITERIA, default=None,
                   help="default: lte for regression, max-prob for classification")
    p.add_argument("--fp16-weights", action="store_true", help="store weights as fp16 (half the size)")

    p = sub.add_parser("evaluate", help="layer-wise scores, threshold sweep, wall-clock, plots")
    p.add_argument("checkpoint")
    _add_data_args(p, required=True)
    p.add_argument("--split", default="dev")
    p.add_argument("--criterion", choices=CRITERIA, default=None, help="default: the checkpoint's")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-timing", action="store_true", help="skip the wall-clock runs")
    p.add_argument("--json", default=None, help="write the report here (plots go beside it)")
    _add_backend_args(p)

    p = sub.add_parser("calibrate", help="choose and store the default threshold")
    p.add_argument("checkpoint")
    _add_data_args(p, required=True)
    p.add_argument("--split", default="dev")
    p.add_argument("--min-relative-score", type=float, default=0.99)
    p.add_argument("--max-samples", type=int, default=None)
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

    p = sub.add_parser("serve", help="serve a checkpoint over HTTP (default: the embedded SST-2 model)")
    p.add_argument("checkpoint", nargs="?", default=None, help="checkpoint directory (env EXITSERVE_CHECKPOINT)")
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


def cmd_train(args: argparse.Namespace) -> None:
    from exitserve.models.training import TrainOptions, train

    options = TrainOptions(
        backbone=args.backbone, data=args.data, output=args.output,
        strategy="raw" if args.raw else args.strategy, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, max_length=args.max_length,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, seed=args.seed,
        pooling=args.pooling, lte=args.lte, criterion=args.criterion, fp16_weights=args.fp16_weights,
        columns=_columns(args),
    )
    path = train(options)
    from exitserve.models.checkpoint import ExitConfig

    scores = ExitConfig.read(path).dev_scores
    for row in scores.get("per_layer", []):
        print(f"layer {row['layer']}: {scores['metric']} {row['score']:.4f}")
    print(f"checkpoint written to {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from exitserve.models.checkpoint import load_checkpoint
    from exitserve.models.evaluation import TIMED_THRESHOLDS, evaluate, format_report, write_report

    ckpt = load_checkpoint(args.checkpoint)
    columns = _columns(args, ckpt.exit_config.text_column) if args.text_column or args.pair_column else None
    report = evaluate(ckpt, args.data, args.split, columns, args.criterion, args.max_samples, args.batch_size,
                      () if args.no_timing else TIMED_THRESHOLDS, backend=_backend(args, ckpt))
    print(format_report(report))
    if args.json:
        for path in write_report(report, Path(args.json)):
            print(f"wrote {path}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from exitserve.models.calibration import calibrate
    from exitserve.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    cfg = calibrate(ckpt, args.data, args.split, args.min_relative_score, args.max_samples, _backend(args, ckpt))
    print(json.dumps(cfg.calibration, indent=2))


def cmd_export_onnx(args: argparse.Namespace) -> None:
    from exitserve.models.backends.onnx_families import UnsupportedModel, check_exportable
    from exitserve.models.backends.onnx_store import export_graphs
    from exitserve.models.checkpoint import load_checkpoint
    from exitserve.server.settings import DEFAULT_MODEL

    ckpt = load_checkpoint(args.checkpoint or DEFAULT_MODEL)
    try:
        check_exportable(ckpt.model)
    except UnsupportedModel as exc:
        raise ValueError(f"{ckpt.path} cannot run on onnxruntime (it is served on torch): {exc}") from exc
    directory, built = export_graphs(ckpt, args.quantize)
    print(f"{'wrote' if built else 'up to date:'} {directory}")


def cmd_export(args: argparse.Namespace) -> None:
    from exitserve.models.checkpoint import load_checkpoint
    from exitserve.models.export import export_hf

    print(f"exported to {export_hf(load_checkpoint(args.checkpoint), args.output)}")


def cmd_serve(args: argparse.Namespace) -> int:
    from exitserve.server.main import run
    from exitserve.server.settings import Settings

    overrides = dict(item.split("=", 1) for item in args.set)
    for name, value in (("checkpoint", args.checkpoint), ("host", args.host), ("port", args.port)):
        if value is not None:
            overrides[name] = value
    if args.ray:
        from exitserve.server import ray_serve

        options = ray_serve.RayOptions(
            num_replicas=args.replicas, max_replicas=args.max_replicas, num_cpus=args.num_cpus_per_replica,
            num_gpus=args.num_gpus_per_replica, max_ongoing_requests=args.max_ongoing_requests,
            max_queued_requests=args.max_queued_requests, metrics_port=args.metrics_port,
        )
        return ray_serve.run(Settings(**overrides), options, args.ray_address)
    return run(Settings(**overrides))


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "calibrate": cmd_calibrate, "export": cmd_export,
            "export-onnx": cmd_export_onnx, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from exitserve.models.backbones import BackboneError
    from exitserve.models.backends.onnx_store import OnnxStoreError
    from exitserve.models.checkpoint import CheckpointError

    logger = logging.getLogger("exitserve")
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


if __name__ == "__main__":
    sys.exit(main())
