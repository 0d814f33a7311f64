"""Tests for lightning_acm.model: building classifiers, steps, metrics, optimizers and schedules (CPU, offline)."""

from __future__ import annotations

import math
import urllib.error
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torchvision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trainers import quiet_trainer

from lightning_acm.model import DENSENET264_CONFIG, ImageClassifier, _build_classifier, _lr_factor

pytestmark = [
    # Steps called outside a Trainer log nothing; that is what these unit tests want.
    pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`:UserWarning"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _loader(n: int = 24, batch_size: int = 8, size: int = 32, num_classes: int = 10) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=generator)
    targets = torch.randint(0, num_classes, (n,), generator=generator)
    return DataLoader(TensorDataset(images, targets), batch_size=batch_size)


class _LrRecorder(L.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


# ---------------------------------------------------------------- building


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "efficientnet_b0"])
def test_small_input_forward(arch: str) -> None:
    model = ImageClassifier(arch=arch, num_classes=10, small_input=True).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_small_input_changes_the_stem() -> None:
    resnet = _build_classifier("resnet18", small_input=True)
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, nn.Identity)
    densenet = _build_classifier("densenet121", small_input=True)
    assert densenet.features.conv0.kernel_size == (3, 3) and densenet.features.conv0.stride == (1, 1)
    assert isinstance(densenet.features.pool0, nn.Identity)
    efficientnet = _build_classifier("efficientnet_b0", small_input=True)
    assert efficientnet.features[0][0].stride == (1, 1)


def test_small_input_unknown_family_raises() -> None:
    with pytest.raises(ValueError, match="ResNet, DenseNet or EfficientNet when `small_input=True`"):
        _build_classifier("mobilenet_v3_small", small_input=True)


@pytest.mark.parametrize("in_channels", [1, 4])
def test_in_channels(in_channels: int) -> None:
    model = _build_classifier("resnet18", num_classes=10, in_channels=in_channels, small_input=True).eval()
    assert model.conv1.in_channels == in_channels
    with torch.no_grad():
        assert model(torch.randn(2, in_channels, 32, 32)).shape == (2, 10)


def test_one_input_channel_sums_the_stem() -> None:
    torch.manual_seed(1)
    reference = _build_classifier("resnet18")
    torch.manual_seed(1)
    gray = _build_classifier("resnet18", in_channels=1)
    torch.testing.assert_close(gray.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))


def test_densenet264_config() -> None:
    model = _build_classifier("densenet264", num_classes=1000)
    assert isinstance(model, torchvision.models.DenseNet)
    blocks = [m for name, m in model.features.named_children() if name.startswith("denseblock")]
    assert [len(block) for block in blocks] == list(DENSENET264_CONFIG["block_config"]) == [6, 12, 64, 48]
    assert model.classifier.in_features == 2688
    # DenseNet-264 (k=32) has about 33.3M parameters for ImageNet.
    assert 33.0e6 < sum(p.numel() for p in model.parameters()) < 33.6e6


def test_densenet264_has_no_weights() -> None:
    with pytest.raises(ValueError, match="torchvision has no pretrained DenseNet-264"):
        _build_classifier("densenet264", weights="DEFAULT")


@pytest.mark.parametrize(("arch", "close"), [("resnet19", "resnet18"), ("densenet-121", "densenet121")])
def test_unknown_arch_suggests_close_names(arch: str, close: str) -> None:
    with pytest.raises(ValueError, match=rf"torchvision classification model name.*Did you mean.*'{close}'"):
        ImageClassifier(arch=arch)


def test_unknown_arch_without_close_names() -> None:
    with pytest.raises(ValueError, match=r"but got 'zzzzzz'\.$"):
        _build_classifier("zzzzzz")


def test_unknown_weights_name() -> None:
    with pytest.raises(ValueError, match=r"Expected `weights` to be one of \['DEFAULT', 'IMAGENET1K_V1'\]"):
        _build_classifier("resnet18", weights="IMAGENET1K_V9")
    with pytest.raises(ValueError, match="Expected `weights` to be one of"):
        _build_classifier("resnet18", weights="ResNet50_Weights.IMAGENET1K_V1")


def test_weights_offline_error_names_the_checkpoint_path(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    with pytest.raises(RuntimeError, match="put the file at") as info:
        ImageClassifier(arch="resnet18", weights="DEFAULT")
    assert expected in str(info.value)
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_pretrained_weights_from_local_file_replace_the_head(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), checkpoints / "resnet18-f37072fd.pth")
    model = _build_classifier("resnet18", num_classes=10, weights="IMAGENET1K_V1")
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert model.fc.out_features == 10
    same = _build_classifier("resnet18", num_classes=1000, weights="ResNet18_Weights.IMAGENET1K_V1")
    torch.testing.assert_close(same.fc.weight, source.fc.weight)


# ---------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1}, r"Expected `lr` to be a finite number > 0, but got -1\."),
        ({"lr": 0.0}, r"Expected `lr` to be a finite number > 0, but got 0.0\."),
        ({"momentum": 1.0}, r"Expected `momentum` to be in \[0, 1\), but got 1.0\."),
        ({"momentum": 0.0}, r"Expected `momentum` to be > 0 when `nesterov=True`"),
        ({"label_smoothing": 1.0}, r"Expected `label_smoothing` to be in \[0, 1\)"),
        ({"label_smoothing": -0.1}, r"Expected `label_smoothing` to be in \[0, 1\)"),
        ({"milestones": [100, 50]}, r"Expected `milestones` to be strictly increasing epochs >= 1"),
        ({"milestones": [0, 5]}, r"Expected `milestones` to be strictly increasing"),
        ({"milestones": [5, 5]}, r"Expected `milestones` to be strictly increasing"),
        ({"lr_scheduler": "multistep", "milestones": []}, r"Expected `milestones` to be non-empty"),
        ({"num_classes": 1}, r"Expected `num_classes` to be an int >= 2, but got 1\."),
        ({"in_channels": 0}, r"Expected `in_channels` to be a positive int, but got 0\."),
        ({"weight_decay": -1e-4}, r"Expected `weight_decay` to be a finite number >= 0, but got -0.0001\."),
        ({"gamma": 0.0}, r"Expected `gamma` to be in \(0, 1\]"),
        ({"warmup_epochs": -1}, r"Expected `warmup_epochs` to be an int >= 0, but got -1\."),
        ({"optimizer": "adam"}, r"Expected `optimizer` to be one of 'sgd', 'adamw', but got 'adam'\."),
        ({"lr_scheduler": "step"}, r"Expected `lr_scheduler` to be one of"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageClassifier(**kwargs)


def test_adamw_large_lr_warns() -> None:
    with pytest.warns(UserWarning, match="large for AdamW"):
        ImageClassifier(optimizer="adamw", lr=0.1)


def test_hyperparameters_are_saved() -> None:
    model = ImageClassifier(arch="resnet18", lr=0.05, milestones=[3, 6])
    assert model.hparams.lr == 0.05 and list(model.hparams.milestones) == [3, 6]
    assert model.hparams.arch == "resnet18"


# ---------------------------------------------------------------- steps


@pytest.fixture(scope="module")
def small_model() -> ImageClassifier:
    return ImageClassifier(arch="resnet18", num_classes=4, label_smoothing=0.1)


def test_training_step_index_and_soft_targets(small_model: ImageClassifier) -> None:
    images = torch.randn(4, 3, 16, 16)
    hard = torch.tensor([0, 1, 2, 3])
    soft = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.0, 0.3, 0.7, 0.0], [0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 0.1, 0.9]])
    for targets in (hard, soft):
        loss = small_model.training_step((images, targets), 0)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
    # Extra batch elements (e.g. paste geometry) and dict batches are accepted.
    assert torch.isfinite(small_model.training_step((images, hard, torch.zeros(4, 4)), 0))
    assert torch.isfinite(small_model.training_step({"image": images, "target": soft}, 0))


def test_training_step_matches_the_soft_target_loss(small_model: ImageClassifier) -> None:
    small_model.eval()  # BatchNorm in eval mode so both passes see the same network
    images, soft = torch.randn(2, 3, 16, 16), torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 0.2, 0.8]])
    loss = small_model.training_step((images, soft), 0)
    smoothed = soft * 0.9 + 0.1 / 4
    expected = -(smoothed * small_model(images).log_softmax(dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(loss, expected)
    small_model.train()


def test_train_accuracy_uses_the_dominant_label(small_model: ImageClassifier) -> None:
    small_model.train_acc.reset()
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    small_model.forward = lambda x: logits  # type: ignore[method-assign]
    try:
        # Row 0: dominant class 0 (0.6 > 0.4), predicted 0. Row 1: dominant class 3, predicted 1.
        soft = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.0, 0.45, 0.0, 0.55]])
        small_model.training_step((torch.zeros(2, 3, 8, 8), soft), 0)
        assert small_model.train_acc.compute().item() == pytest.approx(0.5)
    finally:
        del small_model.forward
        small_model.train_acc.reset()


def test_batch_without_targets_raises(small_model: ImageClassifier) -> None:
    with pytest.raises(ValueError, match=r"at least \(images, targets\), but got 1 element"):
        small_model.training_step((torch.zeros(1, 3, 8, 8),), 0)
    with pytest.raises(TypeError, match="Expected a batch as a tuple/list"):
        small_model.training_step(torch.zeros(1, 3, 8, 8), 0)


def test_predict_step_returns_probabilities(small_model: ImageClassifier) -> None:
    small_model.eval()
    with torch.no_grad():
        for batch in (torch.randn(3, 3, 16, 16), (torch.randn(3, 3, 16, 16),), {"image": torch.randn(3, 3, 16, 16)}):
            probabilities = small_model.predict_step(batch, 0)
            assert probabilities.shape == (3, 4) and probabilities.dtype == torch.float32
            torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3))
    small_model.train()


def test_no_attention_submodule(small_model: ImageClassifier) -> None:
    assert {name for name, _ in small_model.named_children()} == {
        "net",
        "train_acc",
        "val_acc",
        "val_acc_top5",
        "test_acc",
        "test_acc_top5",
    }


# ---------------------------------------------------------------- optimizers and schedules


def test_parameter_groups_exclude_bn_and_bias_from_weight_decay() -> None:
    model = ImageClassifier(arch="resnet18", weight_decay=1e-3)
    decay, no_decay = model.parameter_groups()
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.net.bn1.weight) in no_decay_ids and id(model.net.bn1.bias) in no_decay_ids
    assert id(model.net.fc.bias) in no_decay_ids
    assert id(model.net.fc.weight) not in no_decay_ids and id(model.net.conv1.weight) not in no_decay_ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    (single,) = ImageClassifier(arch="resnet18", no_weight_decay_on_bn_and_bias=False).parameter_groups()
    assert single["weight_decay"] == 5e-4


def test_lr_factor() -> None:
    kwargs = dict(warmup_steps=2, total_steps=10, milestone_steps=[4, 8], gamma=0.1)
    assert [_lr_factor(s, schedule="none", **kwargs) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cosine = [_lr_factor(s, schedule="cosine", **kwargs) for s in (2, 6, 10, 12)]
    assert cosine == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-12)
    assert [_lr_factor(s, schedule="multistep", **kwargs) for s in (3, 4, 7, 8)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_fit_and_test_with_trainer() -> None:
    model = ImageClassifier(arch="resnet18", num_classes=10, small_input=True, lr=0.05)
    trainer = quiet_trainer(limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=_loader(), val_dataloaders=_loader(n=16))
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_top5"} <= set(trainer.callback_metrics)
    (results,) = trainer.test(model, dataloaders=_loader(n=16), verbose=False)
    assert set(results) == {"test/loss", "test/acc", "test/acc_top5"}
    assert all(math.isfinite(v) for v in results.values())
    assert 0.0 <= results["test/acc"] <= results["test/acc_top5"] <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # 2 epochs x 3 steps = 6 steps of cosine from 0.1 to 0.
        ({"lr_scheduler": "cosine"}, [0.1 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)]),
        ({"lr_scheduler": "multistep", "milestones": [1], "gamma": 0.5}, [0.1] * 3 + [0.05] * 3),
        # 1 warmup epoch (3 steps), then 3 steps of cosine.
        (
            {"lr_scheduler": "cosine", "warmup_epochs": 1},
            [0.1 / 3, 0.2 / 3, 0.1] + [0.1 * 0.5 * (1 + math.cos(math.pi * s / 3)) for s in range(3)],
        ),
        ({"lr_scheduler": "none"}, [0.1] * 6),
    ],
)
def test_schedulers_step_every_batch(kwargs: dict, expected: list) -> None:
    model = ImageClassifier(arch="resnet18", num_classes=10, lr=0.1, **kwargs)
    recorder = _LrRecorder()
    trainer = quiet_trainer(
        max_epochs=2, limit_train_batches=3, limit_val_batches=0, callbacks=[recorder], num_sanity_val_steps=0
    )
    trainer.fit(model, train_dataloaders=_loader(size=16))
    assert len(recorder.lrs) == 6
    assert recorder.lrs == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "steps", "batches"),
    [
        ({"lr_scheduler": "cosine"}, math.inf, 10),
        ({"lr_scheduler": "cosine", "warmup_epochs": 1}, math.inf, 10),
        ({"lr_scheduler": "multistep", "milestones": [1]}, 100, math.inf),
        ({"lr_scheduler": "none", "warmup_epochs": 1}, 100, math.inf),
    ],
)
def test_schedule_needs_the_training_length(monkeypatch: pytest.MonkeyPatch, kwargs: dict, steps, batches) -> None:
    model = ImageClassifier(arch="cifar_resnet8", **kwargs)
    trainer = SimpleNamespace(estimated_stepping_batches=steps, num_training_batches=batches, accumulate_grad_batches=1)
    monkeypatch.setattr(ImageClassifier, "trainer", property(lambda self: trainer))
    with pytest.raises(MisconfigurationException, match=r"needs the length of training.*sized training dataloader"):
        model.configure_optimizers()


def test_adamw_optimizer() -> None:
    model = ImageClassifier(arch="resnet18", optimizer="adamw", lr=1e-3, lr_scheduler="none")
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]
