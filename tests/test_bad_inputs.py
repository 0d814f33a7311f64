"""Bad inputs that had no test yet, each through the public entry point a user would hit.

Every bad input of issue 5 has a test with ``pytest.raises(..., match=...)`` (or ``pytest.warns``)
whose message names the argument and the fix. Most live beside the code they guard; this file
holds the missing ones, mostly through a real ``Trainer``. The inventory (item: where it is tested):

 1. ``top_k`` out of range: test_callbacks::test_bad_arguments_fail_early, test_functional::test_error_top_k_*,
    here test_top_k_for_a_non_square_grid
 2. ``p`` out of [0, 1]: test_callbacks::test_bad_arguments_fail_early
 3. ``alpha`` <= 0 or not finite: test_callbacks::test_bad_arguments_fail_early, test_functional::test_error_alpha
 4. ``grid_size`` not a positive int or pair: test_callbacks::test_bad_arguments_fail_early,
    test_functional::test_error_bad_grid_size
 5. grid finer than the teacher's feature map: test_attention::test_grid_finer_than_feature_map,
    test_functional::test_error_grid_finer_than_features, here test_grid_finer_than_the_teachers_map*
 6. images not 4-D: test_functional::test_error_images_not_4d, test_attention::test_images_must_be_4d,
    here test_images_not_4d_in_a_trainer
 7. channels the teacher cannot take: test_attention::test_bad_channel_count, here
    test_two_channel_images_are_refused_by_an_rgb_teacher; grayscale into an RGB teacher is repeated to
    3 channels with one warning: test_attention::test_grayscale_batch_is_repeated_with_one_warning,
    here test_grayscale_batch_with_an_rgb_teacher_warns_once_and_mixes
 8. a batch of one: test_callbacks::test_batch_of_one_is_left_unmixed_with_one_warning
 9. a tuple batch: test_callbacks::test_tuple_batch_is_refused_with_the_fix
10. a batch that is neither a list nor a dict: here test_batch_without_targets_is_refused_with_the_fix
11. dict batches, configurable keys, a missing key: test_callbacks::test_dict_batches_with_configurable_keys,
    test_callbacks::test_dict_batch_missing_key_names_the_argument, here test_dict_batch_missing_target_key
12. labels outside [0, num_classes): test_callbacks::test_labels_out_of_range_are_refused,
    test_functional::test_error_targets, here test_labels_out_of_range_are_refused_on_unmixed_batches_too
13. soft labels of the wrong width: test_functional::test_error_targets, here test_soft_labels_of_the_wrong_width
14. ``num_classes`` unknown: test_callbacks::test_num_classes_from_module_or_datamodule_or_error
15. unknown model name, close names suggested: test_attention::test_unknown_source_suggests_close_names,
    test_attention::test_unknown_layer_suggests_close_names, test_model::test_unknown_arch_suggests_close_names,
    here test_unknown_attention_name_through_the_callback
16. missing or corrupt weights file: test_attention::test_missing_weights_file, test_corrupt_weights_file,
    test_weights_file_with_python_objects, here test_missing_or_corrupt_attention_weights_through_the_callback
17. dataset folder missing, empty or of the wrong layout: test_data::test_fmnist_missing_files,
    test_data::test_cifar_errors, test_data::test_imagenet_layout_errors, test_data::test_imagenet_no_class_folders
18. unreadable image file: test_data::test_imagenet_corrupt_image_names_the_file
19. constant or NaN heatmap (documented: the first ``top_k`` cells in row-major order):
    test_functional::test_topk_mask_constant_heatmap_selects_the_first_cells,
    test_functional::test_topk_mask_nan_ranks_below_every_number, here test_constant_or_nan_teacher_*
20. non-square images and sizes the grid does not divide: test_functional::test_topk_mask_non_divisible_tiling,
    test_functional::test_error_image_smaller_than_grid, here test_non_square_and_non_divisible_images_*,
    test_images_smaller_than_the_grid
21. integer images into Mixup: test_functional::test_error_mixup_integer_images, here test_uint8_images_into_mixup
22. ``cache_grid_size`` coarser than ``grid_size``: here test_cache_grid_coarser_than_the_grid
23. integer images into the teacher (scaled by 1/255, as floats in [0, 1] would be):
    test_callbacks::test_uint8_images_reach_the_teacher_scaled_like_floats
24. list batches with the targets elsewhere than at index 1 (integer ``target_key``), a str key on a list
    batch, a key that is neither: test_callbacks::test_integer_keys_index_list_batches, here
    test_a_string_key_on_a_list_batch_is_refused
25. a namedtuple batch (the fix keeps its field names): here
    test_a_namedtuple_batch_is_refused_with_a_fix_that_keeps_the_names
26. an empty batch: here test_an_empty_batch_is_left_unmixed_with_the_right_message
27. numpy scalars as arguments, or as ``datamodule.num_classes``: here test_numpy_scalars_are_accepted_as_arguments,
    test_numpy_num_classes_on_the_datamodule_is_found
28. a teacher returning the wrong number of heatmaps: here
    test_a_teacher_returning_the_wrong_number_of_heatmaps_is_named
29. a bool as a size: here test_attention_input_size_is_not_a_bool
30. the student's own backbone as ``attention_model`` (a frozen copy is used; the student trains):
    test_callbacks::test_student_backbone_as_teacher_is_copied_not_frozen
31. label smoothing in both the callback and the loss (one warning):
    test_callbacks::test_label_smoothing_in_both_the_callback_and_the_loss_warns_once, here
    test_smoothing_in_both_the_classifier_and_the_callback_warns
32. two callbacks of one class on one Trainer: test_resume::test_two_callbacks_of_one_class_share_a_trainer_and_resume_each
33. a ``cache_path`` made for another dataset of the same size or another teacher (recomputed with a warning
    naming the file and the fields that differ): test_cache::test_cache_path_recomputes_for_another_dataset_of_the_same_size,
    test_cache::test_cache_path_recomputes_for_a_retrained_teacher
34. an empty or truncated ``cache_path`` file (recomputed with a warning that names it; ``HeatmapCache.load``
    raises naming the file and saying to delete it): test_cache::test_damaged_cache_file_is_recomputed_with_a_warning
35. class indices of shape (B, 1) (taken as indices), integer targets wider than 1, soft targets that are
    negative or do not sum to 1: test_callbacks::test_class_indices_of_shape_b_1_are_mixed_as_indices_through_a_callback,
    test_functional (targets tests)
36. images that require grad (gradients reach both the canvas and the partner):
    test_functional::test_input_gradient_is_that_of_the_mask_blend
37. ``strategy="ddp_spawn"`` (the callbacks pickle; no generator object crosses the spawn):
    test_ddp::test_ddp_spawn_fit_with_the_mixing_callbacks
38. ``RandomMixing``: an empty list, a non-callback, a nested RandomMixing, a method listed twice, a method that
    sets what RandomMixing decides (``p``, smoothing, seed, stops, keys), weights of the wrong length, negative,
    non-finite or all zero: test_random_mixing::test_bad_input_fails_early_with_the_fix; a method also in the
    Trainer's callbacks: test_random_mixing::test_a_method_also_in_the_trainer_is_refused
39. random cells with a heatmap cache, a ``Teacher(source="random")`` with model settings, a monitor without a
    model: test_random_cells::test_bad_random_cells_settings_fail_early
"""

