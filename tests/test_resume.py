"""Exact resume: a run stopped and resumed from its checkpoint mixes exactly like an uninterrupted one.

Two epochs of six steps with ``p=0.5`` (so whether a batch is mixed is part of what must match).
The run is stopped after epoch 1 (``max_epochs=1``) or in the middle of epoch 1 (a
``ModelCheckpoint(every_n_train_steps=4)`` and ``max_steps=4``), then resumed with
``trainer.fit(..., ckpt_path=...)`` by a *fresh* callback built with ``seed=None`` under another
global seed, so the mixing can only match if the seed comes back from the checkpoint.

Every step is keyed by ``(epoch, batch_idx)``: the mixing decision, the pairing, ``lam``, the mask
and the batch ``training_step`` saw (images and soft targets) must be bit-identical. Lightning
restarts a plain DataLoader on a mid-epoch resume (batch 4 of the resumed run reads the loader's
first batch), so the mid-epoch runs use a dataset in which every batch holds the same samples:
the data at each batch index is then the same whatever the restart, and Attentive CutMix's masks,
which depend on the images, compare too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trainers import quiet_trainer

from lightning_acm.attention import AttentionModel, Teacher
from lightning_acm.callbacks import AttentiveCutMix, CutMix, MixingCallback, MixUp, RandomMixing
from lightning_acm.loss import SoftTargetLossMixin

# The stopped and the resumed run share their checkpoint folder, as a real resume does.
pytestmark = pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")

NUM_CLASSES, SIZE, BATCH, STEPS_PER_EPOCH, EPOCHS, SEED = 4, 28, 8, 6, 2, 2024
Key = tuple[int, int]


class Net(SoftTargetLossMixin, L.LightningModule):
    """Tiny classifier that records, per (epoch, batch_idx), the batch training_step received."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, NUM_CLASSES))
        self.seen: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen[(self.current_epoch, batch_idx)] = (batch[0].detach().clone(), batch[1].detach().clone())
        return self.soft_target_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordMix(L.Callback):
    """Reads the mixing callback's ``last_mix`` right after it handled the batch (it comes first in the list)."""

    def __init__(self, mixing: MixingCallback) -> None:
        self.mixing = mixing
        self.rows: dict[Key, Optional[tuple[torch.Tensor, ...]]] = {}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        mix = self.mixing.last_mix
        row = None if mix is None else (mix.permutation, mix.lam, mix.mask if mix.mask is not None else torch.empty(0))
        self.rows[(trainer.current_epoch, batch_idx)] = row


def teacher() -> nn.Module:
    conv = nn.Conv2d(3, 2, kernel_size=4, stride=4, bias=False)
    nn.init.constant_(conv.weight, 1.0 / 48)
    return AttentionModel(nn.Sequential(conv, nn.ReLU()), "1", input_size=SIZE, grid_size=7)


MAKERS: dict[str, Callable[[Optional[int]], MixingCallback]] = {
    "attentive_cutmix": lambda seed: AttentiveCutMix(teacher=Teacher(module=teacher()), top_k=6, p=0.5, seed=seed),
    "cutmix": lambda seed: CutMix(alpha=1.0, p=0.5, seed=seed),
    "mixup": lambda seed: MixUp(alpha=0.4, p=0.5, seed=seed),
    "random_cells": lambda seed: AttentiveCutMix(teacher="random", top_k=6, p=0.5, seed=seed),
    "random_mixing": lambda seed: RandomMixing(
        [CutMix(alpha=1.0), AttentiveCutMix(teacher=Teacher(module=teacher()), top_k=6)], p=0.5, seed=seed
    ),
}


def distinct_data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(BATCH * STEPS_PER_EPOCH, 3, SIZE, SIZE, generator=g)
    return DataLoader(TensorDataset(images, torch.arange(len(images)) % NUM_CLASSES), batch_size=BATCH, shuffle=False)


