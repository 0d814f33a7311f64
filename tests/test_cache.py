"""The heatmap cache: warping by hand-made geometry, storage, and the teacher running once per sample."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Optional

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trainers import quiet_trainer

from lightning_acm import functional as AF
from lightning_acm.attention import AttentionModel, Teacher
from lightning_acm.cache import (
    HeatmapCache,
    HeatmapCacheConfig,
    _fingerprint,
    batch_geometry,
    regrid_attention_model,
    warp_heatmaps,
)
from lightning_acm.callbacks import AttentiveCutMix
from lightning_acm.data import FashionMNISTDataModule, RandomCropFlip, _write_idx
from lightning_acm.loss import SoftTargetLossMixin

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from fidelity import apply_geometry, topk_overlap  # noqa: E402

IDENTITY = [0.0, 0.0, 1.0, 1.0, 0.0]


def geometry(*rows: list[float], index: bool = True) -> torch.Tensor:
    return torch.tensor([([float(i)] if index else []) + list(r) for i, r in enumerate(rows)])


# --------------------------------------------------------------------------- warp_heatmaps


@pytest.mark.parametrize("fine", [14, 28, 7])
def test_identity_box_equals_direct_pooling(generator, fine):
    maps = torch.randn(5, fine, fine, generator=generator)
    warped = warp_heatmaps(maps, geometry(*[IDENTITY] * 5), 7)
    torch.testing.assert_close(warped, F.adaptive_avg_pool2d(maps, 7))


@pytest.mark.parametrize(("fine", "grid"), [((14, 14), (7, 7)), ((8, 12), (4, 6)), ((14, 14), (7, 2))])
def test_identity_and_flipped_boxes_on_square_and_other_grids(generator, fine, grid):
    # Square grids weigh rows and columns in one call, the others in two; both are checked here.
    maps = torch.randn(4, *fine, generator=generator)
    warped = warp_heatmaps(maps, geometry(*[IDENTITY, [0.0, 0.0, 1.0, 1.0, 1.0]] * 2), grid)
    pooled = F.adaptive_avg_pool2d(maps, grid)
    torch.testing.assert_close(warped[0::2], pooled[0::2])
    torch.testing.assert_close(warped[1::2], pooled[1::2].flip(-1))


def test_flip_flips(generator):
    maps = torch.randn(3, 14, 14, generator=generator)
    warped = warp_heatmaps(maps, geometry(*[[0.0, 0.0, 1.0, 1.0, 1.0]] * 3), 7)
    torch.testing.assert_close(warped, F.adaptive_avg_pool2d(maps, 7).flip(-1))


def test_left_half_crop_picks_left_cells():
    fine = torch.arange(16.0).view(1, 4, 4)
    left = warp_heatmaps(fine, geometry([0.0, 0.0, 1.0, 0.5, 0.0]), 2)
    torch.testing.assert_close(left, torch.tensor([[[2.0, 3.0], [10.0, 11.0]]]))
    left_flipped = warp_heatmaps(fine, geometry([0.0, 0.0, 1.0, 0.5, 1.0]), 2)
    torch.testing.assert_close(left_flipped, torch.tensor([[[3.0, 2.0], [11.0, 10.0]]]))
    # the hottest cell of a map whose heat is on the left stays on the crop's left side
    hot_left = torch.zeros(1, 14, 14)
    hot_left[0, 6, 2] = 10.0
    warped = warp_heatmaps(hot_left, geometry([0.0, 0.0, 1.0, 0.5, 0.0]), 7)
    assert divmod(int(warped.flatten().argmax()), 7) == (3, 2)


def test_padding_counts_with_the_minimum():
    fine = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    # the top half of the augmented image is padding above the image
    warped = warp_heatmaps(fine, geometry([-0.5, 0.0, 0.5, 1.0, 0.0]), 2)
    torch.testing.assert_close(warped, torch.tensor([[[1.0, 1.0], [1.0, 2.0]]]))
    # one cell half in the padding: half the minimum, half the mean of the top row
    torch.testing.assert_close(warp_heatmaps(fine, geometry([-0.5, 0.0, 0.5, 1.0, 0.0]), 1), torch.tensor([[[1.25]]]))
    # a box entirely outside gives the minimum everywhere
    torch.testing.assert_close(warp_heatmaps(fine, geometry([2.0, 2.0, 3.0, 3.0, 1.0]), 2), torch.ones(1, 2, 2))


def test_warp_matches_pooling_the_augmented_image_of_the_datamodule_transform(generator):
    """RandomCropFlip (padding 4, then flip) of a piecewise-constant image: pooling its crop is the warped map."""
    torch.manual_seed(0)
    transform = RandomCropFlip(32, padding=4)
    for _ in range(20):
        fine = torch.rand(1, 8, 8, generator=generator)
        fine[0, 0, 0] = 0.0  # the zero padding of the image is the map's minimum
        image = fine.repeat_interleave(4, 1).repeat_interleave(4, 2).expand(3, 32, 32)
        crop, box = transform(image)
        direct = F.adaptive_avg_pool2d(crop[:1], 8)
        warped = warp_heatmaps(fine, torch.cat([torch.zeros(1), box]).unsqueeze(0), 8)
        torch.testing.assert_close(warped, direct, atol=1e-5, rtol=0)


def test_apply_geometry_crops_and_flips(generator):
    images = torch.rand(2, 3, 8, 8, generator=generator)
    out = apply_geometry(images, geometry([0.0, 0.5, 0.5, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0]), 4)
    torch.testing.assert_close(out[0], images[0, :, :4, 4:])
    torch.testing.assert_close(apply_geometry(images[1:], geometry(IDENTITY, index=False)), images[1:])
    torch.testing.assert_close(out[1], F.avg_pool2d(images[1:], 2)[0].flip(-1))


def test_warp_stays_between_minimum_and_maximum(generator):
    maps = torch.randn(64, 14, 14, generator=generator)
    corner = torch.rand(64, 2, generator=generator) * 1.4 - 0.4
    side = torch.rand(64, 2, generator=generator) * 0.9 + 0.1
    flips = (torch.rand(64, 1, generator=generator) < 0.5).float()
    box = torch.cat([corner, corner + side, flips], 1)
    warped = warp_heatmaps(maps, box, 7)
    low, high = maps.flatten(1).aminmax(dim=1)
    assert bool((warped >= low.view(-1, 1, 1) - 1e-5).all() and (warped <= high.view(-1, 1, 1) + 1e-5).all())


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: warp_heatmaps(torch.rand(2, 4, 4), torch.rand(2, 4)), ValueError, r"shape \(B, 6\)"),
        (lambda: warp_heatmaps(torch.rand(2, 4, 4), torch.rand(3, 6)), ValueError, "3 != 2"),
        (lambda: warp_heatmaps(torch.rand(2, 4, 4), [[0.0] * 6]), TypeError, "torch.Tensor"),
        (lambda: warp_heatmaps(torch.rand(4, 4), torch.rand(2, 6)), ValueError, r"\(B, gh, gw\)"),
        (lambda: topk_overlap(torch.rand(1, 2, 2), torch.rand(1, 3, 3), 1), ValueError, "same shape"),
        (lambda: topk_overlap(torch.rand(1, 2, 2), torch.rand(1, 2, 2), 5), ValueError, r"\[1, 4\]"),
        (lambda: HeatmapCache(0), ValueError, "num_samples"),
        (lambda: HeatmapCache(2, dtype=torch.int64), ValueError, "dtype"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_topk_overlap():
    a = torch.tensor([[[3.0, 2.0], [1.0, 0.0]], [[0.0, 1.0], [2.0, 3.0]]])
    b = torch.tensor([[[3.0, 0.0], [2.0, 1.0]], [[0.0, 1.0], [2.0, 3.0]]])
    torch.testing.assert_close(topk_overlap(a, b, 2), torch.tensor([1 / 3, 1.0]))
    torch.testing.assert_close(topk_overlap(a, b, 4), torch.ones(2))


# --------------------------------------------------------------------------- HeatmapCache


def test_cache_update_lookup_warp_and_save_load_round_trip(tmp_path, generator):
    maps = torch.randn(6, 14, 14, generator=generator)
    cache = HeatmapCache(6, 14, dtype=torch.float32)
    cache.update(torch.tensor([5, 0, 1]), maps[[5, 0, 1]])
    assert not cache.is_complete() and cache.missing().tolist() == [2, 3, 4]
    cache.update(torch.tensor([2, 3, 4]), maps[[2, 3, 4]])
    assert cache.is_complete()
    torch.testing.assert_close(cache.lookup(torch.tensor([4.0, 1.0])), maps[[4, 1]])
    box = geometry(*[IDENTITY] * 2)
    box[:, 0] = torch.tensor([3.0, 5.0])
    torch.testing.assert_close(cache.warp(box, 7), F.adaptive_avg_pool2d(maps[[3, 5]], 7))

    cache.meta = {"teacher": "tiny"}
    path = tmp_path / "sub" / "cache.pt"
    cache.save(path)
    loaded = HeatmapCache.load(path)
    assert loaded.meta == {"teacher": "tiny"} and loaded.grid_size == (14, 14) and loaded.is_complete()
    torch.testing.assert_close(loaded.maps, cache.maps)
    half = HeatmapCache(6, 14)
    half.update(torch.arange(6), maps)
    assert half.maps.dtype == torch.float16
    torch.testing.assert_close(half.lookup(torch.arange(6)), maps, atol=1e-2, rtol=1e-3)

    with pytest.raises(
        ValueError, match=r"cache's 14x14 grid, but got 1 indices and 1 heatmaps of 7x7\. Build the teacher"
    ):
        cache.update(torch.tensor([0]), torch.rand(1, 7, 7))
    with pytest.raises(ValueError, match="with the dataset index first"):
        cache.warp(geometry(IDENTITY, index=False))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HeatmapCache.load(tmp_path / "missing.pt")
    torch.save({"maps": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="to be a heatmap cache written by HeatmapCache.save"):
        HeatmapCache.load(tmp_path / "other.pt")


class Counting(nn.Module):
    """Stride-4 conv whose heatmap follows brightness; counts the images it sees."""

    def __init__(self, log_dir: Optional[str] = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=4, stride=4, bias=False)
        nn.init.constant_(self.conv.weight, 1.0 / 48)
        self.act = nn.ReLU()
        self.images_seen = 0
        self.log_dir = log_dir  # spawned processes report their counts through files

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += x.shape[0]
        if self.log_dir is not None:
            with open(os.path.join(self.log_dir, f"seen-{os.getpid()}"), "a") as file:
                file.write(f"{x.shape[0]}\n")
        return self.act(self.conv(x))


def test_fill_from_datasets(generator):
    images = torch.rand(10, 3, 28, 28, generator=generator)
    teacher = AttentionModel(Counting(), "act", input_size=28, grid_size=7)
    expected = teacher(images)
    indexed = TensorDataset(images, torch.zeros(10), torch.arange(10))
    cache = HeatmapCache(10, 7, dtype=torch.float32).fill(teacher, indexed, indices=[9, 3], batch_size=4)
    assert cache.filled.nonzero().flatten().tolist() == [3, 9]
    torch.testing.assert_close(cache.maps[[3, 9]], expected[[3, 9]])
    pairs = HeatmapCache(10, 7, dtype=torch.float32).fill(teacher, TensorDataset(images, torch.zeros(10)), batch_size=3)
    torch.testing.assert_close(pairs.maps, expected)
    with pytest.raises(ValueError, match="cache's 14x14 grid"):
        HeatmapCache(10, 14).fill(teacher, indexed)
    # the same teacher at twice the input size gives the finer grid
    fine = regrid_attention_model(teacher, 14, 56)
    torch.testing.assert_close(HeatmapCache(10, 14, dtype=torch.float32).fill(fine, indexed).maps, fine(images))


# --------------------------------------------------------------------------- in a Trainer


class Recorder(SoftTargetLossMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 10
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 10))
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets, geometry = batch
        self.seen.append((images.clone(), targets.clone(), geometry.clone()))
        return self.soft_target_loss(self.net(images), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fashion_datamodule(root: str, *, pixels_seed: int = 0, **kwargs: Any) -> FashionMNISTDataModule:
    if not os.path.exists(os.path.join(root, "train-images-idx3-ubyte.gz")):
        g = torch.Generator().manual_seed(pixels_seed)
        for split, n in (("train", 40), ("t10k", 8)):
            images = torch.randint(0, 256, (n, 24, 24), generator=g).to(torch.uint8)
            _write_idx(f"{root}/{split}-images-idx3-ubyte.gz", images)
            _write_idx(f"{root}/{split}-labels-idx1-ubyte.gz", torch.arange(n, dtype=torch.uint8) % 10)
    options: dict[str, Any] = {"val_split": 0, "train_subset": 24, "batch_size": 8, "pad_to": 28, "system_dir": None}
    return FashionMNISTDataModule(root, **{**options, **kwargs})


def fit(callback: AttentiveCutMix, datamodule: Any, epochs: int = 2, **kwargs: Any) -> tuple[L.Trainer, Recorder]:
    model = Recorder()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[callback], **kwargs)
    trainer.fit(model, datamodule=datamodule)
    return trainer, model


def cached_callback(backbone: Counting, **cache: Any) -> AttentiveCutMix:
    teacher = Teacher(module=backbone, layer="act", input_size=28)
    return AttentiveCutMix(teacher=teacher, heatmap_cache=HeatmapCacheConfig(**cache), seed=0)


def test_teacher_runs_once_per_training_sample_and_training_step_sees_the_mix(tmp_path):
    datamodule = fashion_datamodule(str(tmp_path), record_augmentation=True)
    backbone = Counting()
    callback = cached_callback(backbone, grid_size=14)
    trainer, model = fit(callback, datamodule)

    # the callback runs a frozen copy of the module it was given
    assert callback.attention_model.backbone.images_seen == 24  # the training subset, once, not 2 epochs x 24
    cache = callback.cache
    assert cache is not None and cache.grid_size == (14, 14) and len(cache) == 40  # teacher at 56 px
    assert cache.filled.nonzero().flatten().tolist() == datamodule.train_indices.tolist()
    assert callback.batches_mixed == len(model.seen) == 6

    # replay the last batch: un-augmented reference image -> recorded crop and flip -> mix from the cache
    images, targets, geometry = model.seen[-1]
    mix = callback.last_mix
    assert mix is not None
    torch.testing.assert_close(images, mix.mixed)
    torch.testing.assert_close(targets, mix.soft_targets)
    reference = datamodule.train_reference_dataset()
    index = geometry[:, 0].long()
    black = (0.0 - datamodule.mean[0]) / datamodule.std[0]  # the datamodule pads before normalising
    originals = apply_geometry(torch.stack([reference[int(i)][0] for i in index]), geometry, padding_value=black)
    expected_heat = warp_heatmaps(cache.lookup(index), geometry, 7)
    torch.testing.assert_close(mix.partner_heatmaps, expected_heat[mix.permutation])
    mask = AF.topk_cell_mask(expected_heat[mix.permutation], 6, 28)
    torch.testing.assert_close(images, torch.where(mask, originals[mix.permutation], originals), atol=1e-4, rtol=0)
    assert not torch.allclose(images, originals)

    # the cache is derived data: not in the callback state, hence not in checkpoints
    assert set(callback.state_dict()) == {"seed", "batches_seen", "batches_mixed"}
    # a second fit reuses it
    fit(callback, datamodule, epochs=1)
    assert callback.attention_model.backbone.images_seen == 24


def test_cache_path_is_written_then_loaded(tmp_path):
    path = str(tmp_path / "heat.pt")
    first = cached_callback(Counting(), path=path)
    fit(first, fashion_datamodule(str(tmp_path), record_augmentation=True), epochs=1)
    assert first.attention_model.backbone.images_seen == 24 and os.path.isfile(path)
    callback = cached_callback(Counting(), path=path)
    fit(callback, fashion_datamodule(str(tmp_path), record_augmentation=True), epochs=1)
    assert callback.attention_model.backbone.images_seen == 0 and callback.cache is not None
    assert callback.cache.grid_size == (7, 7)  # by default the teacher's own grid
    # another grid does not match the file: recomputed with a warning
    third = cached_callback(Counting(), path=path, grid_size=14)
    datamodule = fashion_datamodule(str(tmp_path), record_augmentation=True)
    with pytest.warns(UserWarning, match="recomputed and overwritten"):
        fit(third, datamodule, epochs=1)
    assert third.attention_model.backbone.images_seen == 24


def test_every_rank_joins_the_decision_to_use_a_cache(tmp_path, monkeypatch):
    """Whether a rank has the file or a previous cache, all ranks decide together (a fill all-gathers)."""
    decisions = []

    def decide(self, decision, all=True):  # noqa: A002 - Lightning's name
        decisions.append(decision)
        return decision

    monkeypatch.setattr(SingleDeviceStrategy, "reduce_boolean_decision", decide)
    datamodule = fashion_datamodule(str(tmp_path), record_augmentation=True)
    callback = cached_callback(Counting(), path=str(tmp_path / "missing" / "heat.pt"))
    fit(callback, datamodule, epochs=1)  # no file yet
    fit(callback, datamodule, epochs=1)  # the previous fit's cache
    assert decisions == [False, True]


def test_cache_path_recomputes_for_another_dataset_of_the_same_size(tmp_path, caplog):
    """Like CIFAR-10 and CIFAR-100 sharing a cache_path: one size, other pixels."""
    path = str(tmp_path / "heat.pt")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = fashion_datamodule(str(tmp_path / "a"), record_augmentation=True)
    second = fashion_datamodule(str(tmp_path / "b"), pixels_seed=1, record_augmentation=True)
    fit(cached_callback(Counting(), path=path), first, epochs=1)
    same = cached_callback(Counting(), path=path)
    with caplog.at_level("INFO"):
        fit(same, first, epochs=1)
    assert same.attention_model.backbone.images_seen == 0
    assert f"loaded 40 cached heatmaps from {path!r}" in caplog.text
    callback = cached_callback(Counting(), path=path)
    with pytest.warns(UserWarning, match=r"heat\.pt': its dataset_pixels differ; it is recomputed and overwritten"):
        fit(callback, second, epochs=1)
    assert callback.attention_model.backbone.images_seen == 24
    assert callback.cache is not None and HeatmapCache.load(path).meta == callback.cache.meta


def test_cache_path_recomputes_for_a_retrained_teacher(tmp_path):
    path = str(tmp_path / "heat.pt")
    datamodule = fashion_datamodule(str(tmp_path), record_augmentation=True)
    fit(cached_callback(Counting(), path=path), datamodule, epochs=1)
    before = HeatmapCache.load(path)
    retrained = Counting()
    nn.init.constant_(retrained.conv.weight, 2.0 / 48)
    callback = cached_callback(retrained, path=path)
    with pytest.warns(UserWarning, match="its teacher_weights differ; it is recomputed and overwritten"):
        fit(callback, datamodule, epochs=1)
    assert callback.attention_model.backbone.images_seen == 24
    after = HeatmapCache.load(path)
    assert callback.cache is not None and after.meta == callback.cache.meta
    assert after.meta["teacher_weights"] != before.meta["teacher_weights"]
    torch.testing.assert_close(after.maps[datamodule.train_indices], 2 * before.maps[datamodule.train_indices])


def test_cache_fingerprint_fields():
    images = TensorDataset(torch.rand(5, 3, 28, 28))
    teacher = AttentionModel(Counting(), "act", input_size=28, grid_size=7)
    base = _fingerprint(teacher, images, 7)
    assert base["num_samples"] == 5 and base["teacher"] == "Counting" and base["layer"] == "act"
    changed = {
        "dataset_pixels": _fingerprint(teacher, TensorDataset(images.tensors[0].flip(0)), 7),
        "grid_size": _fingerprint(teacher, images, 14),
        "input_size": _fingerprint(regrid_attention_model(teacher, 7, 56), images, 7),
    }
    for field, fingerprint in changed.items():
        assert [key for key in base if base[key] != fingerprint[key]] == [field]
    # the middle sample counts too, and the student's normalisation the teacher undoes
    middle = images.tensors[0].clone()
    middle[2] += 1
    assert _fingerprint(teacher, TensorDataset(middle), 7)["dataset_pixels"] != base["dataset_pixels"]
    teacher.set_input_normalization((0.5,), (0.25,))
    assert [key for key, value in _fingerprint(teacher, images, 7).items() if base[key] != value] == ["normalization"]


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_cache_file_is_recomputed_with_a_warning(tmp_path, damage):
    path = tmp_path / "heat.pt"
    datamodule = fashion_datamodule(str(tmp_path), record_augmentation=True)
    fit(cached_callback(Counting(), path=str(path)), datamodule, epochs=1)
    whole = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"heat\.pt' to be a heatmap cache .* cannot be read .* Delete the file"):
        HeatmapCache.load(path)
    callback = cached_callback(Counting(), path=str(path))
    with pytest.warns(UserWarning, match=r"heat\.pt': it is empty, truncated or not a heatmap cache; it is recomputed"):
        fit(callback, datamodule, epochs=1)
    assert callback.attention_model.backbone.images_seen == 24 and int(HeatmapCache.load(path).filled.sum()) == 24


def test_misconfiguration_names_the_fix(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"data\.record_augmentation: true"):
        fit(cached_callback(Counting()), fashion_datamodule(str(tmp_path)), epochs=1)
    loader = DataLoader(TensorDataset(torch.rand(8, 3, 28, 28), torch.arange(8) % 10), batch_size=4)
    trainer = quiet_trainer(callbacks=[cached_callback(Counting())], enable_checkpointing=True)
    with pytest.raises(MisconfigurationException, match="train_reference_dataset"):
        trainer.fit(Recorder(), train_dataloaders=loader)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid_size": 5}, r"`heatmap_cache.grid_size` to be at least the teacher's `grid_size` 7x7, but got 5\."),
        ({"input_size": 0}, r"`input_size` to be None or a positive int, but got 0\."),
        ({"batch_size": 0}, r"`batch_size` to be a positive int, but got 0\."),
    ],
)
def test_bad_cache_arguments_fail_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentiveCutMix(heatmap_cache=HeatmapCacheConfig(**kwargs))


def test_the_callback_reads_the_geometry_at_an_integer_geometry_key():
    """An int `geometry_key` picks that position of a list batch through the callback too."""
    cache = HeatmapCache(2, (7, 7))
    cache.update(torch.arange(2), torch.rand(2, 7, 7))
    callback = AttentiveCutMix(heatmap_cache=HeatmapCacheConfig(geometry_key=3))
    callback._cache = cache
    flipped = geometry([0.0, 0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0, 1.0])
    batch = [torch.zeros(2, 3, 28, 28), torch.tensor([0, 1]), geometry(IDENTITY, IDENTITY), flipped]
    assert torch.equal(callback.cached_heatmaps(batch, 2), cache.warp(flipped, (7, 7)))


def test_batch_geometry_from_lists_and_dicts():
    box = geometry(IDENTITY, IDENTITY)
    assert batch_geometry([None, None, box], 2, 2, "ACM") is box
    assert batch_geometry([None, None, None, box], 3, 2, "ACM") is box  # an int key indexes a list batch
    assert batch_geometry({"image": None, "geo": box}, "geo", 2, "ACM") is box  # a str key keys a dict batch
    # A key of the other kind falls back to that batch kind's default: position 2, "geometry".
    assert batch_geometry([None, None, box], "geo", 2, "ACM") is box
    assert batch_geometry({"image": None, "geometry": box}, 2, 2, "ACM") is box
    with pytest.raises(KeyError, match=r"`geometry_key` 'geometry', but its keys are \['image'\]"):
        batch_geometry({"image": None}, "geometry", 2, "ACM")
    with pytest.raises(
        ValueError, match=r"at position 2 \(`geometry_key`\), but it has none\. .*data\.record_augmentation: true"
    ):
        batch_geometry([None, None], 2, 2, "ACM")
    with pytest.raises(ValueError, match=r"one row per sample, but got 2 != 3\."):
        batch_geometry([None, None, box], "geometry", 3, "ACM")


DDP_SCRIPT = """
import sys
import lightning as L
sys.path.insert(0, {tests!r})
from test_cache import Counting, Recorder, cached_callback, fashion_datamodule