from __future__ import annotations

import math
from collections import namedtuple
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate
from trainers import quiet_trainer

from lightning_acm import functional as AF
from lightning_acm.attention import AttentionModel, Teacher
from lightning_acm.cache import HeatmapCacheConfig
from lightning_acm.callbacks import AttentiveCutMix, CutMix, MixingCallback, MixUp
from lightning_acm.loss import soft_target_cross_entropy

NUM_CLASSES, SIZE, BATCH = 4, 28, 8


class Net(L.LightningModule):
    """Tiny classifier for list or dict batches of any channel count and size; records what training_step saw."""

    def __init__(self, image_key: Any = 0, target_key: Any = 1) -> None:
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.image_key, self.target_key = image_key, target_key
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4, NUM_CLASSES))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch[self.image_key], batch[self.target_key]
        self.seen.append((images.clone(), targets.clone()))
        return soft_target_cross_entropy(self.net(images.float().mean(1, keepdim=True)), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def conv(in_channels: int = 3, value: float = 1.0 / 48) -> nn.Module:
    layer = nn.Conv2d(in_channels, 2, kernel_size=4, stride=4, bias=False)
    nn.init.constant_(layer.weight, value)
    return nn.Sequential(layer, nn.ReLU())


def teacher(value: float = 1.0 / 48, **kwargs: Any) -> nn.Module:
    kwargs.setdefault("input_size", SIZE)
    kwargs.setdefault("grid_size", 7)
    return AttentionModel(conv(value=value), "1", **kwargs)


def data(images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, **kwargs: Any) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2 * BATCH, 3, SIZE, SIZE, generator=g) if images is None else images
    labels = torch.arange(len(images)) % NUM_CLASSES if labels is None else labels
    return DataLoader(TensorDataset(images, labels), batch_size=BATCH, shuffle=False, **kwargs)


