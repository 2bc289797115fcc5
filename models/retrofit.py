"""`exitserve train --from-classifier`: attach exits to a fine-tuned classifier, its answers unchanged.

DeeBERT's second stage (and Apparate's "ramps") for a classifier that already exists:

  1. read the classifier's config -- family, task type, label names (models/hf_classifier.py) -- and
     load the data, its labels mapped to the classifier's by name: a mismatch stops here, before
     any weights are loaded;
  2. load the classifier as an early-exit model: its encoder is the backbone, its own head exit L;
  3. one pass over the training texts caches what every early exit reads (models/feature_cache.py);
  4. exits 1..L-1 (+ LTE) train on the cache for a few epochs with the HF Trainer
     (models/head_training.py), on the labels or, with `distill`, on the classifier's own outputs
     (so unlabelled text is enough);
  5. the checkpoint is written (fp32 by default: exit L's weights are the classifier's, byte for
     byte), its final exit is checked against the classifier itself on the dev texts, and it is
     calibrated like any checkpoint (`exitserve calibrate`'s defaults: the risk-controlled threshold
     chosen on half of the dev split, reported on the other half).
"""

from __future__ import annotations

import inspect
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel, set_seed

from exitserve.models.calibration import RiskMethod, calibrate
from exitserve.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from exitserve.models.data import Examples, load_examples, load_texts
from exitserve.models.encoding import collate, encode
from exitserve.models.exit_config import ExitConfig
from exitserve.models.feature_cache import CachedFeatures, cache_features
from exitserve.models.head_training import train_exit_heads
from exitserve.models.hf_classifier import ClassifierInfo, load_classifier, read_classifier
from exitserve.models.inference import length_batches
from exitserve.models.tasks import TaskSpec
from exitserve.models.training import RunOptions, dev_layer_scores, exit_rule

CHECK_SAMPLES = 1000  # texts the final exit is checked on when the data has no dev split
REGRESSION_TOLERANCE = 1e-5  # two regression outputs this close count as the same answer


@dataclass
class RetrofitOptions(RunOptions):
    """A fine-tune's options (the epochs etc. are the exit heads', over the cache) and the classifier."""

    classifier: str = ""  # a local directory or a Hugging Face hub id
    distill: bool = False  # train on the classifier's soft outputs instead of labels
    output: str = "runs/retrofit"
    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 1e-3


def retrofit(options: RetrofitOptions) -> Path:
    """Retrofit exits (see the module docstring); returns the checkpoint directory."""
    info = read_classifier(options.classifier)
    spec, train_rows, dev_rows = load_data(options, info)
    use_lte, criterion = exit_rule(info.regression, options.lte, options.criterion)
    set_seed(options.seed)
    imported = load_classifier(info, use_lte, options.pooling)
    model, tokenizer = imported.model, imported.tokenizer
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    samples = encode(tokenizer, train_rows.texts, train_rows.pairs, options.max_length)
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="feature-cache-", dir=output) as work:
        started = time.perf_counter()
        cache = cache_features(model, samples, tokenizer.pad_token_id, work)
        cache_seconds = time.perf_counter() - started
        dataset = CachedFeatures(cache, None if options.distill else train_rows.labels, info.regression)
        started = time.perf_counter()
        steps = train_exit_heads(model, dataset, options, work)
        head_seconds = time.perf_counter() - started
        del cache, dataset  # release the memmaps before their directory goes

    exit_config = ExitConfig(
        task=spec.name, task_type=info.task_type, metric=spec.metric, label_names=list(info.label_names),
        num_layers=model.num_layers, backbone=options.classifier, criterion=criterion,
        default_threshold=options.default_threshold, use_lte=use_lte, max_length=options.max_length,
        pooling=options.pooling, final_activation=model.final_activation,
        strategy="retrofit-distill" if options.distill else "retrofit",
        text_column=spec.text_column, pair_column=spec.pair_column,
        training={
            **{k: v for k, v in asdict(options).items() if k not in ("columns", "output")},
            "train_samples": len(train_rows), "cache_seconds": round(cache_seconds, 1),
            "head_train_seconds": round(head_seconds, 1), "steps": steps,
        },
    )
    if dev_rows is not None:
        exit_config.dev_scores = dev_layer_scores(model, tokenizer, exit_config, dev_rows)
    save_checkpoint(output, model.cpu(), tokenizer, exit_config, fp16=options.fp16_weights)

    checkpoint = load_checkpoint(output)
    checked = dev_rows if dev_rows is not None else train_rows.subset(CHECK_SAMPLES, options.seed)
    check = compare_final_exit(checkpoint, imported.original, checked)
    checkpoint.exit_config.training["final_exit_check"] = {"split": "dev" if dev_rows is not None else "train", **check}
    checkpoint.exit_config.save(output)
    if dev_rows is not None:
        calibrate(checkpoint, options.data, RiskMethod(), "dev", max_samples=options.max_eval_samples)
    return output


