"""Each strategy trains the parameters it should, through the real Trainer subclass."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from exitserve.models.data import load_examples
from exitserve.models.encoding import encode
from exitserve.models.recipes import DEFAULT_STRATEGY
from exitserve.models.strategies import Phase, num_stages, objective_loss, phase_for
from exitserve.models.training import Collator, TextDataset, TrainOptions, fit, train
from tests.conftest import GLUE, TINY_LAYERS, make_model, torch_backend


def groups(model) -> dict[str, dict[str, torch.Tensor]]:
    """Parameter snapshots: backbone, early exits (1..n-1), final head, LTE."""
    out: dict[str, dict[str, torch.Tensor]] = {"backbone": {}, "exits": {}, "final": {}, "lte": {}}
    last = f"heads.{TINY_LAYERS - 1}."
    for name, p in model.named_parameters():
        if name.startswith("encoder.") and "pooler" not in name:
            key = "backbone"
        elif name.startswith(last):
            key = "final"
        elif name.startswith("heads."):
            key = "exits"
        elif name.startswith("lte."):
            key = "lte"
        else:
            continue
        out[key][name] = p.detach().clone()
    return out


def changed(before, after) -> dict[str, bool]:
    return {g: any(not torch.equal(before[g][n], after[g][n]) for n in before[g]) for g in before if before[g]}


class Snapshots(TrainerCallback):
    """Parameter snapshots at the start of every training (stage), after every epoch and after
    every optimisation step."""

    def __init__(self):
        self.starts, self.epochs, self.steps = [], [], []
        self.optimizer_states: list[int] = []  # Adam state entries at the start of each training

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.starts.append(groups(model))
        self.epochs.append(self.starts[-1])
        self.steps.append(self.starts[-1])
        self.optimizer_states.append(len(optimizer.state))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.epochs.append(groups(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(groups(model))


def run_strategy(tmp_path, tokenizer, strategy: str, epochs: int, use_lte: bool = False) -> Snapshots:
    """Train a tiny model on 48 SST-2 sentences, batch 16: 3 optimisation steps per epoch."""
    _, ex = load_examples(str(GLUE / "SST-2"), "train")
    ex = ex.subset(48, seed=0)
    model = make_model(use_lte=use_lte).train()
    snaps = Snapshots()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=epochs, learning_rate=1e-3,
        save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False, label_names=["labels"],
        disable_tqdm=True, max_grad_norm=1.0, weight_decay=0.01,
    )
    dataset = TextDataset(encode(tokenizer, ex.texts, max_length=32), ex.labels)
    fit(model, args, dataset, Collator(tokenizer.pad_token_id, regression=False), strategy, False, [snaps])
    return snaps


def per_step(snaps: Snapshots) -> list[dict[str, bool]]:
    return [changed(a, b) for a, b in pairwise(snaps.steps)]


EVEN = {"backbone": True, "exits": False, "final": True}  # L_n: backbone + final classifier
ODD = {"backbone": True, "exits": True, "final": True}  # the joint objective


def test_alternating_switches_objective_every_step_counted_within_the_epoch(tmp_path, tokenizer):
    snaps = run_strategy(tmp_path, tokenizer, "alternating", epochs=2)
    # 3 steps per epoch, counted from 0 in each epoch as the reference code does: even, odd, even
    assert per_step(snaps) == [EVEN, ODD, EVEN] * 2


def test_alternating_with_lte_trains_lte_every_step_and_the_final_classifier_on_even_steps(tmp_path, tokenizer):
    snaps = run_strategy(tmp_path, tokenizer, "alternating", epochs=1, use_lte=True)
    even = {"backbone": True, "exits": False, "final": True, "lte": True}  # L_n + J
    odd = {"backbone": True, "exits": True, "final": False, "lte": True}  # sum_{i<n} L_i + J (alternate-lte)
    assert per_step(snaps) == [even, odd, even]


def test_alternating_epoch_switches_objective_per_epoch(tmp_path, tokenizer):
    snaps = run_strategy(tmp_path, tokenizer, "alternating-epoch", epochs=3)
    epochs = [changed(a, b) for a, b in pairwise(snaps.epochs)]
    assert epochs == [EVEN, ODD, EVEN]
    assert per_step(snaps)[3:6] == [ODD] * 3  # every step of the second epoch


def test_two_stage_is_two_trainings_and_stage_two_leaves_backbone_and_final_byte_identical(tmp_path, tokenizer):
    snaps = run_strategy(tmp_path, tokenizer, "two-stage", epochs=2, use_lte=True)
    assert len(snaps.starts) == 2 and len(snaps.steps) == 2 + 2 * 6  # two runs of 2 epochs x 3 steps
    assert snaps.optimizer_states == [0, 0]  # stage 2 starts with a fresh optimiser (no Adam moments)
    stage1 = changed(snaps.starts[0], snaps.starts[1])
    stage2_end = snaps.steps[-1]
    assert stage1 == {"backbone": True, "exits": False, "final": True, "lte": False}
    assert changed(snaps.starts[1], stage2_end) == {"backbone": False, "exits": True, "final": False, "lte": True}
    for group in ("backbone", "final"):
        for name, before in snaps.starts[1][group].items():
            after = stage2_end[group][name]
            assert before.numpy().tobytes() == after.numpy().tobytes(), name


@pytest.mark.parametrize("strategy", ["joint", "weighted", "self-distill"])
def test_joint_strategies_train_every_head_every_step(tmp_path, tokenizer, strategy):
    assert per_step(run_strategy(tmp_path, tokenizer, strategy, epochs=1)) == [ODD] * 3


def test_raw_trains_no_exit(tmp_path, tokenizer):
    snaps = run_strategy(tmp_path, tokenizer, "raw", epochs=1, use_lte=True)
    assert changed(snaps.steps[0], snaps.steps[-1]) == {"backbone": True, "exits": False, "final": True, "lte": False}


def test_phase_schedule():
    assert [phase_for("alternating", step=s).objective for s in range(4)] == ["final", "joint"] * 2
    assert [phase_for("alternating", step=s, lte=True) for s in range(2)] == [
        Phase("final", frozen=("exits",)), Phase("exits", frozen=("final",))]
    assert [phase_for("alternating-epoch", epoch=e, step=1).objective for e in range(4)] == ["final", "joint"] * 2
    assert phase_for("two-stage", stage=0, epoch=1).frozen == ("exits", "lte")
    assert phase_for("two-stage", stage=1, epoch=0) == Phase("exits", True, ("backbone", "final"))
    assert [num_stages(s) for s in ("two-stage", "alternating", "raw")] == [2, 1, 1]


def test_lte_loss_is_one_mse_over_every_layer_including_the_last():
    from exitserve.models.answers import AllExits

    logits = torch.tensor([[[1.0], [3.0]], [[2.0], [2.5]]])  # [L=2, B=2, 1]
    labels = torch.tensor([2.0, 2.5])
    lte = torch.tensor([[0.5, 0.2], [0.9, 0.4]], requires_grad=True)
    loss = objective_loss(Phase("exits"), AllExits(logits, lte), labels, regression=True)
    # exit 1's MSE (exits 1..n-1) + J: the mean over all L x B of (u - (1 - tanh|y_hat - y|))^2
    mse = ((torch.tensor([1.0, 3.0]) - labels) ** 2).mean()
    targets = 1 - torch.tanh((logits[..., 0] - labels).abs())
    assert float(loss.detach()) == pytest.approx(float(mse + ((lte.detach() - targets) ** 2).mean()), rel=1e-6)
    loss.backward()
    assert lte.grad is not None and (lte.grad != 0).all()  # the final layer's LTE output is trained too
    no_lte = objective_loss(Phase("exits", frozen=("lte",)), AllExits(logits, lte), labels, regression=True)
    assert float(no_lte.detach()) == pytest.approx(float(mse))  # a phase that freezes the LTE adds no J


def test_train_end_to_end_writes_a_loadable_checkpoint_with_dev_scores(tmp_path, tiny_backbone):
    from exitserve.models.checkpoint import load_checkpoint

    out = train(TrainOptions(
        backbone=tiny_backbone, data=str(GLUE / "STS-B"), output=str(tmp_path / "m"), epochs=2,
        batch_size=16, max_train_samples=32, max_eval_samples=20, max_length=64,
    ))
    ckpt = load_checkpoint(out)
    cfg = ckpt.exit_config
    assert cfg.task == "stsb" and cfg.regression and cfg.use_lte and cfg.criterion == "lte"
    assert cfg.strategy == DEFAULT_STRATEGY and cfg.training["train_samples"] == 32
    assert [r["layer"] for r in cfg.dev_scores["per_layer"]] == [1, 2, 3, 4]
    assert cfg.dev_scores["samples"] == 20


def test_alternating_epoch_needs_two_epochs():
    with pytest.raises(ValueError, match="--epochs >= 2"):
        train(TrainOptions(strategy="alternating-epoch", epochs=1))


def test_lte_target_final_predicts_agreement_with_the_last_layer_and_the_weight_scales_j():
    from exitserve.models.answers import AllExits
    from exitserve.models.strategies import LteLoss, lte_loss, lte_targets

    logits = torch.tensor([[[1.0], [3.0]], [[2.0], [2.5]]])  # [L=2, B=2, 1]
    labels = torch.tensor([2.0, 0.0])
    agreement = lte_targets(logits, labels, regression=True, target="final")
    assert torch.allclose(agreement, torch.stack([1 - torch.tanh(torch.tensor([1.0, 0.5])), torch.ones(2)]))
    classes = torch.tensor([[[2.0, 1.0], [0.0, 1.0]], [[2.0, 1.0], [1.0, 0.0]]])  # exit 1: [0, 1]; final: [0, 0]
    assert lte_targets(classes, torch.tensor([1, 1]), False, "final").tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert lte_targets(classes, torch.tensor([1, 1]), False, "label").tolist() == [[0.0, 1.0], [0.0, 0.0]]
    out = AllExits(logits, torch.full((2, 2), 0.5))
    one, three = lte_loss(out, labels, True, LteLoss(1.0)), lte_loss(out, labels, True, LteLoss(3.0))
    assert float(three) == pytest.approx(3 * float(one))
    with pytest.raises(ValueError, match="unknown LTE target"):
        LteLoss(target="layer")


def test_a_regression_fine_tune_starts_at_the_mean_label(tmp_path, tiny_backbone):
    """Experiment 3's collapse (docs/RESULTS.md): regressors that start at 0 on STS-B's 0-5 scale cannot
    move their bias to the mean (~2.7) at lr 5e-5, so training bends the backbone to output the constant
    and every layer's Spearman fell (0.546 at the final layer). With no learning at all (lr 0), every exit
    must already answer the mean training label: the loss starts at the labels' variance."""
    from exitserve.models.checkpoint import load_checkpoint
    from exitserve.models.data import ColumnOptions
    from exitserve.models.inference import record_all_layers

    out = train(TrainOptions(
        backbone=tiny_backbone, data=str(GLUE / "STS-B"), output=str(tmp_path / "m"), epochs=1, learning_rate=0.0,
        batch_size=16, max_train_samples=32, max_eval_samples=20, max_length=64,
    ))
    ckpt = load_checkpoint(out)
    _, rows = load_examples(str(GLUE / "STS-B"), "train", ColumnOptions())
    mean = sum(rows.subset(32, 42).labels) / 32  # the rows `train` drew (its seed)
    assert mean > 1.0  # far from 0, where an untouched regressor would answer
    dev = rows.subset(20, 0)
    recorded = record_all_layers(torch_backend(ckpt.model), encode(ckpt.tokenizer, dev.texts, dev.pairs, 64))
    answers_per_layer = recorded.logits[..., 0]
    assert answers_per_layer.mean(axis=1).tolist() == pytest.approx([mean] * answers_per_layer.shape[0], abs=0.2)
