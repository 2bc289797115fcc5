"""`exitserve train`: fine-tune an early-exit model with the Hugging Face Trainer.

`EarlyExitTrainer` subclasses `transformers.Trainer` and only overrides the loss: the loss of each
step comes from `models.strategies` (which objective applies at this stage/epoch/step), and the
gradients of the parameter groups a phase leaves untouched are dropped. Everything else --
optimiser, schedule, progress bar, seeding -- is the stock Trainer. A strategy with two stages
(two-stage) runs two Trainers one after the other, each with a fresh optimiser and schedule.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import (
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from exitserve.models.backbones import resolve_backbone
from exitserve.models.backends.torch_backend import TorchBackend
from exitserve.models.checkpoint import save_checkpoint
from exitserve.models.data import DEFAULT_DATA, ColumnOptions, Examples, load_examples
from exitserve.models.early_exit import EarlyExitModel
from exitserve.models.encoding import Encoded, collate, encode
from exitserve.models.evaluation import per_layer_scores
from exitserve.models.exit_config import ExitConfig
from exitserve.models.inference import record_all_layers
from exitserve.models.recipes import DEFAULT_STRATEGY, STRATEGIES
from exitserve.models.strategies import (
    MULTI_EPOCH,
    REFERENCE_LTE,
    LteLoss,
    num_stages,
    objective_loss,
    phase_for,
)


@dataclass
class RunOptions:
    """What every way of making a checkpoint takes: a fine-tune (`TrainOptions`) or a retrofit of a
    fine-tuned classifier (`models.retrofit.RetrofitOptions`)."""

    data: str = DEFAULT_DATA
    output: str = "runs/model"
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.06
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    seed: int = 42
    pooling: str = "mean"
    lte: bool | None = None  # None: on for regression, off for classification
    criterion: str | None = None  # None: lte for regression, max-prob for classification
    default_threshold: float = 0.9
    fp16_weights: bool = False
    columns: ColumnOptions = field(default_factory=ColumnOptions)


@dataclass
class TrainOptions(RunOptions):
    backbone: str = "minilm-l6"
    strategy: str = DEFAULT_STRATEGY
    lte_weight: float = 1.0  # J's weight (the reference's: 1)
    lte_target: str = "label"  # label: 1 - tanh|y_hat - y| (the reference); final: agreement with the last layer


def trainer_arguments(options: RunOptions, output_dir: str | Path, **extra) -> TrainingArguments:
    """The Trainer's arguments from `options` (no checkpoints on the way, no reporting services)."""
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=options.batch_size,
        num_train_epochs=options.epochs,
        learning_rate=options.learning_rate,
        weight_decay=options.weight_decay,
        warmup_steps=options.warmup,
        save_strategy="no",
        report_to="none",
        logging_steps=50,
        seed=options.seed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        label_names=["labels"],
        **extra,
    )


class TextDataset(Dataset):
    def __init__(self, samples: list[Encoded], labels: list):
        self.samples, self.labels = samples, labels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        # "input_ids" lets the Trainer's length-grouped sampler read lengths.
        return {"input_ids": self.samples[i].input_ids, "sample": self.samples[i], "label": self.labels[i]}


class Collator:
    def __init__(self, pad_id: int, regression: bool):
        self.pad_id, self.regression = pad_id, regression

    def __call__(self, rows: list[dict]) -> dict:
        batch = collate([r["sample"] for r in rows], self.pad_id)
        dtype = torch.float32 if self.regression else torch.long
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=dtype)
        return batch


