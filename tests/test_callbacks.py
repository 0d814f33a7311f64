"""The mixing callbacks inside a real lightning.Trainer on CPU, with a tiny attention network."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from trainers import quiet_trainer

from lightning_acm import functional as AF
from lightning_acm.attention import AttentionModel, Teacher
from lightning_acm.callbacks import AttentiveCutMix, CutMix, MixingCallback, MixUp, batch_generator
from lightning_acm.loss import SoftTargetLossMixin

NUM_CLASSES = 4
SIZE = 28  # 7 cells of 4 px


class Recorder(SoftTargetLossMixin, L.LightningModule):
    """Tiny classifier that keeps a copy of every batch that reaches training_step."""

    def __init__(self, num_classes: int = NUM_CLASSES, in_channels: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
        self.net(torch.zeros(1, in_channels, SIZE, SIZE))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = (batch["image"], batch["target"]) if isinstance(batch, dict) else (batch[0], batch[1])
        self.seen.append((images.detach().clone(), targets.detach().clone()))
        return self.soft_target_loss(self.net(images.float()), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def tiny_teacher() -> nn.Module:
    """Conv net whose stride-4 feature map is 7x7 at 28 px; its heatmap follows the image's brightness."""
    conv = nn.Conv2d(3, 2, kernel_size=4, stride=4, bias=False)
    nn.init.constant_(conv.weight, 1.0 / 48)
    return nn.Sequential(conv, nn.ReLU())


def tiny_attention(**kwargs: Any) -> nn.Module:
    return AttentionModel(tiny_teacher(), "1", input_size=SIZE, grid_size=7, **kwargs)


def loader(n: int = 16, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, SIZE, SIZE, generator=g)
    labels = torch.arange(n) % NUM_CLASSES
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def fit(callback: Optional[MixingCallback], model: Optional[Recorder] = None, data: Any = None, **trainer_kwargs: Any):
    model = model or Recorder()
    trainer = quiet_trainer(callbacks=[callback] if callback is not None else [], **trainer_kwargs)
    trainer.fit(model, train_dataloaders=data if data is not None else loader())
    return trainer, model


def test_attentive_cutmix_training_step_sees_mixed_batch():
    callback = AttentiveCutMix(teacher=Teacher(module=tiny_attention()), num_classes=NUM_CLASSES, seed=0)
    data = loader()
    originals = [batch for batch in data]
    trainer, model = fit(callback, data=data)

    assert len(model.seen) == 2
    images, targets = model.seen[-1]
    mix = callback.last_mix
    assert mix is not None and mix.mask is not None
    torch.testing.assert_close(images, mix.mixed)
    torch.testing.assert_close(targets, mix.soft_targets)
    x, y = originals[-1]
    expected = torch.where(mix.mask, x[mix.permutation], x)
    torch.testing.assert_close(images, expected)
    assert not torch.equal(images, x)
    # lam is the pasted fraction: 6 of 49 cells of 4x4 px
    torch.testing.assert_close(mix.lam, torch.full((8,), 6 / 49))
    assert targets.shape == (8, NUM_CLASSES)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    # the cells are the partner's hottest: recompute its heatmap independently
    heat = tiny_teacher()(x).mean(1)[mix.permutation]
    top = heat.flatten(1).topk(6, dim=1).indices
    chosen = mix.mask[:, 0, ::4, ::4].flatten(1)
    assert torch.equal(chosen.nonzero()[:, 1].view(8, 6).sort(1).values, top.sort(1).values)
    assert torch.equal(mix.cell_indices.sort(1).values, top.sort(1).values)
    assert torch.equal(images, expected)  # pasted bit for bit, not blended
    # the logged share is computed on the grid; it equals the share over the pixel mask
    torch.testing.assert_close(mix.pasted_attention(), AF.pasted_attention_share(mix.partner_heatmaps, mix.mask))
    assert "region=cells" in repr(mix)
    assert callback.batches_mixed == 2 and callback.batches_seen == 2


