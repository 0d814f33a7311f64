"""The random-cells control: Attentive CutMix's paste with uniformly random cells and no teacher."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trainers import quiet_trainer

from lightning_acm.attention import Teacher
from lightning_acm.callbacks import AttentiveCutMix
from lightning_acm.visualize import PastedAttentionMonitor
from tests.test_callbacks import NUM_CLASSES, SIZE, Recorder, fit, loader, tiny_attention, tiny_teacher


def record_cells(callback: AttentiveCutMix) -> list[torch.Tensor]:
    """Patch ``callback.mix`` to keep the ``(B, 49)`` pasted-cell indicator of every mixed batch."""
    cells: list[torch.Tensor] = []
    original = callback.mix

    def spy(*args: Any) -> Any:
        result = original(*args)
        cells.append(result.mask[:, 0, ::4, ::4].flatten(1))
        return result

    callback.mix = spy  # type: ignore[method-assign]
    return cells


def test_random_cells_build_no_teacher_and_paste_like_attentive_cutmix(monkeypatch):
    def no_build(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("random cells must not build a teacher")

    monkeypatch.setattr(Teacher, "build", no_build)
    callback = AttentiveCutMix(teacher="random", num_classes=NUM_CLASSES, seed=0)
    data = loader()
    x, y = list(data)[-1]
    _, model = fit(callback, data=data)
    assert callback.attention_model is None
    mix = callback.last_mix
    images, targets = model.seen[-1]
    assert torch.equal(images, torch.where(mix.mask, x[mix.permutation], x))
    assert torch.equal(mix.mask[:, 0, ::4, ::4].flatten(1).sum(1), torch.full((8,), 6))
    torch.testing.assert_close(mix.lam, torch.full((8,), 6 / 49))
    one_hot = nn.functional.one_hot(y, NUM_CLASSES).float()
    torch.testing.assert_close(targets, mix.lam[:, None] * one_hot[mix.permutation] + (1 - mix.lam[:, None]) * one_hot)
    assert mix.partner_heatmaps is None and mix.pasted_attention() is None  # random scores are not attention
    assert "region=cells" in repr(mix) and mix.cell_indices.shape == (8, 6)


def test_random_cells_are_uniform_over_many_draws():
    callback = AttentiveCutMix(teacher="random", top_k=6, num_classes=NUM_CLASSES, seed=1)
    cells = record_cells(callback)
    fit(callback, data=loader(n=400, batch_size=100), max_epochs=5)
    counts = torch.cat(cells).sum(0).double()  # 2,000 samples x 6 cells over 49 cells
    assert counts.sum() == 2000 * 6
    expected = 2000 * 6 / 49
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 85.0  # chi-square, 48 degrees of freedom: p < 1e-3 above 84.0


def test_same_seed_same_random_cells_other_seed_others():
    def cells(seed: int) -> torch.Tensor:
        callback = AttentiveCutMix(teacher="random", num_classes=NUM_CLASSES, seed=seed)
        found = record_cells(callback)
        fit(callback, data=loader(n=32), max_epochs=2)
        return torch.cat(found)

    assert torch.equal(cells(3), cells(3))
    assert not torch.equal(cells(3), cells(4))


def test_random_cells_do_not_follow_the_image():
    """The same image gets different cells in different batches: the cells do not depend on the content."""
    image = torch.rand(1, 3, SIZE, SIZE).expand(8, -1, -1, -1).contiguous()
    data = DataLoader(TensorDataset(image, torch.arange(8) % NUM_CLASSES), batch_size=8)
    callback = AttentiveCutMix(teacher="random", num_classes=NUM_CLASSES, seed=0)
    cells = record_cells(callback)
    fit(callback, data=data, max_epochs=1)
    assert len({tuple(row.tolist()) for row in cells[0]}) > 1


def test_coldest_cells_paste_the_least_attended_cells():
    callback = AttentiveCutMix(teacher=Teacher(module=tiny_attention(), coldest=True), num_classes=NUM_CLASSES, seed=0)
    data = loader()
    x, _ = list(data)[-1]
    fit(callback, data=data)
    mix = callback.last_mix
    heat = tiny_teacher()(x).mean(1)[mix.permutation]
    coldest = (-heat).flatten(1).topk(6, dim=1).indices
    assert torch.equal(mix.cell_indices.sort(1).values, coldest.sort(1).values)
    # the result keeps the teacher's own maps (not negated), so the logged share is that of the attention
    pairs = torch.stack([mix.partner_heatmaps.flatten(), heat.detach().flatten()])
    assert float(torch.corrcoef(pairs)[0, 1]) > 0.9  # negated maps would give about -1
    hottest = AttentiveCutMix(teacher=Teacher(module=tiny_attention()), num_classes=NUM_CLASSES, seed=0)
    fit(hottest, data=loader())
    assert float(mix.pasted_attention().mean()) < float(hottest.last_mix.pasted_attention().mean())


def test_a_monitor_measures_the_attention_that_random_cells_paste():
    monitor = PastedAttentionMonitor(teacher=Teacher(module=tiny_attention()))
    callback = AttentiveCutMix(teacher="random", num_classes=NUM_CLASSES, seed=0)
    trainer = quiet_trainer(callbacks=[callback, monitor])  # fmt: skip
    trainer.fit(Recorder(), train_dataloaders=loader())
    share = float(trainer.callback_metrics["mix/pasted_attention"])
    assert 0.0 < share < 1.0


def test_the_random_cells_config_builds_the_control():
    import yaml

    from lightning_acm.cli import CONFIG_DIR

    config = yaml.safe_load((CONFIG_DIR / "method" / "random_cells.yaml").read_text())["mixing"]
    assert config["class_path"] == "lightning_acm.callbacks.AttentiveCutMix"
    callback = AttentiveCutMix(**{**config["init_args"], "teacher": Teacher(**config["init_args"]["teacher"])})
    assert callback.teacher.is_random and callback.top_k == 6 and callback.grid_size == (7, 7)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: AttentiveCutMix(teacher="random", heatmap_cache=True), r"heatmap_cache=False.*nothing to cache"),
        (lambda: Teacher(source="random", layer="layer4"), r"`layer` would be ignored"),
        (lambda: Teacher(source="random", weights="w.pth", coldest=True), r"`weights`, `coldest` would be ignored"),
        (lambda: Teacher(source="random").build(), r"no model to build"),
        (lambda: PastedAttentionMonitor(teacher="random"), r"`teacher` to name a model"),
        (lambda: PastedAttentionMonitor(teacher=Teacher(coldest=True)), r"coldest=True"),
        (lambda: Teacher(coldest=1), r"coldest"),
        (lambda: AttentiveCutMix(teacher=Teacher(source="random", grid_size=3), top_k=10), r"top_k"),
    ],
)
def test_bad_random_cells_settings_fail_early(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_random_cells_scores_come_from_the_batch_generator():
    callback = AttentiveCutMix(teacher="random", num_classes=NUM_CLASSES, seed=0)
    callback._generator = np.random.default_rng(5)
    first = callback.random_heatmaps(4, torch.device("cpu"))
    callback._generator = np.random.default_rng(5)
    assert torch.equal(first, callback.random_heatmaps(4, torch.device("cpu")))
    assert first.shape == (4, 7, 7) and first.dtype == torch.float32
