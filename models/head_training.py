"""Train exits 1..L-1 (and the LTE module) of a frozen model on cached features, with the HF Trainer.

`ExitHeadStack` holds the early exits and the LTE module of an `EarlyExitModel` (the same module
objects, so training updates the model in place) and runs them on cached exit inputs. It is all the
Trainer ever sees: the backbone and the final exit are outside its reach, so they stay byte for
byte as they were. `HeadTrainer` subclasses the Trainer and only overrides the loss
(`strategies.cached_exits_loss`); optimiser, schedule, progress bar and seeding are the stock ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import Trainer

from exitserve.models.answers import AllExits
from exitserve.models.early_exit import EarlyExitModel, lte_confidence
from exitserve.models.feature_cache import CachedFeatures
from exitserve.models.strategies import cached_exits_loss
from exitserve.models.training import RunOptions, trainer_arguments


class ExitHeadStack(nn.Module):
    """Exits 1..L-1 and the LTE module of `model`, run on cached inputs `[B, L-1, H]`."""

    def __init__(self, model: EarlyExitModel):
        super().__init__()
        self.heads = nn.ModuleList(model.heads[:-1])
        self.lte = model.lte

    def forward(self, features: torch.Tensor) -> AllExits:
        logits, lte = [], []
        for k, head in enumerate(self.heads):
            head_logits, pooled = head.from_summary(features[:, k])
            logits.append(head_logits)
            if self.lte is not None:
                lte.append(lte_confidence(self.lte, pooled))
        return AllExits(torch.stack(logits), torch.stack(lte) if lte else None)


class HeadTrainer(Trainer):
    """The stock Trainer with retrofit's loss."""

    def __init__(self, *args, regression: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.regression = regression

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(inputs["features"])
        loss = cached_exits_loss(out, inputs["final"], inputs.get("labels"), self.regression)
        return (loss, out) if return_outputs else loss


def train_exit_heads(
    model: EarlyExitModel, dataset: CachedFeatures, options: RunOptions, work_dir: str | Path
) -> int:
    """Train `model`'s early exits in place on `dataset` (labels, or the final exit's output when it
    has none) with `options`' epochs, batch size, learning rate, ...; returns the optimisation steps."""
    args = trainer_arguments(options, work_dir)
    trainer = HeadTrainer(model=ExitHeadStack(model).train(), args=args, train_dataset=dataset,
                          regression=dataset.regression)
    trainer.train()
    model.eval()
    return trainer.state.global_step
