"""Argument checks shared by the library: one check per rule, each message naming the argument and the fix.

Public functions and constructors call these once; internals trust them. Checks return plain ``int``/``float``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Optional, TypeVar, Union

import numpy as np
import torch
from torch import Tensor

Size2 = Union[int, tuple[int, int]]
T = TypeVar("T")


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a finite real number (Python or numpy), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def shape_of(value: Any) -> Any:
    """The shape of ``value`` as a tuple if it is a tensor, else the name of its type (for error messages)."""
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def check_int(value: Any, name: str, *, minimum: Optional[int] = None, optional: bool = False, hint: str = "") -> Any:
    """``value`` as an ``int`` (``None`` passes when ``optional``); raise if it is not an int ``>= minimum``."""
    if optional and value is None:
        return None
    if not is_int(value) or (minimum is not None and value < minimum):
        kind = "an int" if minimum is None else ("a positive int" if minimum == 1 else f"an int >= {minimum}")
        raise ValueError(f"Expected `{name}` to be {'None or ' if optional else ''}{kind}, but got {value!r}.{hint}")
    return int(value)


def check_real(
    value: Any,
    name: str,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    high_open: bool = False,
    low_open: bool = False,
    what: str = "",
) -> float:
    """``value`` as a finite ``float`` in ``[low, high]`` (either end open); raise otherwise."""
    ok = is_real(value) and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = "a finite number" if low is None else f"a finite number {'>' if low_open else '>='} {low:g}"
        if low is not None and high is not None:
            bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"Expected `{name}`{f' ({what})' if what else ''} to be {bounds}, but got {value!r}.")
    return float(value)


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a ``bool``; raise a ``TypeError`` otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, but got {value!r}.")
    return value


def check_choice(value: T, name: str, choices: Sequence[Any]) -> T:
    """``value`` if it is one of ``choices``; raise otherwise."""
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {', '.join(map(repr, choices))}, but got {value!r}.")
    return value


def check_size2(value: Any, name: str, *, optional: bool = False) -> Any:
    """An int or a pair of ints ``(h, w)``, all positive, as a ``tuple[int, int]``."""
    if optional and value is None:
        return None
    pair = (value, value) if is_int(value) else value
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(is_int(v) for v in pair):
        raise TypeError(f"Expected `{name}` to be an int or a pair of ints (h, w), but got {value!r}.")
    if min(pair) < 1:
        raise ValueError(f"Expected `{name}` to be positive, but got {value!r}.")
    return int(pair[0]), int(pair[1])


def check_label_smoothing(value: Any) -> float:
    """``label_smoothing`` as a float in ``[0, 1)``."""
    return check_real(value, "label_smoothing", low=0.0, high=1.0, high_open=True)


def check_beta_alpha(value: Any) -> float:
    """``alpha`` of ``Beta(alpha, alpha)`` as a float ``> 0``."""
    return check_real(value, "alpha", low=0.0, low_open=True, what="the Beta(alpha, alpha) parameter")


def check_reduction(value: Any) -> Any:
    """``reduction`` if it is ``"mean"`` or ``"max"`` (over a feature map's channels)."""
    return check_choice(value, "reduction", ("mean", "max"))


def check_top_k(top_k: Any, grid: tuple[int, int]) -> int:
    """``top_k`` as an int in ``[1, gh * gw]`` for a ``(gh, gw)`` grid."""
    gh, gw = grid
    if not is_int(top_k) or not 1 <= top_k <= gh * gw:
        raise ValueError(f"Expected `top_k` to be in [1, {gh * gw}] for a {gh}x{gw} grid, but got {top_k!r}.")
    return int(top_k)


def check_features(features: Any, grid_size: Any) -> tuple[int, int]:
    """``grid_size`` as ``(gh, gw)``; raise unless ``features`` is a ``(B, C, h, w)`` map at least that fine."""
    if not isinstance(features, Tensor) or features.ndim != 4:
        raise ValueError(f"Expected `features` to be a 4-D feature map (B, C, h, w), but got {shape_of(features)}.")
    (gh, gw), (h, w) = check_size2(grid_size, "grid_size"), features.shape[-2:]
    if gh > h or gw > w:
        raise ValueError(
            f"Expected `grid_size` to be at most the feature map size {h}x{w} at this input size, but got {gh}x{gw}."
            " Use a coarser `grid_size`, a larger `input_size`, or an earlier layer with a finer map."
        )
    return gh, gw


def check_image_size(image_size: Any, grid: tuple[int, int]) -> tuple[int, int]:
    """``image_size`` as ``(H, W)``; raise unless it is at least the ``(gh, gw)`` grid."""
    (gh, gw), (height, width) = grid, check_size2(image_size, "image_size")
    if gh > height or gw > width:
        raise ValueError(
            f"Expected `image_size` to be at least the grid size {gh}x{gw}, but got {height}x{width}."
            " Use a coarser `grid_size` for such small images."
        )
    return height, width


def check_shape(value: Any, name: str, shape: tuple[int, ...]) -> None:
    """Raise unless ``value`` is a tensor of ``shape``."""
    if not isinstance(value, Tensor) or tuple(value.shape) != shape:
        raise ValueError(f"Expected `{name}` to have shape {shape}, but got shape {shape_of(value)}.")


def check_generator(generator: Any) -> np.random.Generator:
    """``generator`` if it is a ``numpy.random.Generator``; raise a ``TypeError`` otherwise."""
    if not isinstance(generator, np.random.Generator):
        raise TypeError(
            "Expected `generator` to be a numpy.random.Generator (e.g. `numpy.random.default_rng(0)`) or None,"
            f" but got {type(generator).__name__}."
        )
    return generator


def check_images(images: Any) -> None:
    """Raise unless ``images`` is a non-empty ``(B, C, H, W)`` tensor."""
    if not isinstance(images, Tensor):
        raise TypeError(f"Expected `images` to be a torch.Tensor, but got {type(images).__name__}.")
    if images.ndim != 4:
        raise ValueError(
            f"Expected `images` to be a 4-D batch (B, C, H, W), but got shape {tuple(images.shape)}."
            " Add the batch dimension with `images.unsqueeze(0)` for a single image."
        )
    if images.shape[0] < 1:
        raise ValueError("Expected `images` to hold at least one sample, but got an empty batch.")


def check_heatmaps(heatmaps: Any, batch_size: Optional[int] = None) -> None:
    """Raise unless ``heatmaps`` is a ``(B, gh, gw)`` tensor with ``batch_size`` maps (when given)."""
    if not isinstance(heatmaps, Tensor):
        raise TypeError(f"Expected `heatmaps` to be a torch.Tensor, but got {type(heatmaps).__name__}.")
    if heatmaps.ndim != 3:
        raise ValueError(f"Expected `heatmaps` to have shape (B, gh, gw), but got shape {tuple(heatmaps.shape)}.")
    if batch_size is not None and heatmaps.shape[0] != batch_size:
        raise ValueError(
            "Expected `heatmaps` to have one map per image, but the batch sizes do not match:"
            f" {heatmaps.shape[0]} != {batch_size}."
        )


def check_permutation(permutation: Any, batch_size: int) -> Tensor:
    """``permutation`` as int64 if it is a permutation of ``range(batch_size)``; raise otherwise."""
    if not isinstance(permutation, Tensor) or permutation.dtype not in (torch.int64, torch.int32):
        raise TypeError("Expected `permutation` to be an integer tensor of shape (B,), e.g. `torch.randperm(B)`.")
    if tuple(permutation.shape) != (batch_size,):
        raise ValueError(
            f"Expected `permutation` to have shape ({batch_size},), but got shape {tuple(permutation.shape)}."
        )
    if not torch.equal(permutation.sort().values.long(), torch.arange(batch_size, device=permutation.device)):
        raise ValueError(
            "Expected `permutation` to be a permutation of range(B) (each index exactly once),"
            f" but got {permutation.tolist()}."
        )
    return permutation.long()


def check_label_range(low: int, high: int, num_classes: int, where: str = "") -> None:
    """Raise if class indices with minimum ``low`` and maximum ``high`` are outside ``[0, num_classes)``."""
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"Expected class-index `targets` in [0, {num_classes}), but got values in [{low}, {high}]"
            f"{where}. Check `num_classes` or the dataset's labels."
        )