def fit(
    callback: MixingCallback, loader: DataLoader, model: Optional[Net] = None, **kwargs: Any
) -> tuple[L.Trainer, Net]:
    model = model or Net()
    trainer = quiet_trainer(callbacks=[callback], **kwargs)
    trainer.fit(model, train_dataloaders=loader)
    return trainer, model


# --------------------------------------------------------------------------- arguments


def test_top_k_for_a_non_square_grid():
    with pytest.raises(ValueError, match=r"Expected `top_k` to be in \[1, 6\] for a 2x3 grid, but got 7\."):
        AttentiveCutMix(teacher=Teacher(grid_size=(2, 3)), top_k=7)


def test_cache_grid_coarser_than_the_grid():
    with pytest.raises(
        ValueError, match=r"`heatmap_cache.grid_size` to be at least the teacher's `grid_size` 7x7, but got 4\."
    ):
        AttentiveCutMix(heatmap_cache=HeatmapCacheConfig(grid_size=4))


# --------------------------------------------------------------------------- the batch


def test_images_not_4d_in_a_trainer():
    flat = data(torch.rand(2 * BATCH, 3 * SIZE * SIZE))
    with pytest.raises(
        ValueError, match=r"expects images of shape \(B, C, H, W\), but got \(8, 2352\)\..*not flattened"
    ):
        fit(CutMix(seed=0), flat)


class ImagesOnly(Dataset):
    def __len__(self) -> int:
        return BATCH

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(3, SIZE, SIZE)


@pytest.mark.parametrize(
    ("collate", "shape"),
    [(None, "Tensor"), (lambda s: [default_collate(s)], "list of length 1")],
    ids=["tensor", "list"],
)
def test_batch_without_targets_is_refused_with_the_fix(collate, shape):
    loader = DataLoader(ImagesOnly(), batch_size=BATCH, collate_fn=collate)
    with pytest.raises(
        TypeError, match=rf"batch list \[images, targets, ...\].*but got {shape}\..*\(image, target\) samples"
    ):
        fit(MixUp(seed=0), loader)


class DictDataset(Dataset):
    def __len__(self) -> int:
        return 2 * BATCH

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixels": torch.rand(3, SIZE, SIZE), "label": i % NUM_CLASSES}


def test_dict_batch_missing_target_key():
    loader = DataLoader(DictDataset(), batch_size=BATCH)
    with pytest.raises(
        KeyError, match=r"no key 'target' \(`target_key`\); its keys are \['label', 'pixels'\]\. Pass `target_key="
    ):
        fit(CutMix(seed=0, image_key="pixels"), loader, Net("pixels", "label"))
    _, model = fit(CutMix(seed=0, image_key="pixels", target_key="label"), loader, Net("pixels", "label"))
    assert model.seen[-1][1].shape == (BATCH, NUM_CLASSES)


def test_labels_out_of_range_are_refused_on_unmixed_batches_too():
    labels = torch.full((2 * BATCH,), -1)
    with pytest.raises(
        ValueError,
        match=r"class-index `targets` in \[0, 4\), but got values in \[-1, -1\] \(training batch 0 of epoch 0\)\. Check `num_classes`",
    ):
        fit(CutMix(p=0.0, seed=0), data(labels=labels))


