"""Tests of lightning_acm.visualize: the rendering, the MixVisualizer and the pasted-attention diagnostic."""

from __future__ import annotations

import os
from typing import Any, Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from PIL import Image

from lightning_acm import functional as AF
from lightning_acm.attention import attention_model_from_module
from lightning_acm.callbacks import AttentiveCutMix, CutMix, MixResult, MixUp
from lightning_acm.loss import SoftTargetLossMixin
from lightning_acm.visualize import MixVisualizer, PastedAttentionMonitor, render_mix, render_mix_grid

NUM_CLASSES = 4
SIZE = 28  # 7 cells of 4 px
WHITE = torch.tensor([255, 255, 255], dtype=torch.uint8)


# --------------------------------------------------------------------------- helpers


class Classifier(SoftTargetLossMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, NUM_CLASSES))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.soft_target_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def tiny_attention() -> nn.Module:
    """A 7x7 heatmap at 28 px that follows the image's brightness."""
    conv = nn.Conv2d(3, 2, kernel_size=4, stride=4, bias=False)
    nn.init.constant_(conv.weight, 1.0 / 48)
    return attention_model_from_module(nn.Sequential(conv, nn.ReLU()), "1", input_size=SIZE, grid_size=7)


def loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, SIZE, SIZE, generator=g)
    images[:, :, 4:12, 8:16] += 1.0  # a bright "object" for the teacher to find
    return DataLoader(TensorDataset(images, torch.arange(n) % NUM_CLASSES), batch_size=batch_size)


def fit(callbacks: list[Any], logger: Any = False, root: Optional[str] = None, **kwargs: Any) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=root,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(Classifier(), train_dataloaders=loader())
    return trainer


def acm(**kwargs: Any) -> AttentiveCutMix:
    return AttentiveCutMix(attention_model=tiny_attention(), input_mean=(0.0,), input_std=(1.0,), seed=0, **kwargs)