def load_data(options: RetrofitOptions, info: ClassifierInfo) -> tuple[TaskSpec, Examples, Examples | None]:
    """The training rows (labels mapped to the classifier's) and the dev rows (None without a dev
    split: a single file or unlabelled text). Raises ValueError on any mismatch with the classifier."""
    if Path(options.data).suffix == ".txt":
        if not options.distill:
            raise ValueError(f"--data {options.data} is unlabelled text: add --distill to train the exits on "
                             "the classifier's own outputs")
        rows = load_texts(options.data).subset(options.max_train_samples, options.seed)
        spec = TaskSpec(
            Path(options.data).stem, info.task_type, "spearman" if info.regression else "accuracy", "text",
            "text_pair" if rows.pairs is not None else None, label_names=info.label_names,
        )
        return spec, rows, None
    if options.columns.task_type not in (None, info.task_type):
        raise ValueError(f"--task-type {options.columns.task_type}, but the classifier is a {info.task_type} model")
    columns = replace(options.columns, task_type=info.task_type)
    names = info.label_names or None
    spec, train_rows = load_examples(options.data, "train", columns, names)
    if spec.task_type != info.task_type:
        raise ValueError(f"{options.data} is a {spec.task_type} task but the classifier is a {info.task_type} model")
    train_rows = train_rows.subset(options.max_train_samples, options.seed)
    if Path(options.data).is_file():
        return spec, train_rows, None
    try:
        _, dev_rows = load_examples(options.data, "dev", columns, names)
    except FileNotFoundError:
        return spec, train_rows, None
    return spec, train_rows, dev_rows.subset(options.max_eval_samples, options.seed)


@torch.inference_mode()
def compare_final_exit(checkpoint: Checkpoint, original: PreTrainedModel, rows: Examples) -> dict:
    """The saved checkpoint's final exit against the classifier it came from, on the same padded
    batches: how many answers are identical (classification: the same label; regression: within
    `REGRESSION_TOLERANCE`) and the largest logit difference."""
    model, tokenizer, cfg = checkpoint.model, checkpoint.tokenizer, checkpoint.exit_config
    samples = encode(tokenizer, rows.texts, rows.pairs, cfg.max_length)
    takes_types = "token_type_ids" in inspect.signature(original.forward).parameters  # not every family's does
    identical, worst = 0, 0.0
    for idx in length_batches(samples, 32):
        batch = collate([samples[i] for i in idx], tokenizer.pad_token_id)
        ours = model(**batch).logits[-1]
        if not takes_types:
            batch.pop("token_type_ids", None)
        theirs = original(**batch).logits
        if cfg.regression:
            identical += int(((ours - theirs).abs()[:, 0] <= REGRESSION_TOLERANCE).sum())
        else:
            identical += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        worst = max(worst, float((ours - theirs).abs().max()))
    return {"texts": len(samples), "identical_answers": identical, "max_abs_logit_difference": worst}


def summary(cfg: ExitConfig) -> list[str]:
    """What a retrofit measured, in lines for the terminal: times, the final-exit check, calibration."""
    run, check = cfg.training, cfg.training["final_exit_check"]
    lines = [
        f"feature cache {run['cache_seconds']:.0f} s, exit heads {run['head_train_seconds']:.0f} s "
        f"({run['train_samples']} texts)",
        f"final exit = the classifier on {check['identical_answers']}/{check['texts']} {check['split']} texts "
        f"(max |logit difference| {check['max_abs_logit_difference']:.2g})",
    ]
    if cfg.calibration:
        c, report = cfg.calibration, cfg.calibration["report"]
        lines.append(f"calibrated: threshold {c['threshold']}; on the {report['samples']} held-out dev rows "
                     f"{c['metric']} {report['score']:.4f} ({report['relative_score']:.1%} of the final layer), "
                     f"{report['layers_saved']:.1%} of layers saved")
    else:
        lines.append("not calibrated (no dev split): run exitserve calibrate CHECKPOINT --data HELD_OUT_DATA")
    return lines