def test_soft_labels_of_the_wrong_width():
    soft = torch.full((2 * BATCH, 3), 1 / 3)
    with pytest.raises(
        ValueError, match=r"soft `targets` of width `num_classes`, but the widths do not match: 3 != 4\."
    ):
        fit(MixUp(seed=0), data(labels=soft))
    right = torch.full((2 * BATCH, NUM_CLASSES), 1 / NUM_CLASSES)
    callback = MixUp(seed=0)
    _, model = fit(callback, data(labels=right))
    torch.testing.assert_close(model.seen[-1][1], right[:BATCH])  # a uniform label stays uniform when mixed


def test_uint8_images_into_mixup():
    images = (torch.rand(2 * BATCH, 3, SIZE, SIZE) * 255).to(torch.uint8)
    with pytest.raises(TypeError, match=r"floating-point `images` for mixup, but got dtype torch.uint8\. Convert"):
        fit(MixUp(seed=0), data(images))
    callback = CutMix(seed=0)  # pasting needs no arithmetic: integer images are fine
    _, model = fit(callback, data(images))
    assert model.seen[-1][0].dtype == torch.uint8 and torch.equal(model.seen[-1][0], callback.last_mix.mixed)


# --------------------------------------------------------------------------- the teacher


def test_grid_finer_than_the_teachers_map_through_the_callback():
    callback = AttentiveCutMix(
        teacher=Teacher(module=conv(), layer="1", input_size=SIZE, grid_size=14, input_mean=(0.0,), input_std=(1.0,)),
        top_k=6,
        seed=0,
    )
    with pytest.raises(
        ValueError,
        match=r"`grid_size` to be at most the feature map size 7x7 .*but got 14x14\. Use a coarser `grid_size`",
    ):
        fit(callback, data())


def test_grid_finer_than_the_teachers_map_given_a_ready_attention_model():
    callback = AttentiveCutMix(teacher=Teacher(module=teacher(), grid_size=5), top_k=6, seed=0)
    with pytest.raises(
        ValueError,
        match=r"heatmaps of shape \(8, 5, 5\), one per image of the batch on the 5x5 `grid_size`, but got"
        r" \(8, 7, 7\)\. .*build a given `module` with the same `grid_size`",
    ):
        fit(callback, data())


def test_two_channel_images_are_refused_by_an_rgb_teacher():
    callback = AttentiveCutMix(teacher=Teacher(module=teacher()), seed=0)
    with pytest.raises(
        ValueError, match=r"3 channels \(the attention model's `channels`\), but got 2\. Convert the batch"
    ):
        fit(callback, data(torch.rand(2 * BATCH, 2, SIZE, SIZE)))


def test_grayscale_batch_with_an_rgb_teacher_warns_once_and_mixes():
    callback = AttentiveCutMix(teacher=Teacher(module=teacher()), seed=0)
    gray = torch.rand(4 * BATCH, 1, SIZE, SIZE)
    with pytest.warns(UserWarning, match=r"1-channel images; they are repeated to the teacher's 3 channels") as record:
        _, model = fit(callback, data(gray))
    assert sum("1-channel images" in str(w.message) for w in record) == 1  # one notice for 4 batches
    assert callback.batches_mixed == 4 and model.seen[-1][0].shape == (BATCH, 1, SIZE, SIZE)
    # the heatmap of the grayscale image is that of the same image repeated to RGB
    rgb = teacher()(gray[-BATCH:].expand(-1, 3, -1, -1))
    torch.testing.assert_close(callback.last_mix.partner_heatmaps, rgb[callback.last_mix.permutation])


def test_unknown_attention_name_through_the_callback():
    with pytest.raises(ValueError, match=r"but got 'resnet15'\. Did you mean .*'resnet152'"):
        fit(AttentiveCutMix(teacher=Teacher(source="resnet15", input_mean=(0.0,), input_std=(1.0,)), seed=0), data())


def test_missing_or_corrupt_attention_weights_through_the_callback(tmp_path: Path):
    missing = tmp_path / "teacher.pth"
    callback = AttentiveCutMix(
        teacher=Teacher(source="resnet18", weights=str(missing), input_mean=(0.0,), input_std=(1.0,))
    )
    with pytest.raises(
        FileNotFoundError, match=rf"`weights` to be an existing weights file, but '{missing}' does not exist"
    ):
        fit(callback, data())
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    callback = AttentiveCutMix(
        teacher=Teacher(source="resnet18", weights=str(corrupt), input_mean=(0.0,), input_std=(1.0,))
    )
    with pytest.raises(ValueError, match=r"corrupt.pth' to be a file saved with torch.save"):
        fit(callback, data())