def test_attention_model_is_frozen_and_not_part_of_the_module(tmp_path):
    callback = AttentiveCutMix(teacher=Teacher(module=tiny_attention()), num_classes=NUM_CLASSES, seed=0)
    model = Recorder()
    trainer = quiet_trainer(callbacks=[callback], default_root_dir=tmp_path, enable_checkpointing=True)
    params_before = sum(p.numel() for p in model.parameters())
    trainer.fit(model, train_dataloaders=loader())
    teacher = callback.attention_model
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert sum(p.numel() for p in model.parameters()) == params_before
    assert all(m is not teacher for m in model.modules())
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimizer_params & {id(p) for p in teacher.parameters()}
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert all(not key.startswith(("attention", "_attention")) for key in checkpoint["state_dict"])
    (state,) = [v for k, v in checkpoint["callbacks"].items() if "AttentiveCutMix" in k]
    assert set(state) == {"seed", "batches_seen", "batches_mixed"}


@pytest.mark.parametrize("make", [lambda: CutMix(seed=1), lambda: MixUp(seed=1, alpha=0.4)], ids=["cutmix", "mixup"])
def test_random_mixing_callbacks_mix_in_place(make):
    callback = make()
    data = loader()
    originals = [batch for batch in data]
    _, model = fit(callback, model=Recorder(), data=data)
    images, targets = model.seen[-1]
    mix = callback.last_mix
    torch.testing.assert_close(images, mix.mixed)
    x, y = originals[-1]
    if mix.mask is not None:
        torch.testing.assert_close(images, torch.where(mix.mask, x[mix.permutation], x))
        assert torch.equal(mix.lam, mix.mask.flatten(1).float().mean(1))
        # CutMix keeps its boxes; the mask is built from them when read.
        for box, mask in zip(mix.boxes.tolist(), mix.mask[:, 0], strict=True):
            top, bottom, left, right = box
            expected = torch.zeros_like(mask)
            expected[top:bottom, left:right] = True
            assert torch.equal(mask, expected)
        assert mix.has_region and "region=box" in repr(mix)
    else:
        lam = mix.lam.view(-1, 1, 1, 1)
        torch.testing.assert_close(images, lam * x[mix.permutation] + (1 - lam) * x)
    one_hot = torch.nn.functional.one_hot(y, NUM_CLASSES).float()
    torch.testing.assert_close(targets, mix.lam[:, None] * one_hot[mix.permutation] + (1 - mix.lam[:, None]) * one_hot)


def test_probability_zero_is_identity():
    data = loader()
    originals = [batch for batch in data]
    callback = CutMix(p=0.0, seed=0)
    _, model = fit(callback, data=data)
    for (seen_x, seen_y), (x, y) in zip(model.seen, originals, strict=True):
        assert torch.equal(seen_x, x) and torch.equal(seen_y, y)
    assert callback.batches_mixed == 0 and callback.last_mix is None


def test_probability_half_mixes_some_batches_and_skips_the_teacher_on_the_others():
    calls = []
    teacher = tiny_attention()
    teacher.register_forward_hook(lambda *_: calls.append(1))
    callback = AttentiveCutMix(teacher=Teacher(module=teacher), p=0.5, num_classes=NUM_CLASSES, seed=3)
    fit(callback, data=loader(n=160), max_epochs=1)
    assert 0 < callback.batches_mixed < callback.batches_seen == 20
    assert len(calls) == callback.batches_mixed


def test_logs_mean_lam_and_mixed_fraction():
    callback = AttentiveCutMix(
        teacher=Teacher(module=tiny_attention()), num_classes=NUM_CLASSES, seed=0, log_prefix="acm"
    )
    trainer, _ = fit(callback)
    metrics = trainer.callback_metrics
    assert float(metrics["acm/mixed"]) == 1.0
    assert float(metrics["acm/lam"]) == pytest.approx(6 / 49)


