"""RandomMixing in a real lightning.Trainer on CPU: picks at the given weights, the picked method's mix
reaches training_step, label smoothing once, seeded picks, metrics, the teacher only when picked, bad input."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from trainers import quiet_trainer

from lightning_acm import functional as AF
from lightning_acm.attention import Teacher
from lightning_acm.callbacks import (
    AttentiveCutMix,
    CutMix,
    MixingCallback,
    MixResult,
    MixUp,
    RandomMixing,
    batch_generator,
)
from lightning_acm.visualize import MixVisualizer, PastedAttentionMonitor
from tests.test_cache import Counting, fashion_datamodule
from tests.test_cache import fit as fit_cached
from tests.test_callbacks import NUM_CLASSES, Recorder, fit, loader, tiny_attention


def fit_all(callbacks: list[L.Callback], data: Any, **trainer_kwargs: Any) -> L.Trainer:
    """``fit`` with several callbacks."""
    trainer = quiet_trainer(callbacks=callbacks, **trainer_kwargs)
    trainer.fit(Recorder(), train_dataloaders=data)
    return trainer


def spy_picks(mixing: RandomMixing) -> list[int]:
    """The index of the method that mixed each batch, in order."""
    picks: list[int] = []
    for index, method in enumerate(mixing.methods):
        original = method.mix

        def spy(*args: Any, index: int = index, original: Any = original) -> MixResult:
            picks.append(index)
            return original(*args)

        method.mix = spy  # type: ignore[method-assign]
    return picks


def counted_teacher() -> tuple[Teacher, list[int]]:
    """A tiny teacher and the batch sizes of its forward calls."""
    calls: list[int] = []
    model = tiny_attention()
    model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return Teacher(module=model, input_mean=(0.0,), input_std=(1.0,)), calls


def test_each_method_is_picked_at_its_weight_and_the_shares_are_logged():
    mixing = RandomMixing([CutMix(), MixUp(alpha=0.8)], weights=[1.0, 3.0], seed=0)
    picks = spy_picks(mixing)
    trainer, model = fit(mixing, data=loader(n=400, batch_size=2))
    assert len(picks) == len(model.seen) == mixing.batches_mixed == 200
    # 200 picks of probability 0.25: the count is within 4 standard deviations of 50
    assert abs(picks.count(0) - 50) < 4 * math.sqrt(200 * 0.25 * 0.75)
    metrics = trainer.callback_metrics
    assert float(metrics["mix/picked/cutmix"]) == pytest.approx(picks.count(0) / 200)
    assert float(metrics["mix/picked/mixup"]) == pytest.approx(picks.count(1) / 200)
    assert float(metrics["mix/mixed"]) == 1.0
    assert "mix/pasted_attention" in metrics  # from the Mixup batches


def test_training_step_sees_the_picked_methods_mix_smoothed_once():
    eps, seed = 0.1, 5
    mixing = RandomMixing([CutMix(alpha=1.0), MixUp(alpha=0.8)], p=0.75, seed=seed, label_smoothing=eps)
    data = loader(n=64, batch_size=8)
    _, model = fit(mixing, data=data)
    kinds = set()
    for batch_idx, ((x, y), (images, targets)) in enumerate(zip(data, model.seen, strict=True)):
        # replay the batch: the p draw, the pick, then the picked method's own draws on the same generator
        generator = batch_generator(seed, 0, 0, batch_idx)
        if generator.random() >= 0.75:
            kinds.add("none")
            torch.testing.assert_close(images, x)
            torch.testing.assert_close(targets, F.one_hot(y, NUM_CLASSES) * (1 - eps) + eps / NUM_CLASSES)
            continue
        picked = generator.choice(2, p=(0.5, 0.5))
        kinds.add(int(picked))
        op, alpha = (AF.cutmix, 1.0) if picked == 0 else (AF.mixup, 0.8)
        # the functional smooths the one-hot targets before mixing them: the same targets
        expected = op(x, y, alpha=alpha, num_classes=NUM_CLASSES, generator=generator, label_smoothing=eps)
        torch.testing.assert_close(images, expected[0])
        torch.testing.assert_close(targets, expected[1])
        assert targets.min() >= eps / NUM_CLASSES - 1e-6  # smoothed once: not (eps / K) * (1 - eps)
    assert kinds == {"none", 0, 1}


def test_the_seen_batch_is_the_picked_methods_result():
    mixing = RandomMixing([CutMix(), MixUp()], seed=1)
    results: list[MixResult] = []
    for method in mixing.methods:
        original = method.mix

        def spy(*args: Any, original: Any = original) -> MixResult:
            results.append(original(*args))
            return results[-1]

        method.mix = spy  # type: ignore[method-assign]
    _, model = fit(mixing, data=loader(n=32, batch_size=8))
    assert len(results) == 4 and results[-1] is mixing.last_mix
    for result, (images, targets) in zip(results, model.seen, strict=True):
        assert torch.equal(images, result.mixed) and torch.equal(targets, result.soft_targets)


def test_same_seed_same_picks_and_another_seed_others():
    def picks(seed: int) -> list[int]:
        mixing = RandomMixing([CutMix(), MixUp()], seed=seed)
        spied = spy_picks(mixing)
        fit(mixing, data=loader(n=64, batch_size=2), max_epochs=2)
        return spied

    first = picks(3)
    assert first == picks(3) and len(first) == 64
    assert first != picks(4)


def test_the_teacher_runs_only_on_the_batches_attentive_cutmix_mixes():
    teacher, calls = counted_teacher()
    mixing = RandomMixing([CutMix(), AttentiveCutMix(teacher=teacher)], weights=[0.5, 0.5], seed=2)
    picks = spy_picks(mixing)
    trainer, _ = fit(mixing, data=loader(n=80, batch_size=4))
    assert 0 < picks.count(1) < 20
    assert calls == [4] * picks.count(1)
    assert mixing.methods[1].attention_model is not None  # set up through RandomMixing
    metrics = trainer.callback_metrics
    assert float(metrics["mix/picked/attentive_cutmix"]) == pytest.approx(picks.count(1) / 20)


def test_a_monitor_measures_the_cutmix_batches_into_the_one_pasted_attention_metric():
    teacher, _ = counted_teacher()
    monitor_teacher, monitor_calls = counted_teacher()
    mixing = RandomMixing([CutMix(), AttentiveCutMix(teacher=teacher)], seed=2)
    shares: list[torch.Tensor] = []
    picks = spy_picks(mixing)

    class Collect(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            result = mixing.last_mix
            assert result is not None
            heatmaps = monitor.partner_heatmaps(result)  # the mixer's own, else the monitor's
            shares.append(AF.pasted_attention_share(heatmaps, result.mask))

    monitor = PastedAttentionMonitor(teacher=monitor_teacher)
    trainer = fit_all([mixing, monitor, Collect()], loader(n=80, batch_size=4))
    assert monitor_calls == [4] * picks.count(0)  # the monitor measures only the CutMix batches
    assert 0 < picks.count(0) < 20
    expected = float(torch.cat(shares).mean())
    assert float(trainer.callback_metrics["mix/pasted_attention"]) == pytest.approx(expected, rel=1e-5)


def test_the_visualizer_draws_random_mixing(tmp_path):
    teacher, _ = counted_teacher()
    mixing = RandomMixing([CutMix(), AttentiveCutMix(teacher=teacher)], seed=2)
    visualizer = MixVisualizer(every_n_steps=1, max_samples=2)
    fit_all([mixing, visualizer], loader(n=32, batch_size=4), default_root_dir=str(tmp_path))
    assert len(os.listdir(tmp_path / "mixes")) == 8
    assert visualizer._options["mean"] == (0.0,)  # no datamodule: the normalisation of the method's teacher


def test_the_monitor_warns_when_every_method_measures_itself():
    teacher, _ = counted_teacher()
    mixing = RandomMixing([MixUp(), AttentiveCutMix(teacher=teacher)], seed=0)
    monitor_teacher, monitor_calls = counted_teacher()
    with pytest.warns(UserWarning, match="nothing to measure"):
        fit_all([mixing, PastedAttentionMonitor(teacher=monitor_teacher)], loader())
    assert monitor_calls == []


def test_names_state_keys_and_state_dict():
    acm = AttentiveCutMix(teacher=Teacher(module=tiny_attention()))
    cells = AttentiveCutMix(teacher="random")
    mixing = RandomMixing([CutMix(), CutMix(alpha=0.5), acm, cells, MixUp(), CutMix()], weights=[1, 1, 1, 1, 2, 2])
    assert mixing.names == ("cutmix", "cutmix_1", "attentive_cutmix", "random_cells", "mixup", "cutmix_2")
    assert mixing.probabilities == pytest.approx((0.125,) * 4 + (0.25,) * 2)
    one, other = RandomMixing([CutMix(), MixUp()]), RandomMixing([CutMix(), MixUp(alpha=0.8)])
    assert one.state_key != other.state_key != RandomMixing([CutMix(), MixUp(alpha=0.8)], weights=[1, 2]).state_key
    assert "('MixUp', {" in other.state_key and "'alpha': 0.8" in other.state_key  # the methods' own arguments
    assert set(one.state_dict()) == {"seed", "batches_seen", "batches_mixed"}


def test_a_method_also_in_the_trainer_is_refused():
    cutmix = CutMix()
    mixing = RandomMixing([cutmix, MixUp()])
    with pytest.raises(MisconfigurationException, match=r"CutMix is also in the Trainer's callbacks"):
        fit_all([mixing, cutmix], loader())


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: RandomMixing([]), ValueError, r"`methods` to hold at least one mixing callback, but got an empty"),
        (lambda: RandomMixing(CutMix()), TypeError, r"`methods` to be a list of mixing callbacks .* but got CutMix"),
        (lambda: RandomMixing([CutMix(), "mixup"]), TypeError, r"list of mixing callbacks .* \['CutMix', 'str'\]"),
        (lambda: RandomMixing([RandomMixing([CutMix()])]), ValueError, r"no RandomMixing, but got one at methods\[0\]"),
        (lambda: RandomMixing([(c := CutMix()), c]), ValueError, r"distinct callbacks, but methods\[1\] \(CutMix\)"),
        (lambda: RandomMixing([CutMix(p=0.5)]), ValueError, r"methods\[0\] \(CutMix\) to leave `p` at 1.0, but got"),
        (
            lambda: RandomMixing([MixUp(), CutMix(label_smoothing=0.1)]),
            ValueError,
            r"methods\[1\] \(CutMix\) to leave `label_smoothing` at 0.0, but got 0.1.*Set `label_smoothing` on Random",
        ),
        (lambda: RandomMixing([MixUp(seed=1)]), ValueError, r"\(MixUp\) to leave `seed` at None, but got 1"),
        (lambda: RandomMixing([MixUp(stop_after_step=5)]), ValueError, r"leave `stop_after_step` at None, but got 5"),
        (lambda: RandomMixing([MixUp(stop_after_epoch=2)]), ValueError, r"leave `stop_after_epoch` at None"),
        (lambda: RandomMixing([MixUp(image_key="x")]), ValueError, r"leave `image_key` at None, but got 'x'"),
        (lambda: RandomMixing([MixUp(target_key=2)]), ValueError, r"leave `target_key` at None, but got 2"),
        (lambda: RandomMixing([MixUp(log_prefix="m")]), ValueError, r"leave `log_prefix` at 'mix', but got 'm'"),
        (lambda: RandomMixing([MixUp(num_classes=5)]), ValueError, r"leave `num_classes` at None, but got 5"),
        (
            lambda: RandomMixing([MixUp(num_classes=5)], num_classes=6),
            ValueError,
            r"leave `num_classes` at 6, but got 5",
        ),
        (
            lambda: RandomMixing([CutMix()], weights=[1, 2]),
            ValueError,
            r"`weights` to be a list of 1 numbers.*\[1, 2\]",
        ),
        (lambda: RandomMixing([CutMix()], weights=0.5), ValueError, r"`weights` to be a list of 1 numbers.*0.5"),
        (
            lambda: RandomMixing([CutMix(), MixUp()], weights=[1, -1]),
            ValueError,
            r"`weights` to be finite numbers >= 0",
        ),
        (lambda: RandomMixing([CutMix(), MixUp()], weights=[1, math.nan]), ValueError, r"finite numbers >= 0.*nan"),
        (lambda: RandomMixing([CutMix(), MixUp()], weights=[1, math.inf]), ValueError, r"finite numbers >= 0.*inf"),
        (lambda: RandomMixing([CutMix(), MixUp()], weights=[1, "a"]), ValueError, r"finite numbers >= 0.*'a'"),
        (
            lambda: RandomMixing([CutMix(), MixUp()], weights=[0, 0.0]),
            ValueError,
            r"`weights` to be finite numbers >= 0 with a positive sum, but got \[0, 0.0\]",
        ),
        (lambda: RandomMixing([CutMix()], p=2.0), ValueError, r"`p`.* to be in \[0, 1\], but got 2.0"),
    ],
)
def test_bad_input_fails_early_with_the_fix(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_equal_settings_on_a_method_are_accepted():
    mixing = RandomMixing([MixUp(num_classes=5, p=1.0, label_smoothing=0.0)], num_classes=5, weights=[np.float32(2)])
    assert isinstance(mixing, MixingCallback) and mixing.probabilities == (1.0,)


def test_an_attentive_cutmix_heatmap_cache_is_filled_through_random_mixing(tmp_path):
    backbone = Counting()
    acm = AttentiveCutMix(teacher=Teacher(module=backbone, layer="act", input_size=28), heatmap_cache=True)
    mixing = RandomMixing([CutMix(), acm], seed=0)
    picks = spy_picks(mixing)
    _, model = fit_cached(mixing, fashion_datamodule(str(tmp_path), record_augmentation=True))  # type: ignore[arg-type]
    assert acm.cache is not None and acm.attention_model.backbone.images_seen == 24  # once per training image
    assert 0 < picks.count(1) < len(model.seen) == 6