@pytest.mark.parametrize("value", [0.0, math.nan], ids=["constant", "nan"])
def test_constant_or_nan_teacher_pastes_the_first_cells_in_row_major_order(value):
    # A zero conv gives a constant (all-zero) heatmap, a NaN conv an all-NaN one: every cell ties.
    callback = AttentiveCutMix(teacher=Teacher(module=teacher(value=value)), top_k=6, seed=0)
    trainer, model = fit(callback, data())
    mix = callback.last_mix
    expected = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    expected[:4, : 6 * 4] = True  # cells (0, 0) .. (0, 5), 4x4 px each
    assert torch.equal(mix.mask, expected.expand(BATCH, 1, SIZE, SIZE))
    torch.testing.assert_close(mix.lam, torch.full((BATCH,), 6 / 49))
    assert torch.isfinite(mix.soft_targets).all() and torch.isfinite(model.seen[-1][0]).all()
    # the logged share of pasted attention is defined too: a heatmap without mass counts as uniform
    assert float(trainer.callback_metrics["mix/pasted_attention"]) == pytest.approx(6 / 49)


# --------------------------------------------------------------------------- image sizes


@pytest.mark.parametrize("size", [(28, 36), (30, 30), (29, 57)], ids=["28x36", "30x30", "29x57"])
@pytest.mark.parametrize("method", ["attentive_cutmix", "cutmix"])
def test_non_square_and_non_divisible_images_are_tiled_as_evenly_as_possible(method, size):
    images = torch.rand(2 * BATCH, 3, *size, generator=torch.Generator().manual_seed(0))
    callback = (
        AttentiveCutMix(teacher=Teacher(module=teacher()), seed=0) if method == "attentive_cutmix" else CutMix(seed=0)
    )
    _, model = fit(callback, data(images))
    mix = callback.last_mix
    x = images[BATCH:]
    assert torch.equal(model.seen[-1][0], torch.where(mix.mask, x[mix.permutation], x))
    torch.testing.assert_close(mix.lam, mix.mask.flatten(1).float().mean(1))
    if method == "attentive_cutmix":
        assert torch.equal(mix.mask, AF.topk_cell_mask(mix.partner_heatmaps, 6, size))
        # every cell is 1 px at most taller or wider than another, so lam stays near 6/49
        cells = AF._expand_grid(torch.arange(49).view(1, 7, 7), size)[0, 0]  # the cell of each pixel
        rows, cols = cells[:, 0] // 7, cells[0] % 7
        assert max(rows.bincount()) - min(rows.bincount()) <= 1 and max(cols.bincount()) - min(cols.bincount()) <= 1
        assert (mix.lam - 6 / 49).abs().max() < 0.05


def test_images_smaller_than_the_grid():
    callback = AttentiveCutMix(teacher=Teacher(module=teacher()), seed=0)
    with pytest.raises(
        ValueError, match=r"`image_size` to be at least the grid size 7x7, but got 6x6\. Use a coarser `grid_size`"
    ):
        fit(callback, data(torch.rand(2 * BATCH, 3, 6, 6)))


