"""The callbacks on a CUDA device; skipped where there is none (CI has none).

Run on a GPU machine with ``python -m pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trainers import quiet_trainer

from lightning_acm import functional as AF
from lightning_acm.attention import AttentionModel, Teacher
from lightning_acm.callbacks import AttentiveCutMix, CutMix, MixingCallback, MixUp, RandomMixing
from lightning_acm.functional import attentive_cutmix, cutmix, mixup
from lightning_acm.loss import SoftTargetLossMixin

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NUM_CLASSES = 4
SIZE = 28


class DeviceRecorder(SoftTargetLossMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES)
        )
        self.devices_seen: list[torch.device] = []
        self.dtypes_seen: list[torch.dtype] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch[0], batch[1]
        self.devices_seen.append(images.device)
        self.dtypes_seen.append(targets.dtype)
        loss = self.soft_target_loss(self(images), targets)
        assert torch.isfinite(loss)
        return loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def tiny_attention() -> nn.Module:
    teacher = nn.Sequential(nn.Conv2d(3, 4, kernel_size=4, stride=4), nn.ReLU())
    return AttentionModel(teacher, "1", input_size=SIZE, grid_size=7)


def make_callbacks() -> list[MixingCallback]:
    return [
        AttentiveCutMix(teacher=Teacher(module=tiny_attention()), num_classes=NUM_CLASSES, seed=0),
        AttentiveCutMix(teacher=Teacher(module=tiny_attention(), precision="bf16"), num_classes=NUM_CLASSES, seed=0),
        CutMix(seed=0),
        MixUp(seed=0),
        AttentiveCutMix(teacher="random", num_classes=NUM_CLASSES, seed=0),
        RandomMixing([CutMix(), MixUp(), AttentiveCutMix(teacher=Teacher(module=tiny_attention()))], seed=0),
    ]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize(
    "index", range(6), ids=["acm", "acm-bf16-teacher", "cutmix", "mixup", "random-cells", "random-mixing"]
)
def test_callbacks_mix_on_the_gpu(precision: str, index: int) -> None:
    callback = make_callbacks()[index]
    data = DataLoader(TensorDataset(torch.rand(32, 3, SIZE, SIZE), torch.arange(32) % NUM_CLASSES), batch_size=8)
    model = DeviceRecorder()
    trainer = quiet_trainer(accelerator="gpu", devices=1, precision=precision, callbacks=[callback])
    trainer.fit(model, train_dataloaders=data)
    mix = callback.last_mix
    assert mix is not None
    assert mix.mixed.device.type == "cuda" and mix.soft_targets.device.type == "cuda"
    assert mix.soft_targets.dtype == torch.float32
    torch.testing.assert_close(mix.soft_targets.sum(1), torch.ones(8, device="cuda"))
    assert all(d.type == "cuda" for d in model.devices_seen)
    if isinstance(callback, AttentiveCutMix) and not callback.teacher.is_random:
        teacher = callback.attention_model
        assert next(teacher.parameters()).device.type == "cuda"
        torch.testing.assert_close(mix.lam, torch.full((8,), 6 / 49, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_functional_ops_keep_device_and_dtype(dtype: torch.dtype) -> None:
    images = torch.rand(16, 3, 32, 32, device="cuda", dtype=dtype)
    labels = torch.arange(16, device="cuda") % 10
    heatmaps = torch.rand(16, 7, 7, device="cuda")
    g = np.random.default_rng(0)
    for mixed, soft, lam in (
        attentive_cutmix(images, labels, heatmaps, num_classes=10, generator=g),
        cutmix(images, labels, num_classes=10, generator=g),
        mixup(images, labels, num_classes=10, generator=g),
    ):
        assert mixed.dtype == dtype and mixed.device.type == "cuda"
        assert soft.dtype == torch.float32 and not torch.isnan(soft).any()
        assert lam.device.type == "cuda"


@pytest.mark.parametrize("size", [32, 224])  # cells of 4 and 5 px (bitwise select), of 32 px (run copy)
def test_same_seed_gives_the_same_mix_on_cpu_and_gpu(size: int) -> None:
    images = torch.rand(8, 3, size, size)
    labels = torch.arange(8)
    heatmaps = torch.rand(8, 7, 7)
    heatmaps[0, 0, :2] = 2.0  # a tie at the top: the first cell in row-major order wins on both devices
    for name, op, args in (
        ("attentive_cutmix", attentive_cutmix, (heatmaps,)),
        ("cutmix", cutmix, ()),
        ("mixup", mixup, ()),
    ):
        cpu = op(images, labels, *args, num_classes=8, generator=np.random.default_rng(3))
        gpu = op(
            images.cuda(),
            labels.cuda(),
            *(a.cuda() for a in args),
            num_classes=8,
            generator=np.random.default_rng(3),
        )
        for a, b in zip(cpu, gpu, strict=True):
            if name == "mixup":
                torch.testing.assert_close(a, b.cpu())  # a blend: rounding may differ between devices
            else:
                assert torch.equal(a, b.cpu()), name  # pasting and the targets are exact


def test_pasted_area_share_is_the_same_on_cpu_and_gpu() -> None:
    # CUDA divides by a Python scalar as a product with its reciprocal (off by an ulp for some
    # counts when the area is not a power of two); lam must not depend on the device.
    for area in (224 * 224, 28 * 28, 299 * 299, 32 * 32):
        counts = torch.randint(0, area + 1, (512,), generator=torch.Generator().manual_seed(area))
        masks = torch.arange(area) < counts.unsqueeze(1)  # row i has counts[i] pixels set
        assert torch.equal(AF._mask_share(masks.cuda()).cpu(), AF._mask_share(masks)), area


class SyncProbe(L.Callback):
    """Counts the host-device syncs (``torch.cuda.set_sync_debug_mode``) between two probes around a callback."""

    def __init__(self, start: bool, record: list[list[str]]) -> None:
        self.start, self.record = start, record

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        torch.cuda.synchronize()
        if self.start:
            self.caught = warnings.catch_warnings(record=True)
            self.messages = self.caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            torch.cuda.set_sync_debug_mode("default")
            start = next(c for c in trainer.callbacks if isinstance(c, SyncProbe) and c.start)
            start.caught.__exit__(None, None, None)
            self.record.append([str(w.message) for w in start.messages if "synchroniz" in str(w.message)])


@pytest.mark.parametrize("index", [0, 2, 3], ids=["acm", "cutmix", "mixup"])
def test_callbacks_make_no_host_device_sync_per_batch(index: int) -> None:
    callback = make_callbacks()[index]
    syncs: list[list[str]] = []
    data = DataLoader(TensorDataset(torch.rand(32, 3, SIZE, SIZE), torch.arange(32) % NUM_CLASSES), batch_size=8)
    trainer = quiet_trainer(
        accelerator="gpu", devices=1, callbacks=[SyncProbe(True, syncs), callback, SyncProbe(False, syncs)]
    )
    trainer.fit(DeviceRecorder(), train_dataloaders=data)
    assert len(syncs) == 4 and callback.batches_mixed == 4
    assert syncs[1:] == [[], [], []], syncs  # the first batch may sync once for lazy set-up


@pytest.mark.parametrize(
    ("make_callback", "index", "value", "limit", "match"),
    [
        (
            lambda: CutMix(seed=0),
            21,
            NUM_CLASSES,
            {"max_epochs": 1},
            r"got values in \[0, 4\] \(training batch 2 of epoch 0\)",
        ),
        # in the last batch of a fit that stops at max_steps inside the epoch
        (lambda: MixUp(seed=0), 20, -1, {"max_steps": 3}, r"got values in \[-1, 3\] \(training batch 2 of epoch 0\)"),
    ],
    ids=["mid-epoch", "last-batch-of-the-fit"],
)
def test_bad_labels_on_the_gpu_raise_naming_their_batch(
    make_callback: Any, index: int, value: int, limit: dict[str, int], match: str
) -> None:
    labels = torch.arange(32) % NUM_CLASSES
    labels[index] = value
    data = DataLoader(TensorDataset(torch.rand(32, 3, SIZE, SIZE), labels), batch_size=8)
    trainer = quiet_trainer(accelerator="gpu", devices=1, callbacks=[make_callback()], **limit)
    with pytest.raises(ValueError, match=match):
        trainer.fit(DeviceRecorder(), train_dataloaders=data)
    assert torch.ones(2, device="cuda").sum().item() == 2.0  # no device-side assert: the GPU is still usable
