"""Fine-tuning strategies: which loss is minimised at each point of training.

Notation: L_i is exit i's task loss (cross-entropy, or MSE for regression), i = 1..n, exit n being
the final classifier; J_i is the LTE loss of exit i, (u_i - target_i)^2 with the target detached:
1 - tanh|y_hat_i - y| for regression, 1[argmax == label] for classification. J is added wherever
the early exits 1..n-1 are trained, and only when the model has an LTE module.

  raw            L_n only: a plain fine-tune, the exits are never trained (the baseline).
  joint          sum_i L_i (+ J): everything together.
  two-stage      DeeBERT. First half of the epochs: L_n (backbone + final classifier). Second half:
                 sum_{i<n} L_i (+ J) with the backbone's output detached, so only exits 1..n-1 (and
                 LTE) learn; backbone and final classifier stay exactly as after stage one.
  alternating    BERxiT (the default), the article's form: odd epochs (1, 3, ...) minimise L_n
                 (backbone + final classifier); even epochs minimise the joint objective
                 sum_i L_i (+ J) (backbone + all exits). These are the two objectives of the
                 reference code, which switches them per optimisation step instead: see
                 `alternating-step`.
  alternating-step  the reference code's variant: even optimisation steps L_n, odd steps the joint
                 objective.
  weighted       PABEE's: sum_i i * L_i / sum_i i (+ J).
  self-distill   FastBERT-like: L_n + sum_{i<n} (L_i + KD_i) (+ J), KD_i being the soft
                 cross-entropy against the detached final softmax (MSE to the detached final output
                 for regression).

Retrofit (`exitserve train --from-classifier`, models/retrofit.py) is not a strategy over the whole
model: backbone and final exit are a finished classifier, and only exits 1..n-1 (+ LTE) train, on
cached features. `cached_exits_loss` is its objective: sum_{i<n} L_i (+ J), or with distillation
sum_{i<n} KD_i (+ J) against the classifier's own output, J's target then being its answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from exitserve.models.early_exit import AllExits

STRATEGIES = ("alternating", "alternating-step", "joint", "two-stage", "weighted", "self-distill", "raw")
MULTI_EPOCH = ("alternating", "two-stage")


@dataclass(frozen=True)
class Phase:
    """What one training step optimises, and which parameter groups it must leave untouched
    (groups: backbone, exits, final, lte -- see `EarlyExitModel.parameter_groups`)."""

    objective: str  # final | joint | exits | weighted | self-distill
    detach_backbone: bool = False
    frozen: tuple[str, ...] = ()


FINAL = Phase("final", frozen=("exits", "lte"))


def phase_for(strategy: str, epoch: int, num_epochs: int, step: int) -> Phase:
    """The objective at 0-based `epoch` (of `num_epochs`) and optimisation `step`."""
    if strategy == "raw":
        return FINAL
    if strategy == "alternating":
        return FINAL if epoch % 2 == 0 else Phase("joint")
    if strategy == "alternating-step":
        return FINAL if step % 2 == 0 else Phase("joint")
    if strategy == "two-stage":
        first_stage_epochs = (num_epochs + 1) // 2
        if epoch < first_stage_epochs:
            return FINAL
        return Phase("exits", detach_backbone=True, frozen=("backbone", "final"))
    if strategy in ("joint", "weighted", "self-distill"):
        return Phase(strategy)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def layer_losses(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """L_i for every exit: `[L]`."""
    if regression:
        return ((logits[..., 0] - labels.float()) ** 2).mean(-1)
    flat = F.cross_entropy(logits.flatten(0, 1), labels.repeat(logits.shape[0]), reduction="none")
    return flat.view(logits.shape[0], -1).mean(-1)


def lte_losses(out: AllExits, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """J_i for every exit: `[L]` (targets detached, LTE input not)."""
    assert out.lte is not None
    with torch.no_grad():
        if regression:
            target = 1.0 - torch.tanh((out.logits[..., 0] - labels.float()).abs())
        else:
            target = (out.logits.argmax(-1) == labels).float()
    return ((out.lte - target) ** 2).mean(-1)


def distill_losses(logits: torch.Tensor, regression: bool) -> torch.Tensor:
    """KD_i of exits 1..n-1 against the detached final exit: `[L-1]`."""
    final = logits[-1].detach()
    if regression:
        return ((logits[:-1, :, 0] - final[:, 0]) ** 2).mean(-1)
    soft = final.softmax(-1)
    return -(soft * logits[:-1].log_softmax(-1)).sum(-1).mean(-1)


def objective_loss(phase: Phase, out: AllExits, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    losses = layer_losses(out.logits, labels, regression)
    n = losses.shape[0]
    lte = lte_losses(out, labels, regression)[:-1].sum() if out.lte is not None else losses.new_zeros(())
    if phase.objective == "final":
        return losses[-1]
    if phase.objective == "exits":
        return losses[:-1].sum() + lte
    if phase.objective == "joint":
        return losses.sum() + lte
    if phase.objective == "weighted":
        weights = torch.arange(1, n + 1, dtype=losses.dtype, device=losses.device)
        return (weights * losses).sum() / weights.sum() + lte
    if phase.objective == "self-distill":
        return losses.sum() + distill_losses(out.logits, regression).sum() + lte
    raise ValueError(f"unknown objective {phase.objective!r}")


def cached_exits_loss(
    exits: AllExits, final: torch.Tensor, labels: torch.Tensor | None, regression: bool
) -> torch.Tensor:
    """Retrofit's objective (module docstring): `exits` holds exits 1..n-1 only; `final` is the fixed
    final exit's output `[B, C]`; `labels` None means distillation."""
    if labels is None:
        labels = final[:, 0] if regression else final.argmax(-1)
        loss = distill_losses(torch.cat([exits.logits, final[None]]), regression).sum()
    else:
        loss = layer_losses(exits.logits, labels, regression).sum()
    if exits.lte is not None:
        loss = loss + lte_losses(exits, labels, regression).sum()
    return loss