if __name__ == "__main__":
    root, logs, path = sys.argv[1:4]
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        callbacks=[cached_callback(Counting(logs), path=path)], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Recorder(), datamodule=fashion_datamodule(root, record_augmentation=True))
"""


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_ddp_ranks_fill_disjoint_shards_and_share_the_whole_cache(tmp_path):
    root, logs = tmp_path / "data", tmp_path / "logs"
    root.mkdir(), logs.mkdir()
    path = str(tmp_path / "heat.pt")
    fashion_datamodule(str(root))  # writes the data once, before two ranks could race to
    script = tmp_path / "ddp_cache.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    launcher_vars = {"LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GLOBAL_RANK", "RANK"}
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, str(script), str(root), str(logs), path],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    counts = [sum(int(n) for n in open(logs / name).read().split()) for name in sorted(os.listdir(logs))]
    assert counts == [12, 12]  # each rank ran the teacher on its half of the 24 training samples
    shared = HeatmapCache.load(path)
    datamodule = fashion_datamodule(str(root), record_augmentation=True)
    single = cached_callback(Counting())
    fit(single, datamodule, epochs=1)
    assert single.cache is not None
    train = datamodule.train_indices
    assert bool(shared.filled[train].all()) and int(shared.filled.sum()) == 24
    torch.testing.assert_close(shared.maps[train], single.cache.maps[train])
