"""Tests of lightning_acm.visualize: the rendering, the MixVisualizer and the pasted-attention diagnostic."""

from __future__ import annotations

import os
from typing import Any, Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trainers import quiet_trainer

from lightning_acm import functional as AF
from lightning_acm.attention import AttentionModel, Teacher
from lightning_acm.callbacks import AttentiveCutMix, CutMix, MixResult, MixUp
from lightning_acm.loss import SoftTargetLossMixin
from lightning_acm.visualize import MixVisualizer, PastedAttentionMonitor, _render_mix, render_mix_grid

NUM_CLASSES = 4
SIZE = 28  # 7 cells of 4 px
CAPTION = 14  # the caption strip under each panel
RED = torch.tensor([255, 0, 0], dtype=torch.uint8)


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
    return AttentionModel(nn.Sequential(conv, nn.ReLU()), "1", input_size=SIZE, grid_size=7)


def loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, SIZE, SIZE, generator=g)
    images[:, :, 4:12, 8:16] += 1.0  # a bright "object" for the teacher to find
    return DataLoader(TensorDataset(images, torch.arange(n) % NUM_CLASSES), batch_size=batch_size)


def fit(callbacks: list[Any], logger: Any = False, root: Optional[str] = None, **kwargs: Any) -> L.Trainer:
    trainer = quiet_trainer(callbacks=callbacks, logger=logger, default_root_dir=root, **kwargs)
    trainer.fit(Classifier(), train_dataloaders=loader())
    return trainer


def acm(**kwargs: Any) -> AttentiveCutMix:
    return AttentiveCutMix(
        teacher=Teacher(module=tiny_attention(), input_mean=(0.0,), input_std=(1.0,)), seed=0, **kwargs
    )


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


def panel(image: torch.Tensor, row: int, column: int, size: int = SIZE) -> torch.Tensor:
    """Panel ``column`` (0: x_A, 1: x_B, 2: mixed) of sample ``row``, without its caption (scale 1)."""
    top, left = 2 + row * (size + CAPTION + 2), 2 + column * (size + 2)
    return image[:, top : top + size, left : left + size]


def changed_pixels(batch: dict[str, torch.Tensor], **kwargs: Any) -> list[torch.Tensor]:
    """``(H, W)`` pixels of each panel of the first row that the outline changes (no heatmap overlay)."""
    plain = {k: v for k, v in batch.items() if k != "mask"}
    with_outline = render_mix_grid(**batch, alpha=0.0, scale=1, max_samples=1, **kwargs)
    without = render_mix_grid(**plain, alpha=0.0, scale=1, max_samples=1, **kwargs)
    assert with_outline.shape == without.shape
    return [(panel(with_outline, 0, c) != panel(without, 0, c)).any(dim=0) for c in range(3)]