def one_cell_batch(cells: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """One 28 px sample whose partner's hottest cells are ``cells`` (row, col of a 7x7 grid)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, SIZE, SIZE, generator=g) * 0.5  # never white, so outlines stand out
    heat = torch.zeros(2, 7, 7)
    for row, col in cells:
        heat[:, row, col] = 1.0
    permutation = torch.tensor([1, 0])
    mask = AF.topk_cell_mask(heat[permutation], len(cells), SIZE)
    mixed = AF.paste(images, mask, permutation)
    return {
        "partners": images[permutation],
        "canvases": images,
        "mixed": mixed,
        "lam": mask.float().mean((1, 2, 3)),
        "partner_heatmaps": heat[permutation],
        "mask": mask,
    }


def changed_pixels(batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """``(H', W')`` pixels of the picture that the outline changes (drawn without heatmap overlay)."""
    plain = {k: v for k, v in batch.items() if k != "mask"}
    with_outline = render_mix_grid(**batch, alpha=0.0, scale=1, max_samples=1, **kwargs)
    without = render_mix_grid(**plain, alpha=0.0, scale=1, max_samples=1, **kwargs)
    assert with_outline.shape == without.shape
    changed = (with_outline != without).any(dim=0)
    assert (with_outline.permute(1, 2, 0)[changed] == WHITE).all()
    return changed


# --------------------------------------------------------------------------- render_mix_grid


def test_render_returns_uint8_chw_with_one_row_per_sample():
    batch = one_cell_batch([(1, 2)])
    image = render_mix_grid(**batch, scale=1)
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    two_rows = image.shape[1]
    one_row = render_mix_grid(**batch, scale=1, max_samples=1).shape[1]
    assert two_rows - one_row == SIZE + 2  # a row is the image plus the padding
    assert render_mix_grid(**batch, scale=2, max_samples=1).shape[1] - one_row == SIZE


def test_outline_is_drawn_around_the_chosen_cell_of_the_partner():
    changed = changed_pixels(one_cell_batch([(1, 2)]))
    rows, cols = changed.nonzero(as_tuple=True)
    # A 1 px ring around the 4x4 cell (row 1, col 2): 12 pixels, in the first panel (from x = 2).
    assert changed.sum() == 12
    assert (int(cols.min()), int(cols.max())) == (2 + 8, 2 + 11)
    assert int(rows.max()) - int(rows.min()) == 3


def test_each_cell_of_a_union_is_outlined_but_a_box_only_around_its_border():
    cells = one_cell_batch([(1, 2), (1, 3)])
    assert changed_pixels(cells).sum() == 2 * 12  # the shared edge is drawn in both cells
    box = dict(cells)
    box["partner_heatmaps"] = torch.rand(2, 7, 7)  # not the cells' heatmap: a box, not a union of cells
    box["mask"] = torch.zeros(2, 1, SIZE, SIZE, dtype=torch.bool)
    box["mask"][:, :, 5:9, 9:17] = True
    assert changed_pixels(box).sum() == 2 * 8 + 2 * 4 - 4


def test_outline_uses_the_requested_colour():
    batch = one_cell_batch([(3, 3)])
    red = render_mix_grid(**batch, alpha=0.0, scale=1, max_samples=1, outline_color=(255, 0, 0))
    white = render_mix_grid(**batch, alpha=0.0, scale=1, max_samples=1)
    changed = (red != white).any(dim=0)
    assert changed.sum() == 12
    assert (red.permute(1, 2, 0)[changed] == torch.tensor([255, 0, 0], dtype=torch.uint8)).all()


def test_heatmap_overlay_changes_the_partner_panel_only():
    batch = one_cell_batch([(1, 2)])
    plain = render_mix_grid(**batch, alpha=0.0, scale=1)
    overlaid = render_mix_grid(**batch, alpha=0.5, scale=1)
    changed = (plain != overlaid).any(dim=0)
    cols = changed.nonzero(as_tuple=True)[1]
    assert changed.any() and int(cols.max()) < 2 + SIZE


def test_normalised_uint8_and_unit_float_images_render_the_same():
    g = torch.Generator().manual_seed(1)
    uint8 = torch.randint(0, 256, (2, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    unit = uint8.float() / 255
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normalised = (unit - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    lam = torch.zeros(2)
    reference = render_mix_grid(uint8, uint8, uint8, lam)
    assert torch.equal(render_mix_grid(unit, unit, unit, lam), reference)
    assert torch.equal(render_mix_grid(normalised, normalised, normalised, lam, mean=mean, std=std), reference)


def test_grayscale_images_are_drawn_in_rgb():
    gray = torch.rand(2, 1, SIZE, SIZE)
    image = render_mix_grid(gray, gray, gray, torch.zeros(2), partner_labels=torch.tensor([0, 1]))
    assert image.shape[0] == 3


def test_labels_widen_the_text_strip():
    batch = one_cell_batch([(1, 2)])
    bare = render_mix_grid(**batch, scale=1)
    named = render_mix_grid(
        **batch,
        scale=1,
        partner_labels=torch.tensor([[0.1, 0.9], [1.0, 0.0]]),
        canvas_labels=torch.tensor([0, 1]),
        class_names=["a rather long class name", "another long class name"],
    )
    assert named.shape[1] == bare.shape[1] and named.shape[2] > bare.shape[2]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"max_samples": 0}, "`max_samples` to be a positive int"),
        ({"alpha": 1.5}, r"`alpha` to be in \[0, 1\]"),
        ({"scale": 0}, "`scale` to be None or a positive int"),
        ({"canvases": torch.rand(2, 3, SIZE, 14)}, "`canvases` to have the shape of `partners`"),
        ({"lam": torch.zeros(3)}, r"`lam` to have shape \(2,\)"),
        ({"mask": torch.zeros(2, SIZE, SIZE, dtype=torch.bool)}, r"`mask` to have shape \(2, 1, 28, 28\)"),
        ({"partner_heatmaps": torch.rand(3, 7, 7)}, "one map per image"),
        ({"partners": torch.rand(2, 4, SIZE, SIZE)}, "`partners` to have 1 or 3 channels"),
        ({"mixed": torch.rand(3, SIZE, SIZE)}, r"`mixed` to be a batch \(B, C, H, W\)"),
        ({"partner_labels": torch.zeros(2, 2, 2)}, "`partner_labels` to be class indices"),
        ({"mean": (0.1, 0.2), "std": (1.0,)}, "`mean` to have 1 or 3 values"),
    ],
)
def test_render_rejects_bad_arguments(change: dict[str, Any], match: str):
    batch: dict[str, Any] = dict(one_cell_batch([(1, 2)]))
    batch.update(change)
    with pytest.raises(ValueError, match=match):
        render_mix_grid(**batch)


def test_render_mix_needs_the_source_and_uses_the_permutation():
    batch = one_cell_batch([(1, 2)])
    result = MixResult(
        batch["mixed"], torch.zeros(2, 2), batch["lam"], torch.tensor([1, 0]), batch["mask"], batch["partner_heatmaps"]
    )
    with pytest.raises(ValueError, match="keep_source = True"):
        render_mix(result)
    result.source, result.source_targets = batch["canvases"], torch.tensor([0, 1])
    expected = render_mix_grid(**batch, partner_labels=torch.tensor([1, 0]), canvas_labels=torch.tensor([0, 1]))
    assert torch.equal(render_mix(result), expected)
    with pytest.raises(ValueError, match="`max_samples` to be a positive int"):
        render_mix(result, max_samples=0)


# --------------------------------------------------------------------------- MixVisualizer in a Trainer


def test_visualizer_logs_images_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    fit([acm(), MixVisualizer(every_n_steps=2, max_samples=3)], logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "mix/mixes" in events.Tags()["images"]
    pictures = events.Images("mix/mixes")
    assert [p.step for p in pictures] == [1, 3]  # batches 0 and 2 of 4, logged after their optimizer step
    assert pictures[0].height > 3 * SIZE  # three rows
    assert not os.path.exists(os.path.join(logger.log_dir, "mixes"))


def test_visualizer_writes_png_files_for_a_logger_without_images(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = fit([CutMix(seed=0), MixVisualizer(every_n_steps=3, max_samples=2)], logger=logger)
    folder = os.path.join(trainer.log_dir, "mixes")
    names = sorted(os.listdir(folder))
    assert names == ["mix_mixes_step0000001.png", "mix_mixes_step0000004.png"]
    with Image.open(os.path.join(folder, names[0])) as image:
        assert image.mode == "RGB" and image.height > 2 * SIZE


def test_visualizer_without_logger_writes_to_the_root_dir_and_skips_unmixed_batches(tmp_path):
    mixer = MixUp(seed=0, p=0.5, log_prefix="mixup")
    fit([mixer, MixVisualizer(every_n_steps=100)], root=str(tmp_path))
    names = os.listdir(tmp_path / "mixes")
    assert len(names) == 1 and names[0].startswith("mixup_mixes_step")  # the first *mixed* batch
    assert mixer.keep_source


def test_visualizer_draws_nothing_off_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda self: False))
    mixer = CutMix(seed=0)
    fit([mixer, MixVisualizer(every_n_steps=1)], root=str(tmp_path))
    assert not (tmp_path / "mixes").exists()
    assert not mixer.keep_source and mixer.last_mix is not None and mixer.last_mix.source is None


def test_mixing_callbacks_keep_no_source_by_default():
    mixer = CutMix(seed=0)
    fit([mixer])
    assert mixer.last_mix is not None and mixer.last_mix.source is None and mixer.last_mix.source_targets is None


def test_visualizer_and_monitor_need_a_mixing_callback():
    for callback in (MixVisualizer(), PastedAttentionMonitor(attention_model=tiny_attention())):
        with pytest.raises(MisconfigurationException, match="Add AttentiveCutMix, CutMix or MixUp"):
            fit([callback])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: MixVisualizer(every_n_steps=0), "`every_n_steps` to be a positive int"),
        (lambda: MixVisualizer(max_samples=-1), "`max_samples` to be a positive int"),
        (lambda: MixVisualizer(alpha=2.0), r"`alpha` to be in \[0, 1\]"),
        (lambda: MixVisualizer(mean=(0.5,)), "`mean` and `std` to be given together"),
        (lambda: PastedAttentionMonitor(every_n_steps=0), "`every_n_steps` to be a positive int"),
        (lambda: PastedAttentionMonitor(reduction="sum"), "`reduction` to be one of"),
        (lambda: PastedAttentionMonitor(grid_size=0), "`grid_size` to be positive"),
        (lambda: PastedAttentionMonitor(attention_input_size=0), "`attention_input_size` to be a positive int"),
        (lambda: PastedAttentionMonitor(input_std=(1.0,)), "`input_mean` and `input_std` to be given together"),
    ],
)
def test_callbacks_reject_bad_arguments(make: Any, match: str):
    with pytest.raises(ValueError, match=match):
        make()


def test_monitor_rejects_a_module_that_is_not_a_module_and_a_plain_module_without_layer():
    with pytest.raises(TypeError, match="`attention_model` to be an nn.Module"):
        PastedAttentionMonitor(attention_model="resnet")  # type: ignore[arg-type]
    plain = nn.Sequential(nn.Conv2d(3, 2, 4, stride=4))
    with pytest.raises(MisconfigurationException, match="`attention_layer` must name the layer"):
        fit([CutMix(seed=0), PastedAttentionMonitor(attention_model=plain)])


# --------------------------------------------------------------------------- pasted_attention diagnostic


def test_attentive_cutmix_logs_pasted_attention_without_extra_teacher_runs():
    mixer = acm()
    trainer = fit([mixer])
    share = float(trainer.callback_metrics["mix/pasted_attention"])
    # The top 6 of 49 cells hold more than their area's share of the mass (the bright object).
    assert 6 / 49 < share <= 1.0
    assert share > float(trainer.callback_metrics["mix/lam"]) * 2


def test_mixup_logs_lam_as_the_pasted_attention():
    trainer = fit([MixUp(seed=0)])
    metrics = trainer.callback_metrics
    assert float(metrics["mix/pasted_attention"]) == pytest.approx(float(metrics["mix/lam"]))


def test_cutmix_logs_pasted_attention_only_with_the_monitor():
    assert "mix/pasted_attention" not in fit([CutMix(seed=0)]).callback_metrics

    mixer = CutMix(seed=0)
    calls: list[int] = []
    teacher = tiny_attention()
    teacher.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    monitor = PastedAttentionMonitor(attention_model=teacher, input_mean=(0.0,), input_std=(1.0,), every_n_steps=2)
    trainer = fit([mixer, monitor])
    share = float(trainer.callback_metrics["mix/pasted_attention"])
    assert 0.0 <= share <= 1.0
    assert calls == [8, 8]  # batches 0 and 2 of 4, on the unmixed images
    assert mixer.keep_source


def test_monitor_share_matches_the_functional_on_the_unmixed_partners():
    mixer = CutMix(seed=0)
    teacher = tiny_attention()
    trainer = fit([mixer, PastedAttentionMonitor(attention_model=teacher, input_mean=(0.0,), input_std=(1.0,))])
    result = mixer.last_mix
    assert result is not None and result.source is not None and result.partner_heatmaps is not None
    expected = AF.pasted_attention_share(teacher(result.source)[result.permutation], result.mask)
    assert torch.allclose(result.pasted_attention(), expected)
    assert 0.0 <= float(trainer.callback_metrics["mix/pasted_attention"]) <= 1.0


def test_monitor_lends_heatmaps_to_the_visualizer_in_any_order(tmp_path):
    for order in (0, 1):
        mixer = CutMix(seed=0)
        monitor = PastedAttentionMonitor(attention_model=tiny_attention(), input_mean=(0.0,), input_std=(1.0,))
        visualizer = MixVisualizer(every_n_steps=1, max_samples=2)
        extra = [visualizer, monitor] if order == 0 else [monitor, visualizer]
        trainer = fit([mixer, *extra], root=str(tmp_path / str(order)))
        assert mixer.last_mix is not None and mixer.last_mix.partner_heatmaps is not None
        assert "mix/pasted_attention" in trainer.callback_metrics
        assert len(os.listdir(tmp_path / str(order) / "mixes")) == 4


def test_monitor_warns_when_the_mixing_callbacks_measure_themselves():
    with pytest.warns(UserWarning, match="nothing to measure"):
        fit([acm(), PastedAttentionMonitor(attention_model=tiny_attention())])
