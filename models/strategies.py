"""Fine-tuning strategies: which loss is minimised at each point of training.

Built after the BERxiT reference code (castorini/berxit, `examples/run_highway_glue.py` and
`transformers/modeling_highway_bert.py`). Notation: L_i is exit i's task loss (cross-entropy, or
MSE for regression), i = 1..n, exit n being the final classifier.

  alternating        BERxiT, as the reference code does it: the objective switches
                     every optimisation step, counted within the epoch as the reference does
                     (`step_num`). Even steps: L_n (backbone + final classifier). Odd steps: the
                     joint objective sum_i L_i (backbone + all exits) -- the reference's `alternate`.
                     With the LTE module the odd steps are sum_{i<n} L_i (backbone + exits 1..n-1,
                     final classifier untouched), as the reference's `alternate-lte` defines them.
  alternating-epoch  the article's wording ("odd and even epochs"): the same two objectives
                     switched per epoch (epochs 1, 3, ... L_n; epochs 2, 4, ... the odd-step one).
                     Needs >= 2 epochs. The reference code has no per-epoch form.
  joint              sum_i L_i: everything together.
  two-stage          DeeBERT, as the reference's `two_stage` (the default): two full trainings of
                     --epochs each, each with a fresh optimiser and schedule. Stage 1: L_n
                     (backbone + final classifier) -- exactly the Raw fine-tune. Stage 2:
                     sum_{i<n} L_i with the backbone's output detached, so only exits 1..n-1 (and
                     the LTE module) learn; backbone and final classifier stay exactly as stage 1
                     left them. Chosen as the default in experiment 1 (docs/RESULTS.md): its final
                     layer is Raw's by construction, its early exits matched the best measured.
  weighted           PABEE's (the reference's `weight-linear`): sum_i i * L_i / sum_i i.
  self-distill       FastBERT-like: L_n + sum_{i<n} (L_i + KD_i), KD_i being the soft cross-entropy
                     against the detached final softmax (MSE to the detached final output for
                     regression).
  raw                L_n only: a plain fine-tune, the exits are never trained (the baseline).

The LTE loss (models with the learned-to-exit module; on by default for regression) is the
reference's: J = one MSE, weight 1, between the LTE outputs u_i and their detached targets over
every layer i = 1..n (the last included) and every sample of the batch, added to the objective of
every step that trains the LTE module -- every step of every strategy except raw and two-stage's
first stage. Targets: 1 - tanh|y_hat_i - y| for regression, 1[argmax_i == label] for
classification (the reference predicts the complement and exits below its threshold; the loss is
the same). `LteLoss` can change the two things experiment 3 measured (docs/RESULTS.md): the weight
of J, and what the LTE predicts -- `target="final"` replaces the label by the final layer's
(detached) answer: 1 - tanh|y_hat_i - y_hat_n| or 1[argmax_i == argmax_n], i.e. "exit i agrees
with the full model", which is what an exit must preserve.

One deviation from the reference, kept for a clean parameter split: on alternating's even steps
the reference's optimiser also moves the exit heads 1..n-1 (their poolers feed the LTE); here
those steps train backbone, final classifier and LTE only (J still reaches the backbone through
them).

Parameters outside a phase's groups get no update at all (not even weight decay or Adam momentum):
the Trainer drops their gradients (models/training.py); tests check it for every strategy.

Retrofit (`exitserve train --from-classifier`, models/retrofit.py) is not a strategy over the whole
model: backbone and final exit are a finished classifier, and only exits 1..n-1 (+ LTE) train, on
cached features. `cached_exits_loss` is its objective: sum_{i<n} L_i (+ J), or with distillation
sum_{i<n} KD_i (+ J) against the classifier's own output, J's target then being its answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from exitserve.models.answers import AllExits, answers
from exitserve.models.recipes import LTE_TARGETS, STRATEGIES

MULTI_EPOCH = ("alternating-epoch",)


@dataclass(frozen=True)
class LteLoss:
    """J's weight and what the LTE learns to predict (see the module docstring)."""

    weight: float = 1.0
    target: str = "label"  # label | final

    def __post_init__(self) -> None:
        if self.target not in LTE_TARGETS:
            raise ValueError(f"unknown LTE target {self.target!r}; choose one of {', '.join(LTE_TARGETS)}")
        if self.weight < 0:
            raise ValueError("the LTE loss weight must be >= 0")


REFERENCE_LTE = LteLoss()  # weight 1, closeness to the label: the reference code's


@dataclass(frozen=True)
class Phase:
    """What one training step optimises, and which parameter groups it must leave untouched
    (groups: backbone, exits, final, lte -- see `EarlyExitModel.parameter_groups`)."""

    objective: str  # final | joint | exits | weighted | self-distill
    detach_backbone: bool = False
    frozen: tuple[str, ...] = ()

    @property
    def trains_lte(self) -> bool:
        return "lte" not in self.frozen