def ring(top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """``(SIZE, SIZE)`` the 1 px border of the box ``[top, bottom) x [left, right)``."""
    box = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    box[top:bottom, left:right] = True
    box[top + 1 : bottom - 1, left + 1 : right - 1] = False
    return box


# --------------------------------------------------------------------------- render_mix_grid


def test_render_returns_uint8_chw_three_panels_per_sample():
    batch = one_cell_batch([(1, 2)])
    image = render_mix_grid(**batch, scale=1)
    assert image.dtype == torch.uint8
    assert tuple(image.shape) == (3, 2 * (SIZE + CAPTION + 2) + 2, 3 * (SIZE + 2) + 2)
    assert tuple(render_mix_grid(**batch, scale=2, max_samples=1).shape) == (3, 2 * SIZE + CAPTION + 4, 6 * SIZE + 8)
    assert render_mix_grid(**batch).shape[2] == 3 * (4 * SIZE + 2) + 2  # 28 px upscaled x4 to at least 96 px


def test_outline_marks_the_pasted_cell_on_the_partner_and_the_mix():
    partner, canvas, mixed = changed_pixels(one_cell_batch([(1, 2)]))
    cell = ring(4, 8, 8, 12)  # cell (row 1, col 2) of 4 px cells
    assert torch.equal(partner, cell) and torch.equal(mixed, cell)
    assert not canvas.any()


def test_outline_marks_a_box_in_the_requested_colour():
    batch = dict(one_cell_batch([(1, 2)]))
    batch["partner_heatmaps"] = torch.rand(2, 7, 7)
    batch["mask"] = torch.zeros(2, 1, SIZE, SIZE, dtype=torch.bool)
    batch["mask"][:, :, 5:9, 9:17] = True
    partner, _, mixed = changed_pixels(batch, outline_color=(255, 0, 0))
    assert torch.equal(partner, ring(5, 9, 9, 17)) and torch.equal(mixed, ring(5, 9, 9, 17))
    image = render_mix_grid(**batch, alpha=0.0, scale=1, max_samples=1, outline_color=(255, 0, 0))
    assert (panel(image, 0, 0).permute(1, 2, 0)[partner] == RED).all()


def test_heatmap_overlay_changes_the_partner_panel_only():
    batch = one_cell_batch([(1, 2)])
    plain = render_mix_grid(**batch, alpha=0.0, scale=1)
    overlaid = render_mix_grid(**batch, alpha=0.5, scale=1)
    for row in range(2):
        assert not torch.equal(panel(plain, row, 0), panel(overlaid, row, 0))
    assert torch.equal(plain[:, :, 2 + SIZE :], overlaid[:, :, 2 + SIZE :])


def test_normalised_and_integer_images_render_as_unit_floats():
    g = torch.Generator().manual_seed(1)
    uint8 = torch.randint(0, 256, (2, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    unit = uint8.float() / 255
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    normalised = (unit - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    lam = torch.zeros(2)
    reference = render_mix_grid(unit, unit, unit, lam)
    assert torch.equal(render_mix_grid(normalised, normalised, normalised, lam, mean=mean, std=std), reference)
    # Integer images are scaled by their dtype's maximum, as ToDtype(scale=True); mean/std are for floats.
    assert torch.equal(render_mix_grid(uint8, uint8, uint8, lam, mean=mean, std=std), reference)
    int16 = torch.randint(0, 32768, (2, 3, SIZE, SIZE), generator=g, dtype=torch.int16)
    as_float = int16.float() / 32767
    assert torch.equal(render_mix_grid(int16, int16, int16, lam), render_mix_grid(as_float, as_float, as_float, lam))


def test_grayscale_images_are_drawn_in_rgb():
    gray = torch.rand(2, 1, SIZE, SIZE)
    image = render_mix_grid(gray, gray, gray, torch.zeros(2), partner_labels=torch.tensor([0, 1]))
    assert image.shape[0] == 3


def test_labels_and_lam_are_captions_under_the_panels():
    batch = one_cell_batch([(1, 2)])
    size = 4 * SIZE  # the default upscaling, wide enough for the captions
    bare = render_mix_grid(**batch)
    named = render_mix_grid(
        **batch,
        partner_labels=torch.tensor([[0.1, 0.9], [1.0, 0.0]]),
        canvas_labels=torch.tensor([0, 1]),
        class_names=["shirt", "boot"],
    )
    other_lam = render_mix_grid(**{**batch, "lam": batch["lam"] + 0.5})
    assert named.shape == bare.shape == other_lam.shape
    caption_rows = torch.zeros(named.shape[1], dtype=torch.bool)
    for row in range(2):
        top = 2 + row * (size + CAPTION + 2) + size
        caption_rows[top : top + CAPTION] = True
    sources, mix = slice(0, 2 * (size + 2)), slice(2 * (size + 2), None)
    for other, changed in ((named, sources), (other_lam, mix)):
        differs = (other != bare).any(dim=0)
        assert not differs[~caption_rows].any()  # the images are untouched
        assert differs[caption_rows, changed].any()
        assert differs[caption_rows].sum() == differs[caption_rows, changed].sum()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"max_samples": 0}, "`max_samples` to be a positive int"),
        ({"alpha": 1.5}, r"`alpha` to be in \[0, 1\]"),
        ({"scale": 0}, "`scale` to be None or a positive int"),
        (
            {"canvases": torch.rand(2, 3, SIZE, 14)},
            r"`canvases` to have shape \(2, 3, 28, 28\), but got shape \(2, 3, 28, 14\)",
        ),
        ({"lam": torch.zeros(3)}, r"`lam` to have shape \(2,\)"),
        ({"mask": torch.zeros(2, SIZE, SIZE, dtype=torch.bool)}, r"`mask` to have shape \(2, 1, 28, 28\)"),
        ({"partner_heatmaps": torch.rand(3, 7, 7)}, "one map per image"),
        ({"partner_heatmaps": torch.rand(2, 49)}, r"`partner_heatmaps` to have shape \(2, gh, gw\)"),
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


def test_render_mix_uses_the_permutation_and_changes_nothing():
    batch = one_cell_batch([(1, 2)])
    heat = batch["partner_heatmaps"]
    result = MixResult(batch["mixed"], torch.zeros(2, 2), batch["lam"], torch.tensor([1, 0]), batch["mask"])
    result.source, result.source_targets = batch["canvases"], torch.tensor([0, 1])
    expected = render_mix_grid(**batch, partner_labels=torch.tensor([1, 0]), canvas_labels=torch.tensor([0, 1]))
    assert torch.equal(_render_mix(result, partner_heatmaps=heat), expected)
    assert result.partner_heatmaps is None
    with pytest.raises(ValueError, match="`max_samples` to be a positive int"):
        _render_mix(result, max_samples=0)


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


def test_visualizer_draws_nothing_off_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(L.Trainer, "is_global_zero", property(lambda self: False))
    mixer = CutMix(seed=0)
    fit([mixer, MixVisualizer(every_n_steps=1)], root=str(tmp_path))
    assert not (tmp_path / "mixes").exists()


class BatchRecorder(L.Callback):
    """Keeps the images and targets of each training batch as they arrive (put it before the mixer)."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.seen.append((batch[0], batch[1]))


def test_last_mix_holds_the_unmixed_batch_itself_and_is_read_only():
    recorder, mixer = BatchRecorder(), CutMix(seed=0)
    fit([recorder, mixer])
    result = mixer.last_mix
    assert result is not None
    images, targets = recorder.seen[-1]
    assert result.source is images and result.source_targets is targets  # references, no copy
    assert not torch.equal(result.mixed, images)
    with pytest.raises(AttributeError):
        mixer.last_mix = None  # type: ignore[misc]


def test_monitor_and_visualizer_change_nothing_in_the_mixing_callback(tmp_path):
    alone = CutMix(seed=0)
    fit([alone])
    watched = CutMix(seed=0)
    monitor = PastedAttentionMonitor(teacher=Teacher(module=tiny_attention(), input_mean=(0.0,), input_std=(1.0,)))
    fit([watched, monitor, MixVisualizer(every_n_steps=1)], root=str(tmp_path))
    assert watched.last_mix is not None and alone.last_mix is not None
    assert watched.last_mix.partner_heatmaps is None  # the monitor keeps its heatmaps to itself
    assert sorted(vars(watched)) == sorted(vars(alone))
    assert torch.equal(watched.last_mix.mixed, alone.last_mix.mixed)
    assert watched.state_dict() == alone.state_dict()


def test_visualizer_and_monitor_need_a_mixing_callback():
    for callback in (MixVisualizer(), PastedAttentionMonitor(teacher=Teacher(module=tiny_attention()))):
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
        (lambda: PastedAttentionMonitor(teacher=Teacher(reduction="sum")), "`reduction` to be one of"),
        (
            lambda: PastedAttentionMonitor(teacher=Teacher(input_std=(1.0,))),
            "`input_mean` and `input_std` to be given together",
        ),
    ],
)
def test_callbacks_reject_bad_arguments(make: Any, match: str):
    with pytest.raises(ValueError, match=match):
        make()


def test_monitor_rejects_a_teacher_that_is_not_a_teacher():
    with pytest.raises(TypeError, match="`teacher` to be a str or a Teacher, but got Sequential"):
        PastedAttentionMonitor(teacher=nn.Sequential())  # type: ignore[arg-type]


def test_monitor_builds_its_teacher_with_the_datamodule_normalisation():
    class Data(L.LightningDataModule):
        mean, std = (0.5,), (0.25,)

        def train_dataloader(self) -> DataLoader:
            return loader()

    class Peek(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.stats = [monitor._model.input_mean.flatten().tolist(), monitor._model.input_std.flatten().tolist()]

    monitor, peek = PastedAttentionMonitor(teacher=Teacher(module=tiny_attention())), Peek()
    trainer = quiet_trainer(max_steps=1, callbacks=[CutMix(seed=0), monitor, peek])
    trainer.fit(Classifier(), datamodule=Data())
    assert peek.stats == [[0.5], [0.25]]


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
    monitor = PastedAttentionMonitor(
        teacher=Teacher(module=teacher, input_mean=(0.0,), input_std=(1.0,)), every_n_steps=2
    )
    trainer = fit([mixer, monitor])
    share = float(trainer.callback_metrics["mix/pasted_attention"])
    assert 0.0 <= share <= 1.0
    assert calls == [8, 8]  # batches 0 and 2 of 4, on the unmixed images


def test_monitor_share_matches_the_functional_on_the_unmixed_partners():
    mixer = CutMix(seed=0)
    teacher = tiny_attention()
    monitor = PastedAttentionMonitor(teacher=Teacher(module=teacher, input_mean=(0.0,), input_std=(1.0,)))
    trainer = fit([mixer, monitor], limit_train_batches=1)
    result = mixer.last_mix
    assert result is not None and result.source is not None and result.mask is not None
    heatmaps = monitor.partner_heatmaps(result)
    assert heatmaps is not None and torch.allclose(heatmaps, teacher(result.source)[result.permutation])
    expected = AF.pasted_attention_share(heatmaps, result.mask).mean()
    assert float(trainer.callback_metrics["mix/pasted_attention"]) == pytest.approx(float(expected))


def test_monitor_lends_heatmaps_to_the_visualizer_in_any_order(tmp_path):
    for order in (0, 1):
        mixer = CutMix(seed=0)
        calls: list[int] = []
        teacher = tiny_attention()
        teacher.register_forward_hook(lambda module, args, output, calls=calls: calls.append(args[0].shape[0]))
        monitor = PastedAttentionMonitor(teacher=Teacher(module=teacher, input_mean=(0.0,), input_std=(1.0,)))
        visualizer = MixVisualizer(every_n_steps=1, max_samples=2)
        extra = [visualizer, monitor] if order == 0 else [monitor, visualizer]
        trainer = fit([mixer, *extra], root=str(tmp_path / str(order)))
        assert "mix/pasted_attention" in trainer.callback_metrics
        assert calls == [8] * 4  # one teacher run per batch, shared by the monitor and the visualizer
        assert len(os.listdir(tmp_path / str(order) / "mixes")) == 4


def test_monitor_warns_when_the_mixing_callbacks_measure_themselves():
    with pytest.warns(UserWarning, match="nothing to measure"):
        fit([acm(), PastedAttentionMonitor(teacher=Teacher(module=tiny_attention()))])
