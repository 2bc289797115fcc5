"""Each strategy trains the parameters it should, through the real Trainer subclass."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from exitserve.models.data import load_examples
from exitserve.models.encoding import encode
from exitserve.models.strategies import Phase, objective_loss, phase_for
from exitserve.models.training import Collator, EarlyExitTrainer, TextDataset, TrainOptions, train
from tests.conftest import GLUE, TINY_LAYERS, make_model


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


class EpochSnapshots(TrainerCallback):
    def __init__(self):
        self.snapshots = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.snapshots.append(groups(model))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.snapshots.append(groups(model))


def run_strategy(tmp_path, tokenizer, strategy: str, epochs: int, use_lte: bool = False):
    _, ex = load_examples(str(GLUE / "SST-2"), "train")
    ex = ex.subset(48, seed=0)
    model = make_model(use_lte=use_lte).train()
    snaps = EpochSnapshots()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=epochs, learning_rate=1e-3,
        save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False, label_names=["labels"],
        disable_tqdm=True, max_grad_norm=1.0, weight_decay=0.01,
    )
    trainer = EarlyExitTrainer(
        model=model, args=args, train_dataset=TextDataset(encode(tokenizer, ex.texts, max_length=32), ex.labels),
        data_collator=Collator(tokenizer.pad_token_id, regression=False), callbacks=[snaps],
        strategy=strategy, regression=False,
    )
    trainer.train()
    return snaps.snapshots


def test_two_stage_second_stage_leaves_backbone_and_final_head_unchanged(tmp_path, tokenizer):
    s = run_strategy(tmp_path, tokenizer, "two-stage", epochs=2, use_lte=True)
    stage1, stage2 = changed(s[0], s[1]), changed(s[1], s[2])
    assert stage1 == {"backbone": True, "exits": False, "final": True, "lte": False}
    assert stage2 == {"backbone": False, "exits": True, "final": False, "lte": True}


def test_alternating_switches_objective_per_epoch(tmp_path, tokenizer):
    s = run_strategy(tmp_path, tokenizer, "alternating", epochs=3)
    # odd epochs (1st, 3rd): final loss only; even epochs (2nd): the joint objective
    assert changed(s[0], s[1]) == {"backbone": True, "exits": False, "final": True}
    assert changed(s[1], s[2]) == {"backbone": True, "exits": True, "final": True}
    assert changed(s[2], s[3]) == {"backbone": True, "exits": False, "final": True}


@pytest.mark.parametrize("strategy", ["joint", "weighted", "self-distill", "alternating-step"])
def test_all_exit_strategies_train_every_head(tmp_path, tokenizer, strategy):
    s = run_strategy(tmp_path, tokenizer, strategy, epochs=1)
    assert changed(s[0], s[1]) == {"backbone": True, "exits": True, "final": True}


def test_raw_trains_no_exit(tmp_path, tokenizer):
    s = run_strategy(tmp_path, tokenizer, "raw", epochs=1)
    assert changed(s[0], s[1]) == {"backbone": True, "exits": False, "final": True}


def test_phase_schedule():
    assert [phase_for("alternating", e, 4, 0).objective for e in range(4)] == ["final", "joint"] * 2
    assert [phase_for("alternating-step", 0, 1, s).objective for s in range(4)] == ["final", "joint"] * 2
    assert phase_for("two-stage", 1, 3, 0).objective == "final"
    assert phase_for("two-stage", 2, 3, 0) == Phase("exits", True, ("backbone", "final"))


def test_lte_regression_target_is_one_minus_tanh_of_the_error():
    from exitserve.models.early_exit import AllExits

    logits = torch.tensor([[[1.0], [3.0]], [[2.0], [2.5]]])  # [L=2, B=2, 1]
    labels = torch.tensor([2.0, 2.5])
    lte = torch.full((2, 2), 0.5, requires_grad=True)
    loss = objective_loss(Phase("exits"), AllExits(logits, lte), labels, regression=True)
    # exit 1 only (exits 1..n-1): MSE + (0.5 - (1 - tanh|e|))^2
    mse = ((torch.tensor([1.0, 3.0]) - labels) ** 2).mean()
    targets = 1 - torch.tanh(torch.tensor([1.0, 0.5]))
    assert float(loss.detach()) == pytest.approx(float(mse + ((0.5 - targets) ** 2).mean()), rel=1e-6)
    loss.backward()
    assert lte.grad is not None and lte.grad[1].abs().sum() == 0  # final layer's J not in the loss


def test_train_end_to_end_writes_a_loadable_checkpoint_with_dev_scores(tmp_path, tiny_backbone):
    from exitserve.models.checkpoint import load_checkpoint

    out = train(TrainOptions(
        backbone=tiny_backbone, data=str(GLUE / "STS-B"), output=str(tmp_path / "m"), epochs=2,
        batch_size=16, max_train_samples=32, max_eval_samples=20, max_length=64,
    ))
    ckpt = load_checkpoint(out)
    cfg = ckpt.exit_config
    assert cfg.task == "stsb" and cfg.regression and cfg.use_lte and cfg.criterion == "lte"
    assert cfg.strategy == "alternating" and cfg.training["train_samples"] == 32
    assert [r["layer"] for r in cfg.dev_scores["per_layer"]] == [1, 2, 3, 4]
    assert cfg.dev_scores["samples"] == 20


def test_alternating_needs_two_epochs():
    with pytest.raises(ValueError, match="--epochs >= 2"):
        train(TrainOptions(epochs=1))