def periodic_data() -> DataLoader:
    """Every batch holds the same samples in the same order (but their heatmaps differ)."""
    g = torch.Generator().manual_seed(1)
    base = torch.rand(BATCH, 3, SIZE, SIZE, generator=g)
    images = base.repeat(STEPS_PER_EPOCH, 1, 1, 1)
    return DataLoader(TensorDataset(images, torch.arange(len(images)) % NUM_CLASSES), batch_size=BATCH, shuffle=False)


def fit(
    mixing: MixingCallback,
    data: DataLoader,
    root: Path,
    *,
    max_epochs: int = EPOCHS,
    max_steps: int = -1,
    ckpt_path: Optional[str] = None,
    every_n_train_steps: Optional[int] = None,
) -> tuple[L.Trainer, Net, RecordMix]:
    record = RecordMix(mixing)
    callbacks: list[L.Callback] = [mixing, record]
    if every_n_train_steps is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=root / "steps", every_n_train_steps=every_n_train_steps, save_top_k=-1)
        )
    trainer = quiet_trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        callbacks=callbacks,
        default_root_dir=root,
        enable_checkpointing=True,
        num_sanity_val_steps=0,
    )
    model = Net()
    trainer.fit(model, train_dataloaders=data, ckpt_path=ckpt_path)
    return trainer, model, record


def resumed_callback(method: str) -> MixingCallback:
    torch.manual_seed(999)  # another global seed: only the checkpoint can give back the seed
    return MAKERS[method](None)


def assert_identical(full: tuple[Net, RecordMix], parts: list[tuple[Net, RecordMix]]) -> int:
    """Compare the uninterrupted run with the stopped + resumed runs, step by step; return the steps compared."""
    full_model, full_record = full
    seen: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
    rows: dict[Key, Any] = {}
    for model, record in parts:
        assert not set(seen) & set(model.seen), "a step ran twice"
        seen.update(model.seen)
        rows.update(record.rows)
    assert sorted(seen) == sorted(full_model.seen) == [(e, b) for e in range(EPOCHS) for b in range(STEPS_PER_EPOCH)]
    for key in sorted(full_model.seen):
        expected, got = full_record.rows[key], rows[key]
        assert (expected is None) == (got is None), f"mixing decision differs at (epoch, batch_idx)={key}"
        if expected is not None:
            for name, a, b in zip(("permutation", "lam", "mask"), expected, got, strict=True):
                assert torch.equal(a, b), f"{name} differs at (epoch, batch_idx)={key}"
        for name, a, b in zip(("images", "targets"), full_model.seen[key], seen[key], strict=True):
            assert torch.equal(a, b), f"{name} seen by training_step differ at (epoch, batch_idx)={key}"
    decisions = [full_record.rows[key] is not None for key in sorted(full_record.rows)]
    assert any(decisions) and not all(decisions), "p=0.5 should both mix and skip some of the 12 batches"
    return len(full_model.seen)


@pytest.mark.parametrize("method", sorted(MAKERS))
def test_resume_after_an_epoch_is_exact(method, tmp_path):
    full_cb = MAKERS[method](SEED)
    _, full_model, full_record = fit(full_cb, distinct_data(), tmp_path / "full")

    first_cb = MAKERS[method](SEED)
    first_trainer, first_model, first_record = fit(first_cb, distinct_data(), tmp_path / "stopped", max_epochs=1)
    checkpoint = first_trainer.checkpoint_callback.best_model_path
    assert checkpoint.endswith("epoch=0-step=6.ckpt")

    second_cb = resumed_callback(method)
    _, second_model, second_record = fit(second_cb, distinct_data(), tmp_path / "stopped", ckpt_path=checkpoint)

    assert (
        assert_identical((full_model, full_record), [(first_model, first_record), (second_model, second_record)]) == 12
    )
    assert second_cb.state_dict() == full_cb.state_dict()
    assert second_cb.state_dict()["seed"] == SEED


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.parametrize("method", sorted(MAKERS))
def test_resume_mid_epoch_is_exact(method, tmp_path):
    full_cb = MAKERS[method](SEED)
    _, full_model, full_record = fit(full_cb, periodic_data(), tmp_path / "full")

    first_cb = MAKERS[method](SEED)
    _, first_model, first_record = fit(
        first_cb, periodic_data(), tmp_path / "stopped", max_steps=4, every_n_train_steps=4
    )
    checkpoint = tmp_path / "stopped" / "steps" / "epoch=0-step=4.ckpt"
    assert checkpoint.is_file() and sorted(first_model.seen) == [(0, b) for b in range(4)]

    second_cb = resumed_callback(method)
    _, second_model, second_record = fit(
        second_cb, periodic_data(), tmp_path / "stopped", ckpt_path=str(checkpoint), every_n_train_steps=4
    )
    assert sorted(second_model.seen)[0] == (0, 4)  # resumed inside epoch 0

    assert (
        assert_identical((full_model, full_record), [(first_model, first_record), (second_model, second_record)]) == 12
    )
    assert second_cb.state_dict() == full_cb.state_dict()


