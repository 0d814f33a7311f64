"""Mixed and half precision: bf16/fp16 images through the functional ops, the callbacks and real Trainers.

What must hold whatever the precision: the mixed images keep the batch's dtype and are exactly the
paste of the partner inside the mask (Mixup: the blend, to the dtype's resolution); ``lam`` and the
soft targets are float32, finite, and the soft targets sum to 1; the attention model returns
float32 heatmaps, also when it runs under its own autocast (``attention_precision``).

Lightning facts these tests rely on (2.6): its autocast wraps only ``training_step``, so the
callbacks see float32 images under ``"bf16-mixed"``; under ``"bf16-true"``/``"16-true"`` the batch is
cast to the half dtype *before* ``on_train_batch_start``, so the callbacks paste half-precision
images; ``"16-mixed"`` on CPU is replaced by ``"bf16-mixed"`` with a warning (fp16 autocast in a
Trainer is tested on CUDA only, marked ``gpu``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trainers import quiet_trainer

from lightning_acm import functional as AF
from lightning_acm.attention import AttentionModel, Teacher
from lightning_acm.callbacks import AttentiveCutMix, CutMix, MixingCallback, MixUp

NUM_CLASSES, SIZE, BATCH = 4, 28, 8
HALF = [torch.bfloat16, torch.float16]
HALF_IDS = ["bf16", "fp16"]


class Net(L.LightningModule):
    """Tiny classifier that records the batch training_step receives, its logits' dtype and the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, NUM_CLASSES))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.logit_dtypes: list[torch.dtype] = []
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        from lightning_acm.loss import soft_target_cross_entropy

        images, targets = batch
        self.seen.append((images.detach().clone(), targets.detach().clone()))
        logits = self.net(images.to(self.net[1].weight.dtype))
        self.logit_dtypes.append(logits.dtype)
        loss = soft_target_cross_entropy(logits, targets)
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def teacher(conv_dtypes: Optional[list[torch.dtype]] = None) -> nn.Module:
    conv = nn.Conv2d(3, 2, kernel_size=4, stride=4, bias=False)
    nn.init.constant_(conv.weight, 1.0 / 48)
    if conv_dtypes is not None:
        conv.register_forward_hook(lambda _m, _i, out: conv_dtypes.append(out.dtype))
    return AttentionModel(nn.Sequential(conv, nn.ReLU()), "1", input_size=SIZE, grid_size=7)


MAKERS: dict[str, Callable[..., MixingCallback]] = {
    "attentive_cutmix": lambda **kw: AttentiveCutMix(teacher=Teacher(module=teacher()), top_k=6, seed=0, **kw),
    "cutmix": lambda **kw: CutMix(seed=0, **kw),
    "mixup": lambda **kw: MixUp(alpha=0.4, seed=0, **kw),
    "random_cells": lambda **kw: AttentiveCutMix(teacher="random", top_k=6, seed=0, **kw),
}


def images_and_labels(dtype: torch.dtype = torch.float32, n: int = 2 * BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, SIZE, SIZE, generator=g).to(dtype), torch.arange(n) % NUM_CLASSES