class _EpochCounter(TrainerCallback):
    """Counts epochs and remembers the optimisation step each one began at (the reference code
    alternates on the step number within the epoch)."""

    def __init__(self, trainer: EarlyExitTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.epoch_index += 1
        self.trainer.epoch_start_step = state.global_step


class EarlyExitTrainer(Trainer):
    """The stock Trainer with the loss of the chosen strategy (in training `stage` of it)."""

    def __init__(
        self, *args, strategy: str, regression: bool, stage: int = 0, lte_loss: LteLoss = REFERENCE_LTE, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.strategy, self.regression, self.stage, self.lte_loss = strategy, regression, stage, lte_loss
        self.epoch_index, self.epoch_start_step = -1, 0
        self.add_callback(_EpochCounter(self))

    def current_phase(self):
        return phase_for(
            self.strategy, stage=self.stage, epoch=max(self.epoch_index, 0),
            step=self.state.global_step - self.epoch_start_step, lte=self.model.lte is not None,
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Parameters outside this phase's objective can still get zero gradients (the exits share
        # one stacked tensor); drop them so the optimiser skips them entirely, weight decay included.
        groups = model.parameter_groups()
        for name in self.current_phase().frozen:
            for param in groups[name]:
                param.grad = None
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        phase = self.current_phase()
        out = model(**inputs, detach_backbone=phase.detach_backbone)
        loss = objective_loss(phase, out, labels, self.regression, self.lte_loss)
        return (loss, out) if return_outputs else loss


def fit(
    model: EarlyExitModel,
    args: TrainingArguments,
    dataset: Dataset,
    collator: Collator,
    strategy: str,
    regression: bool,
    callbacks: Sequence[TrainerCallback] = (),
    lte_loss: LteLoss = REFERENCE_LTE,
) -> int:
    """Train `model` in place with the strategy: one Trainer run per stage, each with a fresh
    optimiser and schedule over all `args.num_train_epochs`. Returns the optimisation steps."""
    steps = 0
    for stage in range(num_stages(strategy)):
        trainer = EarlyExitTrainer(
            model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=list(callbacks),
            strategy=strategy, regression=regression, stage=stage, lte_loss=lte_loss,
        )
        trainer.train()
        steps += trainer.state.global_step
    return steps


def _check(options: TrainOptions) -> None:
    if options.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {options.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if options.strategy in MULTI_EPOCH and options.epochs < 2:
        raise ValueError(f"strategy {options.strategy!r} alternates objectives by epoch: use --epochs >= 2")


def exit_rule(regression: bool, lte: bool | None, criterion: str | None) -> tuple[bool, str]:
    """Whether to train the LTE module and the default criterion: by default LTE for regression,
    max-prob for classification."""
    use_lte = regression if lte is None else lte
    return use_lte, criterion or ("lte" if regression else "max-prob")


def train(options: TrainOptions) -> Path:
    """Train, score every exit on the dev split (if there is one), save a checkpoint."""
    _check(options)
    lte_loss = LteLoss(options.lte_weight, options.lte_target)
    set_seed(options.seed)
    spec, train_rows = load_examples(options.data, "train", options.columns)
    train_rows = train_rows.subset(options.max_train_samples, options.seed)
    try:
        _, dev_rows = load_examples(options.data, "dev", options.columns, spec.label_names or None)
        dev_rows = dev_rows.subset(options.max_eval_samples, options.seed)
    except FileNotFoundError:
        dev_rows = None
    use_lte, criterion = exit_rule(spec.is_regression, options.lte, options.criterion)

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(options.backbone))
    model = EarlyExitModel.from_backbone(options.backbone, spec.num_outputs, use_lte, options.pooling)
    if spec.is_regression:
        model.start_regression_at(sum(train_rows.labels) / len(train_rows))
    samples = encode(tokenizer, train_rows.texts, train_rows.pairs, options.max_length)
    dataset = TextDataset(samples, train_rows.labels)
    collator = Collator(tokenizer.pad_token_id, spec.is_regression)
    args = trainer_arguments(options, Path(options.output) / "trainer", train_sampling_strategy="group_by_length")
    started = time.perf_counter()
    steps = fit(model, args, dataset, collator, options.strategy, spec.is_regression, lte_loss=lte_loss)
    elapsed = time.perf_counter() - started

    model.eval()
    exit_config = ExitConfig(
        task=spec.name, task_type=spec.task_type, metric=spec.metric, label_names=list(spec.label_names),
        num_layers=model.num_layers, backbone=options.backbone, criterion=criterion,
        default_threshold=options.default_threshold, use_lte=use_lte, max_length=options.max_length,
        pooling=options.pooling, final_activation=model.final_activation,
        strategy=options.strategy, text_column=spec.text_column, pair_column=spec.pair_column,
        training={
            **{k: v for k, v in asdict(options).items() if k not in ("columns", "output")},
            "train_samples": len(train_rows), "train_seconds": round(elapsed, 1),
            "steps": steps,
        },
    )
    if dev_rows is not None and len(dev_rows):
        exit_config.dev_scores = dev_layer_scores(model, tokenizer, exit_config, dev_rows)
    return save_checkpoint(options.output, model, tokenizer, exit_config, fp16=options.fp16_weights)


def dev_layer_scores(model: EarlyExitModel, tokenizer, exit_config: ExitConfig, rows: Examples) -> dict:
    samples = encode(tokenizer, rows.texts, rows.pairs, exit_config.max_length)
    recorded = record_all_layers(TorchBackend(model, tokenizer.pad_token_id), samples)
    layers = per_layer_scores(recorded, exit_config.task_spec(), rows.labels)
    return {"split": "dev", "samples": len(rows), "metric": exit_config.metric, "per_layer": layers}