PLAIN = Phase("final", frozen=("exits", "lte"))  # raw, two-stage's first stage
FINAL = Phase("final", frozen=("exits",))  # alternation's L_n steps (+ J with an LTE module)
EXITS_ONLY = Phase("exits", detach_backbone=True, frozen=("backbone", "final"))  # two-stage's second stage


def num_stages(strategy: str) -> int:
    """How many separate trainings (fresh optimiser and schedule each) the strategy runs."""
    return 2 if strategy == "two-stage" else 1


def phase_for(strategy: str, *, stage: int = 0, epoch: int = 0, step: int = 0, lte: bool = False) -> Phase:
    """The objective in training `stage`, at 0-based `epoch` and optimisation `step` within that
    epoch, for a model with (`lte`) or without the LTE module."""
    odd = Phase("exits", frozen=("final",)) if lte else Phase("joint")
    if strategy == "raw":
        return PLAIN
    if strategy == "alternating":
        return FINAL if step % 2 == 0 else odd
    if strategy == "alternating-epoch":
        return FINAL if epoch % 2 == 0 else odd
    if strategy == "two-stage":
        return PLAIN if stage == 0 else EXITS_ONLY
    if strategy in ("joint", "weighted", "self-distill"):
        return Phase(strategy)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def layer_losses(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """L_i for every exit: `[L]`."""
    if regression:
        return ((logits[..., 0] - labels.float()) ** 2).mean(-1)
    flat = F.cross_entropy(logits.flatten(0, 1), labels.repeat(logits.shape[0]), reduction="none")
    return flat.view(logits.shape[0], -1).mean(-1)


def lte_targets(logits: torch.Tensor, labels: torch.Tensor, regression: bool, target: str = "label") -> torch.Tensor:
    """What the LTE module learns to predict for every exit and sample, `[L, B]` (no gradient):
    closeness to the label, or (`target="final"`) to the final layer's answer."""
    with torch.no_grad():
        answer = answers(logits, regression)
        reference = labels.float() if target == "label" else answer[-1]
        if regression:
            return 1.0 - torch.tanh((answer - reference).abs())
        return (answer == reference).float()


def lte_loss(out: AllExits, labels: torch.Tensor, regression: bool, lte: LteLoss = REFERENCE_LTE) -> torch.Tensor:
    """J: one MSE over every layer (the last included) and sample (targets detached, LTE input not)."""
    assert out.lte is not None
    return lte.weight * F.mse_loss(out.lte, lte_targets(out.logits, labels, regression, lte.target))


def distill_losses(logits: torch.Tensor, regression: bool) -> torch.Tensor:
    """KD_i of exits 1..n-1 against the detached final exit: `[L-1]`."""
    final = logits[-1].detach()
    if regression:
        return ((logits[:-1, :, 0] - final[:, 0]) ** 2).mean(-1)
    soft = final.softmax(-1)
    return -(soft * logits[:-1].log_softmax(-1)).sum(-1).mean(-1)


def task_loss(objective: str, out: AllExits, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """The objective's exit losses (without J)."""
    losses = layer_losses(out.logits, labels, regression)
    if objective == "final":
        return losses[-1]
    if objective == "exits":
        return losses[:-1].sum()
    if objective == "joint":
        return losses.sum()
    if objective == "weighted":
        weights = torch.arange(1, losses.shape[0] + 1, dtype=losses.dtype, device=losses.device)
        return (weights * losses).sum() / weights.sum()
    if objective == "self-distill":
        return losses.sum() + distill_losses(out.logits, regression).sum()
    raise ValueError(f"unknown objective {objective!r}")


def objective_loss(
    phase: Phase, out: AllExits, labels: torch.Tensor, regression: bool, lte: LteLoss = REFERENCE_LTE
) -> torch.Tensor:
    """The loss one training step minimises: the phase's exit losses, plus J where it trains the LTE."""
    loss = task_loss(phase.objective, out, labels, regression)
    if out.lte is not None and phase.trains_lte:
        loss = loss + lte_loss(out, labels, regression, lte)
    return loss


def cached_exits_loss(
    exits: AllExits, final: torch.Tensor, labels: torch.Tensor | None, regression: bool
) -> torch.Tensor:
    """Retrofit's objective (module docstring): `exits` holds exits 1..n-1 only; `final` is the fixed
    final exit's output `[B, C]`; `labels` None means distillation."""
    if labels is None:
        labels = answers(final, regression)
        loss = distill_losses(torch.cat([exits.logits, final[None]]), regression).sum()
    else:
        loss = layer_losses(exits.logits, labels, regression).sum()
    if exits.lte is not None:
        loss = loss + lte_loss(exits, labels, regression)
    return loss