def test_logged_metrics_are_means_over_the_images_of_the_epoch():
    callback = CutMix(p=0.5, seed=3)
    lams: list[torch.Tensor] = []
    original = callback.mix

    def spy(*args: Any) -> Any:
        result = original(*args)
        lams.append(result.lam)
        return result

    callback.mix = spy  # type: ignore[method-assign]
    trainer, _ = fit(callback, data=loader(n=84, batch_size=8), max_epochs=1)  # ten batches of 8, one of 4
    assert 0 < len(lams) < callback.batches_seen == 11
    metrics = trainer.callback_metrics
    mixed_images = sum(lam.numel() for lam in lams)
    assert float(metrics["mix/mixed"]) == pytest.approx(mixed_images / 84)
    assert float(metrics["mix/lam"]) == pytest.approx(float(torch.cat(lams).mean()))
    assert "mix/pasted_attention" not in metrics  # CutMix has no heatmaps without a monitor


def test_same_seed_same_mixes_and_ranks_differ():
    def run(seed: int, rank: int = 0) -> list[torch.Tensor]:
        callback = CutMix(seed=seed)
        perms: list[torch.Tensor] = []
        original = callback.mix

        def spy(*args: Any) -> Any:
            result = original(*args)
            perms.append(torch.cat([result.permutation.float(), result.lam]))
            return result

        callback.mix = spy  # type: ignore[method-assign]
        callback._rank = rank
        setup = callback.setup

        def setup_keep_rank(trainer, pl_module, stage):
            setup(trainer, pl_module, stage)
            callback._rank = rank

        callback.setup = setup_keep_rank  # type: ignore[method-assign]
        fit(callback, data=loader(n=32), max_epochs=2)
        return perms

    first, again = run(7), run(7)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True)) and len(first) == 8
    assert any(not torch.equal(a, b) for a, b in zip(first, run(8), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(first, run(7, rank=1), strict=True))


def test_seed_none_follows_seed_everything():
    L.seed_everything(123)
    a = CutMix()
    fit(a)
    L.seed_everything(123)
    b = CutMix()
    fit(b)
    assert a.state_dict()["seed"] == b.state_dict()["seed"]
    torch.testing.assert_close(a.last_mix.lam, b.last_mix.lam)


def test_batch_generator_depends_on_every_key_and_order():
    draws = {batch_generator(0, 0, e, b).integers(2**63) for e in range(3) for b in range(50)}
    assert len(draws) == 150
    assert batch_generator(1, 2).integers(2**63) != batch_generator(2, 1).integers(2**63)
    assert batch_generator(3, 1, 2, 5).integers(2**63) == batch_generator(3, 1, 2, 5).integers(2**63)


def test_state_dict_round_trip():
    callback = CutMix(seed=5)
    fit(callback)
    state = callback.state_dict()
    fresh = CutMix()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state == {"seed": 5, "batches_seen": 2, "batches_mixed": 2}


def test_stop_after_step_and_epoch():
    callback = CutMix(seed=0, stop_after_step=3)
    _, model = fit(callback, data=loader(n=48), max_epochs=1)
    assert callback.batches_mixed == 3 and callback.batches_seen == 6
    assert model.seen[-1][1].ndim == 1  # index targets after mixing stopped (no smoothing asked)
    callback = CutMix(seed=0, stop_after_epoch=1)
    fit(callback, data=loader(n=16), max_epochs=3)
    assert callback.batches_mixed == 2


@pytest.mark.parametrize("stop", [{"stop_after_step": 1}, {"stop_after_epoch": 1}], ids=["step", "epoch"])
def test_label_smoothing_and_range_check_go_on_after_mixing_stops(stop):
    data = loader(n=16)
    callback = CutMix(seed=0, label_smoothing=0.2, **stop)
    _, model = fit(callback, data=data, max_epochs=2)
    assert callback.batches_mixed == (1 if "stop_after_step" in stop else 2) and callback.batches_seen == 4
    images, targets = model.seen[-1]
    assert torch.equal(images, list(data)[-1][0])  # no longer mixed...
    labels = list(data)[-1][1]
    expected = torch.full((8, NUM_CLASSES), 0.2 / NUM_CLASSES).scatter_(1, labels[:, None], 0.8 + 0.2 / NUM_CLASSES)
    torch.testing.assert_close(targets, expected)  # ...but still smoothed
    bad = DataLoader(TensorDataset(torch.rand(16, 3, SIZE, SIZE), torch.full((16,), NUM_CLASSES)), batch_size=8)
    with pytest.raises(ValueError, match=r"in \[0, 4\), but got values in \[4, 4\] \(training batch 0 of epoch 0\)"):
        fit(CutMix(seed=0, stop_after_step=0), data=bad)


class DictDataset(Dataset):
    def __init__(self, n: int = 16) -> None:
        self.images = torch.rand(n, 3, SIZE, SIZE)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixels": self.images[i], "label": i % NUM_CLASSES}


class DictRecorder(Recorder):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append((batch["pixels"].clone(), batch["label"].clone()))
        return self.soft_target_loss(self.net(batch["pixels"]), batch["label"])


def test_dict_batches_with_configurable_keys():
    callback = CutMix(seed=0, image_key="pixels", target_key="label")
    _, model = fit(callback, model=DictRecorder(), data=DataLoader(DictDataset(), batch_size=8))
    torch.testing.assert_close(model.seen[-1][0], callback.last_mix.mixed)
    assert model.seen[-1][1].shape == (8, NUM_CLASSES)


def test_dict_batch_missing_key_names_the_argument():
    with pytest.raises(KeyError, match="no key 'image'.*`image_key`.*'label', 'pixels'"):
        fit(CutMix(seed=0), model=DictRecorder(), data=DataLoader(DictDataset(), batch_size=8))


def test_tuple_batch_is_refused_with_the_fix():
    data = DataLoader(
        TensorDataset(torch.rand(8, 3, SIZE, SIZE), torch.zeros(8).long()),
        batch_size=4,
        collate_fn=lambda s: (torch.stack([a for a, _ in s]), torch.stack([b for _, b in s])),
    )
    with pytest.raises(TypeError, match="tuple.*Return a list from your collate_fn"):
        fit(CutMix(seed=0), data=data)


def test_batch_of_one_is_left_unmixed_with_one_warning():
    with pytest.warns(UserWarning, match="batch of one sample has no partner"):
        callback = CutMix(seed=0)
        _, model = fit(callback, data=loader(n=9, batch_size=8))
    assert callback.batches_mixed == 1 and callback.batches_seen == 2
    assert model.seen[-1][1].ndim == 1


def test_num_classes_from_module_or_datamodule_or_error():
    callback = CutMix(seed=0)
    fit(callback)
    assert callback._num_classes == NUM_CLASSES

    class NoClasses(Recorder):
        def __init__(self) -> None:
            super().__init__()
            del self.num_classes

    with pytest.raises(MisconfigurationException, match=r"`num_classes` is None.*CutMix\(num_classes=K\)"):
        fit(CutMix(seed=0), model=NoClasses())

    class ClassesInHparams(NoClasses):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"num_classes": NUM_CLASSES})

    callback = CutMix(seed=0)
    fit(callback, model=ClassesInHparams())
    assert callback._num_classes == NUM_CLASSES

    class DataWithClasses(L.LightningDataModule):
        num_classes = NUM_CLASSES

        def train_dataloader(self) -> DataLoader:
            return loader()

    callback = CutMix(seed=0)
    trainer = quiet_trainer(callbacks=[callback])
    trainer.fit(NoClasses(), datamodule=DataWithClasses())
    assert callback._num_classes == NUM_CLASSES