def fit(callback: MixingCallback, precision: str = "32-true", dtype: torch.dtype = torch.float32) -> tuple[Net, list]:
    images, labels = images_and_labels(dtype)
    data = DataLoader(TensorDataset(images, labels), batch_size=BATCH, shuffle=False)
    mixes: list[Any] = []

    class Keep(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
            mixes.append(callback.last_mix)

    trainer = quiet_trainer(precision=precision, callbacks=[callback, Keep()])
    model = Net()
    trainer.fit(model, train_dataloaders=data)
    return model, mixes


def check_mix(images: torch.Tensor, mix: Any, seen: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The shared invariants of one mixed batch whose unmixed images were ``images``."""
    seen_images, seen_targets = seen
    assert mix is not None
    assert seen_images.dtype == images.dtype == mix.mixed.dtype
    assert torch.equal(seen_images, mix.mixed)
    assert seen_targets.dtype == mix.soft_targets.dtype == mix.lam.dtype == torch.float32
    assert torch.isfinite(mix.soft_targets).all() and torch.isfinite(mix.lam).all()
    assert not torch.isnan(seen_images.float()).any()
    torch.testing.assert_close(mix.soft_targets.sum(1), torch.ones(BATCH, device=mix.soft_targets.device))
    partner = images[mix.permutation]
    if mix.mask is not None:
        assert torch.equal(mix.mixed, torch.where(mix.mask, partner, images))
        torch.testing.assert_close(mix.lam, mix.mask.flatten(1).float().mean(1))
    else:
        lam = mix.lam.view(-1, 1, 1, 1)
        expected = lam * partner.float() + (1 - lam) * images.float()
        tol = {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(images.dtype, 1e-6)
        torch.testing.assert_close(mix.mixed.float(), expected, atol=tol, rtol=0)
    if mix.partner_heatmaps is not None:
        assert mix.partner_heatmaps.dtype == torch.float32
        assert torch.equal(mix.mask, AF.topk_cell_mask(mix.partner_heatmaps, 6, SIZE))


# --------------------------------------------------------------------------- functional ops


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("op", ["attentive_cutmix", "cutmix", "mixup"])
def test_functional_ops_paste_half_images(op, dtype):
    images, labels = images_and_labels(dtype, BATCH)
    g = torch.Generator().manual_seed(0)
    permutation = AF.pairing_permutation(BATCH, generator=np.random.default_rng(0))
    if op == "attentive_cutmix":
        heatmaps = torch.rand(BATCH, 7, 7, generator=g).to(dtype)  # half heatmaps are fine too
        mixed, soft, lam = AF.attentive_cutmix(
            images, labels, heatmaps, num_classes=NUM_CLASSES, permutation=permutation
        )
        mask = AF.topk_cell_mask(heatmaps[permutation], 6, SIZE)
    elif op == "cutmix":
        mixed, soft, lam = AF.cutmix(
            images, labels, num_classes=NUM_CLASSES, permutation=permutation, generator=np.random.default_rng(1)
        )
        mask = (mixed != images).any(1, keepdim=True)  # partner pixels; images are distinct almost surely
    else:
        mixed, soft, lam = AF.mixup(
            images, labels, num_classes=NUM_CLASSES, permutation=permutation, generator=np.random.default_rng(1)
        )
        mask = None
    assert mixed.dtype == dtype and soft.dtype == lam.dtype == torch.float32
    assert torch.isfinite(soft).all() and torch.isfinite(mixed.float()).all()
    torch.testing.assert_close(soft.sum(1), torch.ones(BATCH))
    if mask is not None:
        assert torch.equal(mixed, torch.where(mask, images[permutation], images))
        torch.testing.assert_close(lam, mask.flatten(1).float().mean(1))
    one_hot = torch.nn.functional.one_hot(labels, NUM_CLASSES).float()
    torch.testing.assert_close(soft, lam[:, None] * one_hot[permutation] + (1 - lam[:, None]) * one_hot)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("method", ["cutmix", "mixup"])
def test_callback_mix_called_directly_with_half_images(method, dtype):
    images, labels = images_and_labels(dtype, BATCH)
    callback = MAKERS[method]()
    mix = callback.mix(images, labels, NUM_CLASSES, [images, labels])
    check_mix(images, mix, (mix.mixed, mix.soft_targets))


# --------------------------------------------------------------------------- half batches in a float32 Trainer


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("method", sorted(MAKERS))
def test_half_precision_batches_through_every_callback(method, dtype):
    model, mixes = fit(MAKERS[method](), "32-true", dtype)
    images, _ = images_and_labels(dtype)
    assert len(mixes) == len(model.seen) == 2
    for step, (mix, seen) in enumerate(zip(mixes, model.seen, strict=True)):
        check_mix(images[step * BATCH : (step + 1) * BATCH], mix, seen)


# --------------------------------------------------------------------------- Trainer precisions


@pytest.mark.parametrize(
    ("precision", "image_dtype", "logit_dtype"),
    [
        ("bf16-mixed", torch.float32, torch.bfloat16),
        ("bf16-true", torch.bfloat16, torch.bfloat16),
        ("16-true", torch.float16, torch.float16),
    ],
)
@pytest.mark.parametrize("method", sorted(MAKERS))
def test_trainer_precision(method, precision, image_dtype, logit_dtype):
    model, mixes = fit(MAKERS[method](), precision)
    images, _ = images_and_labels(image_dtype)  # what "-true" precisions cast the batch to
    assert model.logit_dtypes == [logit_dtype] * 2
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in model.losses)
    for step, (mix, seen) in enumerate(zip(mixes, model.seen, strict=True)):
        check_mix(images[step * BATCH : (step + 1) * BATCH], mix, seen)


def test_16_mixed_on_cpu_falls_back_to_bf16_mixed():
    with pytest.warns(UserWarning, match=r"AMP with fp16 is not supported on CPU. Using `precision='bf16-mixed'`"):
        trainer = L.Trainer(accelerator="cpu", precision="16-mixed", logger=False)
    assert trainer.precision == "bf16-mixed"


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device; on CPU Lightning maps 16-mixed to bf16-mixed (tested above)",
)
@pytest.mark.parametrize(("precision", "amp"), [("16-mixed", "fp16"), ("bf16-mixed", "bf16")])
@pytest.mark.parametrize("method", sorted(MAKERS))
def test_mixed_precision_on_cuda(method, precision, amp):
    images, labels = images_and_labels()
    data = DataLoader(TensorDataset(images, labels), batch_size=BATCH, shuffle=False)
    if method == "attentive_cutmix":  # the teacher under its own autocast too
        callback = AttentiveCutMix(teacher=Teacher(module=teacher(), precision=amp), top_k=6, seed=0)
    else:
        callback = MAKERS[method]()
    model = Net()
    trainer = quiet_trainer(accelerator="cuda", devices=1, precision=precision, callbacks=[callback])
    trainer.fit(model, train_dataloaders=data)
    assert model.logit_dtypes == [{"fp16": torch.float16, "bf16": torch.bfloat16}[amp]] * 2
    mix = callback.last_mix
    assert mix.mixed.is_cuda and mix.soft_targets.is_cuda
    if method == "attentive_cutmix":
        assert next(callback.attention_model.parameters()).is_cuda  # built on the training device
    check_mix(images[BATCH:].cuda(), mix, model.seen[-1])


# --------------------------------------------------------------------------- the teacher under its own autocast


def plain_teacher(conv_dtypes: list[torch.dtype]) -> dict[str, Any]:
    """A plain module: the Teacher wraps it, passing ``precision`` on."""
    model = teacher(conv_dtypes)
    return {"module": model.backbone, "layer": "1", "input_size": SIZE, "input_mean": (0.0,), "input_std": (1.0,)}


@pytest.mark.parametrize("given", ["AttentionModel", "plain_module"])
@pytest.mark.parametrize("trainer_precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("attention_precision", ["bf16", "fp16"])
def test_teacher_runs_under_its_own_autocast(attention_precision, trainer_precision, given):
    conv_dtypes: list[torch.dtype] = []
    source = {"module": teacher(conv_dtypes)} if given == "AttentionModel" else plain_teacher(conv_dtypes)
    callback = AttentiveCutMix(teacher=Teacher(precision=attention_precision, **source), top_k=6, seed=0)
    model, mixes = fit(callback, trainer_precision)
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}[attention_precision]
    assert conv_dtypes == [expected] * 2  # the backbone really ran in half precision
    images, _ = images_and_labels()
    reference = teacher()  # the same teacher in float32
    for step, (mix, seen) in enumerate(zip(mixes, model.seen, strict=True)):
        batch = images[step * BATCH : (step + 1) * BATCH]
        check_mix(batch, mix, seen)
        torch.testing.assert_close(mix.partner_heatmaps, reference(batch)[mix.permutation], atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(mix.lam, torch.full((BATCH,), 6 / 49))


# --------------------------------------------------------------------------- the teacher in channels_last


@pytest.mark.parametrize("given", ["AttentionModel", "plain_module"])
def test_teacher_runs_in_channels_last_and_gives_the_same_heatmaps(given):
    input_formats: list[bool] = []
    source = {"module": teacher()} if given == "AttentionModel" else plain_teacher([])
    conv = source["module"].backbone[0] if given == "AttentionModel" else source["module"][0]
    conv.register_forward_pre_hook(
        lambda _m, args: input_formats.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    callback = AttentiveCutMix(teacher=Teacher(channels_last=True, **source), top_k=6, seed=0)
    model, mixes = fit(callback)
    assert callback.attention_model.channels_last
    copied = callback.attention_model.backbone[0]  # the callback runs a frozen copy of the given module
    assert copied.weight.is_contiguous(memory_format=torch.channels_last)
    assert input_formats == [True] * 2  # both batches reached the backbone in channels_last
    images, _ = images_and_labels()
    reference = teacher()  # the same teacher, default memory format
    for step, (mix, seen) in enumerate(zip(mixes, model.seen, strict=True)):
        batch = images[step * BATCH : (step + 1) * BATCH]
        check_mix(batch, mix, seen)
        torch.testing.assert_close(mix.partner_heatmaps, reference(batch)[mix.permutation])