class WrongCount(AttentionModel):
    """A user AttentionModel that drops the last image's heatmap."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images)[:-1]


def test_a_teacher_returning_the_wrong_number_of_heatmaps_is_named():
    callback = AttentiveCutMix(teacher=Teacher(module=WrongCount(conv(), "1", input_size=SIZE)), seed=0)
    with pytest.raises(
        ValueError,
        match=r"attention model WrongCount to return heatmaps of shape \(8, 7, 7\), one per"
        r" image of the batch on the 7x7 `grid_size`, but got \(7, 7, 7\)\. Check its forward",
    ):
        fit(callback, data())


def test_attention_input_size_is_not_a_bool():
    with pytest.raises(ValueError, match=r"`input_size` to be None or a positive int, but got True\."):
        AttentiveCutMix(teacher=Teacher(input_size=True))


# --------------------------------------------------------------------------- numpy scalars


def test_numpy_scalars_are_accepted_as_arguments():
    callback = AttentiveCutMix(
        teacher=Teacher(module=teacher(), grid_size=np.int64(7), input_size=np.int64(SIZE)),
        num_classes=np.int64(NUM_CLASSES),
        p=np.float32(1.0),
        top_k=np.int64(6),
        label_smoothing=np.float32(0.1),
        seed=np.int64(0),
        stop_after_step=np.int64(5),
    )
    assert isinstance(callback.num_classes, int) and isinstance(callback.top_k, int) and callback.p == 1.0
    assert isinstance(CutMix(alpha=np.float32(0.5)).alpha, float)
    _, model = fit(callback, data())
    assert model.seen[-1][1].shape == (BATCH, NUM_CLASSES)


class NumpyClasses(L.LightningDataModule):
    num_classes = np.int64(NUM_CLASSES)

    def train_dataloader(self) -> DataLoader:
        return data()


def test_numpy_num_classes_on_the_datamodule_is_found():
    callback = CutMix(seed=0)
    trainer = quiet_trainer(callbacks=[callback])
    model = Net()
    del model.num_classes
    trainer.fit(model, datamodule=NumpyClasses())
    assert callback.last_mix.soft_targets.shape == (BATCH, NUM_CLASSES)


# --------------------------------------------------------------------------- batch layout


def test_a_string_key_on_a_list_batch_is_refused():
    with pytest.raises(
        ValueError,
        match=r"`image_key` to be an int \(a position\) in the list batch of length 2, but got 'image'\. Pass"
        r" `image_key=` with the position in the list \(a str is the key of a dict batch\), or None",
    ):
        fit(CutMix(seed=0, image_key="image"), data())
    with pytest.raises(TypeError, match=r"`target_key` to be None, an int .* or a str .*, but got 1\.5\."):
        CutMix(target_key=1.5)
    with pytest.raises(ValueError, match=r"`image_key` and `target_key` to differ, but both are 0\."):
        CutMix(image_key=0, target_key=0)


Sample = namedtuple("Sample", ["pixels", "label"])


class NamedDataset(Dataset):
    def __len__(self) -> int:
        return 2 * BATCH

    def __getitem__(self, i: int) -> Sample:
        return Sample(torch.rand(3, SIZE, SIZE), i % NUM_CLASSES)


def test_a_namedtuple_batch_is_refused_with_a_fix_that_keeps_the_names():
    with pytest.raises(
        TypeError,
        match=r"namedtuple Sample, which cannot be changed\. Collate it into a dict that keeps the"
        r" field names .*\._asdict\(\)`.* `image_key=` and `target_key=` .*'pixels', 'label'",
    ):
        fit(CutMix(seed=0), DataLoader(NamedDataset(), batch_size=BATCH))
    loader = DataLoader(NamedDataset(), batch_size=BATCH, collate_fn=lambda s: default_collate(s)._asdict())
    _, model = fit(CutMix(seed=0, image_key="pixels", target_key="label"), loader, Net("pixels", "label"))
    assert model.seen[-1][1].shape == (BATCH, NUM_CLASSES)


def test_an_empty_batch_is_left_unmixed_with_the_right_message():
    loader = DataLoader(
        TensorDataset(torch.rand(BATCH, 3, SIZE, SIZE), torch.zeros(BATCH, dtype=torch.long)),
        batch_size=BATCH,
        collate_fn=lambda s: [x[:0] for x in default_collate(s)],
    )
    callback = CutMix(seed=0)
    with pytest.warns(UserWarning, match=r"CutMix: an empty batch has no sample to mix with; it is left unmixed\."):
        _, model = fit(callback, loader)
    assert callback.batches_mixed == 0 and model.seen[-1][0].shape == (0, 3, SIZE, SIZE)


# --------------------------------------------------------------------------- label smoothing twice


def test_smoothing_in_both_the_classifier_and_the_callback_warns():
    from lightning_acm.model import ImageClassifier

    trainer = L.Trainer(accelerator="cpu", logger=False)
    classifier = ImageClassifier(arch="resnet18", num_classes=NUM_CLASSES, small_input=True, label_smoothing=0.1)
    with pytest.warns(
        UserWarning,
        match=r"MixUp\(label_smoothing=0.2\) smooths the targets and ImageClassifier\(label_smoothing=0.1\)"
        r" smooths them again in its loss\. Set one of the two to 0\.",
    ):
        MixUp(label_smoothing=0.2).setup(trainer, classifier, "fit")