def test_labels_out_of_range_are_refused():
    data = DataLoader(TensorDataset(torch.rand(8, 3, SIZE, SIZE), torch.full((8,), 9)), batch_size=8)
    with pytest.raises(ValueError, match=r"targets` in \[0, 4\), but got values in \[9, 9\]"):
        fit(CutMix(seed=0), data=data)


def test_label_smoothing_applies_to_unmixed_batches_too():
    callback = CutMix(p=0.0, seed=0, label_smoothing=0.1)
    _, model = fit(callback)
    targets = model.seen[-1][1]
    assert targets.shape == (8, NUM_CLASSES)
    torch.testing.assert_close(targets.max(1).values, torch.full((8,), 0.9 + 0.1 / NUM_CLASSES))


def test_plain_module_needs_a_layer():
    with pytest.raises(ValueError, match=r"Expected `layer` with a plain `module`: name the layer"):
        AttentiveCutMix(teacher=Teacher(module=tiny_teacher()), num_classes=NUM_CLASSES)


def test_plain_module_with_layer_and_datamodule_normalisation():
    class Normalised(L.LightningDataModule):
        num_classes = NUM_CLASSES
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

        def train_dataloader(self) -> DataLoader:
            return loader()

    callback = AttentiveCutMix(teacher=Teacher(module=tiny_teacher(), layer="1", input_size=SIZE), seed=0)
    trainer = quiet_trainer(callbacks=[callback])
    trainer.fit(Recorder(), datamodule=Normalised())
    assert callback.last_mix is not None
    torch.testing.assert_close(callback.last_mix.lam, torch.full((8,), 6 / 49))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: CutMix(p=1.5), r"`p` .* to be in \[0, 1\], but got 1.5"),
        (lambda: MixUp(p=-0.1), r"`p` .* to be in \[0, 1\]"),
        (
            lambda: CutMix(alpha=0.0),
            r"`alpha` \(the Beta\(alpha, alpha\) parameter\) to be a finite number > 0, but got 0.0",
        ),
        (
            lambda: MixUp(alpha=float("nan")),
            r"`alpha` \(the Beta\(alpha, alpha\) parameter\) to be a finite number > 0",
        ),
        (lambda: AttentiveCutMix(top_k=50), r"`top_k` to be in \[1, 49\] for a 7x7 grid, but got 50"),
        (lambda: AttentiveCutMix(top_k=0), r"`top_k` to be in \[1, 49\]"),
        (lambda: AttentiveCutMix(teacher=Teacher(grid_size=0)), r"`grid_size` to be positive"),
        (lambda: AttentiveCutMix(teacher=Teacher(grid_size=2), top_k=6), r"`top_k` to be in \[1, 4\] for a 2x2 grid"),
        (lambda: AttentiveCutMix(teacher=Teacher(reduction="sum")), r"`reduction` to be one of 'mean', 'max'"),
        (
            lambda: AttentiveCutMix(teacher=Teacher(precision="fp8")),
            r"`precision` to be one of None, 'bf16', 'fp16', but got 'fp8'",
        ),
        (lambda: AttentiveCutMix(teacher=Teacher(channels_last="yes")), r"`channels_last` to be a bool, but got 'yes'"),
        (
            lambda: AttentiveCutMix(teacher=Teacher(compile="max-autotune")),
            r"`compile` to be a bool or a dict of"
            r" torch.compile arguments",
        ),
        (
            lambda: AttentiveCutMix(teacher=Teacher(input_mean=[0.5])),
            r"`input_mean` and `input_std` to be given together",
        ),
        (lambda: CutMix(num_classes=1), r"`num_classes` to be None or an int >= 2"),
        (lambda: CutMix(label_smoothing=1.0), r"`label_smoothing` to be in \[0, 1\)"),
        (lambda: CutMix(stop_after_step=-1), r"`stop_after_step` to be None or an int >= 0"),
        (lambda: CutMix(seed="x"), r"`seed` to be None or an int"),
    ],
)
def test_bad_arguments_fail_early(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_label_range_check_on_the_cpu_is_immediate_and_names_the_batch() -> None:
    from lightning_acm.callbacks import _LabelRangeCheck

    check = _LabelRangeCheck()
    labels = torch.tensor([0, 3, 1])
    assert check(labels, 4, " (batch 0)") is labels  # in range: the same tensor, not a copy
    soft = torch.full((3, 4), 0.25)
    assert check(soft, 4, " (batch 1)") is soft  # probabilities are not class indices
    with pytest.raises(ValueError, match=r"in \[0, 4\), but got values in \[-2, 1\] \(batch 2\)\. Check"):
        check(torch.tensor([1, -2]), 4, " (batch 2)")
    with pytest.raises(ValueError, match=r"got values in \[0, 4\] \(batch 3\)"):
        check(torch.tensor([4, 0]), 4, " (batch 3)")
    check.flush()  # nothing queued on the CPU


def test_compiled_teacher_mixes_like_the_eager_one():
    mixes = []
    for compile_arg in (False, {"backend": "eager"}):
        callback = AttentiveCutMix(
            teacher=Teacher(module=tiny_attention(), compile=compile_arg), num_classes=NUM_CLASSES, seed=0
        )
        fit(callback)
        assert callback.attention_model.compiled is (compile_arg is not False)
        mixes.append((callback.last_mix.mixed, callback.last_mix.soft_targets, callback.last_mix.cell_indices))
    for a, b in zip(*mixes, strict=True):
        assert torch.equal(a, b)


def test_uint8_images_reach_the_teacher_scaled_like_floats():
    from lightning_acm.cache import HeatmapCache

    g = torch.Generator().manual_seed(3)
    as_uint8 = torch.randint(0, 256, (16, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    as_float = as_uint8.float() / 255
    labels = torch.arange(16) % NUM_CLASSES
    heatmaps = []
    for images in (as_uint8, as_float):
        # a teacher with a bias, so that the heatmaps (not only their ranking) depend on the scale
        conv = nn.Conv2d(3, 2, kernel_size=4, stride=4)
        nn.init.constant_(conv.weight, 1.0 / 48)
        nn.init.constant_(conv.bias, -0.3)
        teacher = AttentionModel(nn.Sequential(conv, nn.ReLU()), "1", input_size=SIZE, grid_size=7)
        callback = AttentiveCutMix(teacher=Teacher(module=teacher), num_classes=NUM_CLASSES, seed=0)
        fit(callback, data=DataLoader(TensorDataset(images, labels), batch_size=8))
        cache = HeatmapCache(16, (7, 7)).fill(callback.attention_model, TensorDataset(images, labels), batch_size=8)
        heatmaps.append(
            (callback.last_mix.partner_heatmaps, callback.last_mix.cell_indices, cache.lookup(torch.arange(16)))
        )
    for from_uint8, from_float in zip(*heatmaps, strict=True):
        torch.testing.assert_close(from_uint8, from_float)
    with pytest.warns(UserWarning, match=r"taken to be in \[0, 1\] \(integer images, e.g. uint8, are scaled by 1/255"):
        fit(
            AttentiveCutMix(teacher=Teacher(module=tiny_teacher(), layer="1", input_size=SIZE), seed=0),
            data=DataLoader(TensorDataset(as_uint8, labels), batch_size=8),
        )


class ThreeFields(Dataset):
    """``(image, domain_id, label)`` samples: the label is the third field."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return torch.full((3, SIZE, SIZE), i / 16), 7, i % NUM_CLASSES


class ThirdFieldRecorder(Recorder):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append((batch[0].clone(), batch[2].clone()))
        assert torch.equal(batch[1], torch.full((len(batch[0]),), 7))  # the domain ids pass untouched
        return self.soft_target_loss(self.net(batch[0]), batch[2])


def test_integer_keys_index_list_batches():
    callback = CutMix(seed=0, target_key=2)
    _, model = fit(callback, model=ThirdFieldRecorder(), data=DataLoader(ThreeFields(), batch_size=8))
    mix = callback.last_mix
    labels = torch.arange(8, 16) % NUM_CLASSES
    expected = AF.mix_targets(labels, mix.lam, mix.permutation, NUM_CLASSES)
    torch.testing.assert_close(model.seen[-1][1], expected)
    with pytest.raises(
        ValueError, match=r"`target_key` to be an int \(a position\) in the list batch of length 2, but got 'label'"
    ):
        fit(CutMix(seed=0, target_key="label"), data=loader())
    with pytest.raises(
        ValueError, match=r"`target_key` to be an int \(a position\) in the list batch of length 2, but got 2\."
    ):
        fit(CutMix(seed=0, target_key=2), data=loader())


def test_student_backbone_as_teacher_is_copied_not_frozen():
    model = Recorder()
    backbone = nn.Sequential(nn.Conv2d(3, 3, kernel_size=1), nn.ReLU())
    model.net = nn.Sequential(backbone, nn.Flatten(), nn.Linear(3 * SIZE * SIZE, NUM_CLASSES))
    before = backbone[0].weight.detach().clone()
    callback = AttentiveCutMix(
        teacher=Teacher(module=backbone, layer="1", input_size=SIZE, grid_size=7, input_mean=(0.0,), input_std=(1.0,)),
        seed=0,
    )
    fit(callback, model=model)
    assert all(p.requires_grad for p in backbone.parameters()) and backbone.training
    assert not torch.equal(backbone[0].weight, before)  # the student's backbone trained
    teacher = callback.attention_model
    assert all(not p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher.backbone[0].weight, before)  # the teacher is the frozen snapshot at setup


def test_a_given_attention_model_is_not_changed():
    given = tiny_attention()
    callback = AttentiveCutMix(
        teacher=Teacher(module=given, input_mean=(0.5,), input_std=(0.25,), channels_last=True), seed=0
    )
    fit(callback)
    assert callback.attention_model is not given and callback.attention_model.channels_last
    assert not given.channels_last and given.input_std.flatten().tolist() == [1.0]


def test_a_compiled_attention_model_is_copied_with_its_own_compilation():
    given = tiny_attention()
    given.compile_features(backend="eager")
    callback = AttentiveCutMix(teacher=Teacher(module=given), num_classes=NUM_CLASSES, seed=0)
    fit(callback)
    copy = callback.attention_model
    assert copy.compiled and copy.__dict__["_compiled_features"] is not given.__dict__["_compiled_features"]
    with torch.no_grad():
        copy.backbone[0].weight.mul_(-1)  # a change to the copy shows in the copy's compiled features only
    images = torch.rand(2, 3, SIZE, SIZE)
    assert not torch.equal(copy(images), given(images))


def test_seed_none_is_taken_anew_for_every_fit():
    callback = CutMix()
    L.seed_everything(0)
    fit(callback)
    first_seed, first_lam = callback.state_dict()["seed"], callback.last_mix.lam
    L.seed_everything(1)
    fit(callback)
    assert callback.state_dict()["seed"] != first_seed
    assert not torch.equal(callback.last_mix.lam, first_lam)
    L.seed_everything(0)
    fit(callback)
    assert callback.state_dict()["seed"] == first_seed and torch.equal(callback.last_mix.lam, first_lam)


def test_state_key_holds_every_defining_argument():
    assert CutMix(alpha=1.0).state_key != CutMix(alpha=0.2).state_key
    assert AttentiveCutMix(top_k=6).state_key != AttentiveCutMix(top_k=9).state_key
    assert CutMix(alpha=1.0, p=0.5).state_key == CutMix(alpha=1.0, p=0.5).state_key  # stable for a resume
    assert "alpha" in CutMix().state_key and "label_smoothing" in MixUp().state_key


def test_label_smoothing_in_both_the_callback_and_the_loss_warns_once():
    model = Recorder()
    model.label_smoothing = 0.1
    with pytest.warns(
        UserWarning,
        match=r"CutMix\(label_smoothing=0.1\) smooths the targets and Recorder\(label_smoothing=0.1\)"
        r" smooths them again in its loss\. Set one of the two to 0\.",
    ) as record:
        fit(CutMix(seed=0, label_smoothing=0.1), model=model)
    assert sum("smooths them again" in str(w.message) for w in record) == 1


def test_class_indices_of_shape_b_1_are_mixed_as_indices_through_a_callback():
    # MedMNIST-style labels collate to (B, 1): the callback takes them as class indices.
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(8, 3, SIZE, SIZE, generator=g), (torch.arange(8) % NUM_CLASSES).unsqueeze(1)
    _, model = fit(CutMix(seed=3), data=DataLoader(TensorDataset(images, labels), batch_size=8))
    ((column_images, column_targets),) = model.seen
    _, model = fit(CutMix(seed=3), data=DataLoader(TensorDataset(images, labels.squeeze(1)), batch_size=8))
    ((flat_images, flat_targets),) = model.seen
    assert column_targets.shape == (8, NUM_CLASSES)
    assert torch.equal(column_images, flat_images) and torch.equal(column_targets, flat_targets)
    with pytest.raises(
        ValueError, match=r"`targets` to be class indices \(B,\) or float probabilities \(B, K\), but got an integer"
    ):
        fit(
            CutMix(seed=3),
            data=DataLoader(TensorDataset(images, nn.functional.one_hot(labels.squeeze(1), NUM_CLASSES)), batch_size=8),
        )
    with pytest.raises(ValueError, match=r"soft `targets` to be probabilities \(non-negative rows that sum to 1\)"):
        fit(CutMix(seed=3), data=DataLoader(TensorDataset(images, torch.full((8, NUM_CLASSES), 0.5)), batch_size=8))


def test_attentive_cutmix_takes_twelve_arguments():
    import inspect

    own = list(inspect.signature(AttentiveCutMix.__init__).parameters)[1:]
    base = list(inspect.signature(MixingCallback.__init__).parameters)[1:]
    assert own == ["top_k", "teacher", "heatmap_cache", "kwargs"]
    assert own[:-1] + base == ["top_k", "teacher", "heatmap_cache", "p", "num_classes", "seed", "label_smoothing",
                               "stop_after_step", "stop_after_epoch", "image_key", "target_key", "log_prefix"]  # fmt: skip
    with pytest.raises(TypeError, match="unexpected keyword argument 'alpha'"):
        AttentiveCutMix(alpha=1.0)


def test_teacher_as_a_string_or_a_nested_teacher():
    from lightning_acm.cache import HeatmapCacheConfig

    assert AttentiveCutMix(teacher="paper").teacher == Teacher(source="paper")
    nested = AttentiveCutMix(teacher=Teacher("resnet50", layer="layer3", input_size=112, grid_size=(2, 3)), top_k=6)
    assert nested.grid_size == (2, 3) and nested.teacher.layer == "layer3"
    assert AttentiveCutMix(heatmap_cache=True).heatmap_cache == HeatmapCacheConfig()
    assert AttentiveCutMix().heatmap_cache is None
    with pytest.raises(TypeError, match=r"`teacher` to be a str or a Teacher, but got Sequential"):
        AttentiveCutMix(teacher=tiny_teacher())
    with pytest.raises(TypeError, match=r"`heatmap_cache` to be a bool or a HeatmapCacheConfig, but got 'yes'"):
        AttentiveCutMix(heatmap_cache="yes")
    # the teacher's and the cache's settings are part of the state key
    assert AttentiveCutMix(teacher="paper").state_key != AttentiveCutMix(teacher="resnet50").state_key
    assert (
        AttentiveCutMix(heatmap_cache=True).state_key
        != AttentiveCutMix(heatmap_cache=HeatmapCacheConfig(path="x")).state_key
    )


def test_a_teacher_module_is_left_untouched():
    module = tiny_teacher().train()
    callback = AttentiveCutMix(teacher=Teacher(module=module, layer="1", input_size=SIZE, input_mean=(0.0,),
                                               input_std=(1.0,)), num_classes=NUM_CLASSES, seed=0)  # fmt: skip
    fit(callback)
    assert module.training and all(p.requires_grad for p in module.parameters())
    assert callback.attention_model.backbone is not module and not callback.attention_model.training