def check_class_indices(targets: Tensor, num_classes: int, where: str = "") -> None:
    """Range check of ``(B,)`` class indices (reads them on the host: one sync on an accelerator)."""
    if targets.numel() > 0:
        check_label_range(*torch.stack(torch.aminmax(targets)).tolist(), num_classes, where)


def check_targets(targets: Tensor, num_classes: Optional[int], batch_size: Optional[int] = None) -> Tensor:
    """Check the form of ``targets``, not the range of class indices: class indices come back as
    ``(B,)`` (from ``(B,)`` or ``(B, 1)``), probabilities as the float ``(B, K)`` tensor given."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"Expected `targets` to be a torch.Tensor, but got {type(targets).__name__}.")
    check_int(num_classes, "num_classes", minimum=1, optional=True)
    if batch_size is not None and (targets.ndim == 0 or targets.shape[0] != batch_size):
        raise ValueError(
            "Expected `targets` to have one entry per image, but the batch sizes do not match:"
            f" {targets.shape[0] if targets.ndim else 'a scalar'} != {batch_size}."
        )
    indices = not targets.is_floating_point()
    if indices and targets.ndim == 2 and targets.shape[1] == 1:
        targets = targets.squeeze(1)
    if targets.ndim != (1 if indices else 2):
        raise ValueError(
            "Expected `targets` to be class indices (B,) or float probabilities (B, K), but got"
            f" {'an integer' if indices else 'a floating-point'} tensor of shape {tuple(targets.shape)}."
            " Pass class indices (e.g. `targets.argmax(1)`) or float probabilities."
        )
    if indices and num_classes is None:
        raise ValueError(
            "Expected `num_classes` for class-index targets of shape (B,), but got None."
            " Pass `num_classes=K` or give one-hot/probability targets of shape (B, K)."
        )
    if indices:
        return targets
    if num_classes is not None and targets.shape[1] != num_classes:
        raise ValueError(
            "Expected soft `targets` of width `num_classes`, but the widths do not match:"
            f" {targets.shape[1]} != {num_classes}."
        )
    tolerance = max(1e-2, 4 * torch.finfo(targets.dtype).eps)  # rounding, also of targets made in a lower precision
    sums = targets.double().sum(dim=1)
    if targets.numel() > 0 and (bool((targets < 0).any()) or not bool(((sums - 1).abs() <= tolerance).all())):
        raise ValueError(
            "Expected soft `targets` to be probabilities (non-negative rows that sum to 1), but got values in"
            f" [{float(targets.min()):.4g}, {float(targets.max()):.4g}] and row sums in [{float(sums.min()):.6g},"
            f" {float(sums.max()):.6g}]. Normalise them (e.g. `targets.softmax(1)`) or pass class indices."
        )
    return targets


def check_labels(targets: Any, num_classes: Optional[int], batch_size: Optional[int], smoothing: float) -> Tensor:
    """The public mixing functions' target checks: :func:`check_targets`, the class-index range, ``label_smoothing``."""
    check_label_smoothing(smoothing)
    targets = check_targets(targets, num_classes, batch_size)
    if targets.ndim == 1:
        check_class_indices(targets, int(num_classes))  # type: ignore[arg-type]
    return targets