def test_resume_without_the_callback_state_would_not_match(tmp_path):
    """The control: a fresh callback that does not get the checkpoint's seed mixes differently."""
    full_cb = CutMix(alpha=1.0, p=0.5, seed=SEED)
    _, full_model, full_record = fit(full_cb, distinct_data(), tmp_path / "full")
    other = resumed_callback("cutmix")
    _, other_model, other_record = fit(other, distinct_data(), tmp_path / "other")
    assert other.state_dict()["seed"] != SEED
    with pytest.raises(AssertionError, match="differ"):
        assert_identical((full_model, full_record), [(other_model, other_record)])


def fit_pair(root: Path, *, max_epochs: int, ckpt_path: Optional[str] = None) -> tuple[list[MixingCallback], Net]:
    """Two CutMix callbacks of other ``alpha`` on one Trainer, seeded from the global seed."""
    callbacks: list[MixingCallback] = [CutMix(alpha=1.0, p=0.5), CutMix(alpha=0.2, p=0.5)]
    trainer = quiet_trainer(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        default_root_dir=root,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
    )
    model = Net()
    trainer.fit(model, train_dataloaders=distinct_data(), ckpt_path=ckpt_path)
    return callbacks, model


def test_two_callbacks_of_one_class_share_a_trainer_and_resume_each(tmp_path):
    L.seed_everything(SEED)
    full, full_model = fit_pair(tmp_path / "full", max_epochs=EPOCHS)
    L.seed_everything(SEED)
    _, first_model = fit_pair(tmp_path / "stopped", max_epochs=1)
    checkpoint = tmp_path / "stopped" / "checkpoints" / "epoch=0-step=6.ckpt"
    L.seed_everything(SEED + 1)  # another global seed: only the checkpoint gives the seeds back
    second, second_model = fit_pair(tmp_path / "stopped", max_epochs=EPOCHS, ckpt_path=str(checkpoint))
    for a, b in zip(full, second, strict=True):
        assert a.state_dict() == b.state_dict()
    assert full[0].state_key != full[1].state_key
    for key in full_model.seen:
        got = first_model.seen.get(key) or second_model.seen[key]
        assert all(torch.equal(x, y) for x, y in zip(full_model.seen[key], got, strict=True)), key


def test_a_reused_callback_with_seed_none_restores_the_seed_on_resume(tmp_path):
    callback = CutMix(alpha=1.0, p=0.5)
    L.seed_everything(0)
    trainer, _, _ = fit(callback, distinct_data(), tmp_path, max_epochs=1)
    saved = callback.state_dict()["seed"]
    L.seed_everything(1)
    fit(callback, distinct_data(), tmp_path, ckpt_path=trainer.checkpoint_callback.best_model_path)
    assert callback.state_dict()["seed"] == saved
    fit(callback, distinct_data(), tmp_path / "fresh", max_epochs=1)  # a new fit under seed 1 takes seed 1's
    assert callback.state_dict()["seed"] != saved
