"""Pure tensor ops for Attentive CutMix, CutMix and Mixup (no Lightning import).

Conventions used throughout this module:

* images are ``(B, C, H, W)``, heatmaps ``(B, gh, gw)``, masks boolean ``(B, 1, H, W)``.
* ``permutation`` ``p`` pairs sample ``i`` with its *partner* ``p[i]``: the partner is the
  pasted image ``images[p[i]]`` and ``images[i]`` is the canvas.
* ``lam[i]`` is the fraction of ``mixed[i]`` that came from the partner: a pasted image is
  ``mask * images[p] + (1 - mask) * images`` (gradients flow to both), a blend uses ``lam`` as
  the mask, and ``soft_targets[i] = lam[i] * y[p[i]] + (1 - lam[i]) * y[i]``.
* targets are class indices ``(B,)`` or ``(B, 1)`` (these need ``num_classes``) or float
  probabilities ``(B, K)``; soft targets come back at least float32, ``lam`` as float32.
* randomness (pairing, boxes, Beta draws) comes from a ``numpy.random.Generator`` on the CPU and
  is moved to the images' device, so a seed gives the same mixes on every device; without one,
  a generator is seeded from torch's global RNG (``torch.manual_seed`` makes it reproducible).
* the mixing ops take ``num_classes``, ``permutation`` (drawn with :func:`pairing_permutation`
  when ``None``), ``generator`` and ``label_smoothing`` (``eps`` maps ``y`` to
  ``(1 - eps) * y + eps / K``), and return ``(mixed (B, C, H, W), soft_targets (B, K), lam (B,))``.

Example::

    >>> import numpy as np, torch
    >>> from lightning_acm.functional import attentive_cutmix
    >>> images, labels = torch.rand(4, 3, 224, 224), torch.tensor([0, 1, 2, 3])
    >>> mixed, soft, lam = attentive_cutmix(
    ...     images, labels, torch.rand(4, 7, 7), top_k=6, num_classes=10, generator=np.random.default_rng(0)
    ... )
    >>> mixed.shape, soft.shape, lam
    (torch.Size([4, 3, 224, 224]), torch.Size([4, 10]), tensor([0.1224, 0.1224, 0.1224, 0.1224]))
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "attention_grid", "attentive_cutmix", "cell_index_maps", "cell_mask", "cutmix", "cutmix_box_mask",
    "expand_grid", "mix_targets", "mix_with_mask", "mixup", "pairing_permutation", "paste",
    "pasted_attention_share", "sample_beta", "to_probabilities", "topk_cell_indices", "topk_cell_mask",
]

Size2 = Union[int, tuple[int, int]]
Reduction = Literal["mean", "max"]
Generator = Optional[np.random.Generator]



def _pair(value: Size2, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(type(v) is int for v in value):
        pair = (value[0], value[1])
    else:
        raise TypeError(f"Expected `{name}` to be an int or a pair of ints (h, w), but got {value!r}.")
    if min(pair) < 1:
        raise ValueError(f"Expected `{name}` to be positive, but got {value!r}.")
    return pair


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"Expected `images` to be a torch.Tensor, but got {type(images).__name__}.")
    if images.ndim != 4:
        raise ValueError(
            f"Expected `images` to be a 4-D batch (B, C, H, W), but got shape {tuple(images.shape)}."
            " Add the batch dimension with `images.unsqueeze(0)` for a single image."
        )
    if images.shape[0] < 1:
        raise ValueError("Expected `images` to hold at least one sample, but got an empty batch.")


def _check_heatmaps(heatmaps: Tensor, batch_size: Optional[int] = None) -> None:
    if not isinstance(heatmaps, Tensor):
        raise TypeError(f"Expected `heatmaps` to be a torch.Tensor, but got {type(heatmaps).__name__}.")
    if heatmaps.ndim != 3:
        raise ValueError(f"Expected `heatmaps` to have shape (B, gh, gw), but got shape {tuple(heatmaps.shape)}.")
    if batch_size is not None and heatmaps.shape[0] != batch_size:
        raise ValueError(
            "Expected `heatmaps` to have one map per image, but the batch sizes do not match:"
            f" {heatmaps.shape[0]} != {batch_size}."
        )


def _check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(
            f"Expected `alpha` to be a finite number > 0 (the Beta(alpha, alpha) parameter), but got {alpha!r}."
        )


def _check_grid_fits(grid: tuple[int, int], image_size: tuple[int, int], top_k: Optional[int] = None) -> None:
    (gh, gw), (height, width) = grid, image_size
    if gh > height or gw > width:
        raise ValueError(
            f"Expected `image_size` to be at least the grid size {gh}x{gw}, but got {height}x{width}."
            " Use a coarser `grid_size` for such small images."
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= gh * gw):
        raise ValueError(f"Expected `top_k` to be in [1, {gh * gw}] for a {gh}x{gw} grid, but got {top_k!r}.")


def _check_permutation(permutation: Tensor, batch_size: int) -> Tensor:
    if not isinstance(permutation, Tensor) or permutation.dtype not in (torch.int64, torch.int32):
        raise TypeError("Expected `permutation` to be an integer tensor of shape (B,), e.g. `torch.randperm(B)`.")
    if tuple(permutation.shape) != (batch_size,):
        raise ValueError(f"Expected `permutation` to have shape ({batch_size},), but got shape {tuple(permutation.shape)}.")
    if not torch.equal(permutation.sort().values.long(), torch.arange(batch_size, device=permutation.device)):
        raise ValueError(
            f"Expected `permutation` to be a permutation of range(B) (each index exactly once), but got {permutation.tolist()}."
        )
    return permutation.long()


def _rng(generator: Generator) -> np.random.Generator:
    """``generator``, or a new one seeded from torch's global RNG (so ``torch.manual_seed`` controls it)."""
    if generator is None:
        return np.random.default_rng(int(torch.randint(0, 2**62, ())))
    if not isinstance(generator, np.random.Generator):
        raise TypeError(
            "Expected `generator` to be a numpy.random.Generator (e.g. `numpy.random.default_rng(0)`) or None,"
            f" but got {type(generator).__name__}."
        )
    return generator


def _check_label_range(low: int, high: int, num_classes: int, where: str = "") -> None:
    """Raise if class indices with minimum ``low`` and maximum ``high`` are outside ``[0, num_classes)``."""
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"Expected class-index `targets` in [0, {num_classes}), but got values in [{low}, {high}]{where}."
            " Check `num_classes` or the dataset's labels."
        )


def _check_class_index_range(targets: Tensor, num_classes: int, where: str = "") -> None:
    """Range check of ``(B,)`` class indices (reads them on the host: one sync on an accelerator)."""
    if targets.numel() > 0:
        _check_label_range(*torch.stack(torch.aminmax(targets)).tolist(), num_classes, where)


def _targets(targets: Tensor, num_classes: Optional[int], batch_size: Optional[int] = None) -> Tensor:
    """Check the form of ``targets`` (not the range of class indices): class indices come back as
    ``(B,)`` (from ``(B,)`` or ``(B, 1)``), probabilities as the float ``(B, K)`` tensor given."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"Expected `targets` to be a torch.Tensor, but got {type(targets).__name__}.")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1
    ):
        raise ValueError(f"Expected `num_classes` to be a positive int, but got {num_classes!r}.")
    if batch_size is not None and (targets.ndim == 0 or targets.shape[0] != batch_size):
        raise ValueError(
            "Expected `targets` to have one entry per image, but the batch sizes do not match:"
            f" {targets.shape[0] if targets.ndim else 'a scalar'} != {batch_size}."
        )
    indices = not targets.is_floating_point()
    if indices and targets.ndim == 2 and targets.shape[1] == 1:
        targets = targets.squeeze(1)
    if indices and targets.ndim == 1:
        if num_classes is None:
            raise ValueError(
                "Expected `num_classes` for class-index targets of shape (B,), but got None."
                " Pass `num_classes=K` or give one-hot/probability targets of shape (B, K)."
            )
        return targets
    if indices and targets.ndim == 2:
        raise ValueError(
            "Expected `targets` to be class indices (B,) or float probabilities (B, K), but got an integer tensor of"
            f" shape {tuple(targets.shape)}. Pass class indices (e.g. `targets.argmax(1)`) or float probabilities."
        )
    if targets.ndim != 2:
        raise ValueError(
            "Expected `targets` to be class indices of shape (B,) (an integer tensor) or probabilities of"
            f" shape (B, K), but got shape {tuple(targets.shape)} and dtype {targets.dtype}."
        )
    if num_classes is not None and targets.shape[1] != num_classes:
        raise ValueError(
            f"Expected soft `targets` of width `num_classes`, but the widths do not match: {targets.shape[1]} != {num_classes}."
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


def _checked_targets(targets: Tensor, num_classes: Optional[int], batch_size: Optional[int], smoothing: float) -> Tensor:
    """:func:`_targets` plus the class-index range and ``label_smoothing``: the public functions' checks."""
    if not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
        raise ValueError(f"Expected `label_smoothing` to be in [0, 1), but got {smoothing!r}.")
    targets = _targets(targets, num_classes, batch_size)
    if targets.ndim == 1:
        _check_class_index_range(targets, int(num_classes))  # type: ignore[arg-type]
    return targets



def pairing_permutation(batch_size: int, *, generator: Generator = None, device: Optional[torch.device] = None) -> Tensor:
    """Draw a pairing ``p`` of ``range(batch_size)``: a uniform single cycle, so ``p[i] != i`` when ``batch_size > 1``.

    Example::

        >>> p = pairing_permutation(5, generator=np.random.default_rng(0))
        >>> bool((p != torch.arange(5)).all()), sorted(p.tolist())
        (True, [0, 1, 2, 3, 4])
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}.")
    order = _rng(generator).permutation(batch_size)
    permutation = np.empty(batch_size, dtype=np.int64)
    permutation[order] = np.roll(order, -1)  # p[order[i]] = order[i + 1]
    return torch.from_numpy(permutation).to(device)


def sample_beta(alpha: float, size: int, *, generator: Generator = None, device: Optional[torch.device] = None) -> Tensor:
    """Draw ``size`` samples of ``Beta(alpha, alpha)`` as float32.

    Example::

        >>> lam = sample_beta(1.0, 3, generator=np.random.default_rng(0))
        >>> lam.shape, bool(((lam >= 0) & (lam <= 1)).all())
        (torch.Size([3]), True)
    """
    _check_alpha(alpha)
    return torch.from_numpy(_rng(generator).beta(alpha, alpha, size)).float().to(device)



def attention_grid(features: Tensor, grid_size: Size2 = 7, reduction: Reduction = "mean") -> Tensor:
    """Reduce a ``(B, C, h, w)`` feature map over channels (``"mean"``, the paper, or ``"max"``) to ``(B, gh, gw)``.

    A grid coarser than ``(h, w)`` averages the feature cells that each cell covers; the dtype is kept.

    Raises:
        ValueError: if ``features`` is not 4-D, ``reduction`` is unknown or the grid is finer than ``(h, w)``.

    Example::

        >>> attention_grid(torch.rand(2, 2048, 14, 14), grid_size=7).shape
        torch.Size([2, 7, 7])
    """
    if not isinstance(features, Tensor) or features.ndim != 4:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"Expected `features` to be a 4-D feature map (B, C, h, w), but got {shape}.")
    (gh, gw), (h, w) = _pair(grid_size, "grid_size"), features.shape[-2:]
    if gh > h or gw > w:
        raise ValueError(
            f"Expected `grid_size` to be at most the feature map size {h}x{w}, but got {gh}x{gw}."
            " Use a coarser grid, a larger attention input size, or an earlier layer with a finer map."
        )
    if reduction not in ("mean", "max"):
        raise ValueError(f"Expected `reduction` to be one of 'mean', 'max', but got {reduction!r}.")
    reduced = features.mean(dim=1, keepdim=True) if reduction == "mean" else features.amax(dim=1, keepdim=True)
    return (reduced if (gh, gw) == (h, w) else F.adaptive_avg_pool2d(reduced, (gh, gw))).squeeze(1)


def cell_index_maps(grid: tuple[int, int], image_size: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(row_cells (H,), col_cells (W,))``: pixel row ``r`` lies in cell row ``floor(r * gh / H)`` (columns alike).

    The tiling is exact when the grid divides the image, otherwise cells differ by at most one pixel.
    """
    (gh, gw), (height, width) = grid, image_size
    return torch.arange(height, device=device) * gh // height, torch.arange(width, device=device) * gw // width


def _expand(cells: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``(B, gh, gw)`` -> ``(B, 1, H, W)``, each pixel taking the value of its cell (two index gathers)."""
    rows, cols = cell_index_maps((cells.shape[1], cells.shape[2]), image_size, cells.device)
    return cells.index_select(1, rows).index_select(2, cols).unsqueeze(1)


def expand_grid(heatmaps: Tensor, image_size: Size2) -> Tensor:
    """Nearest-cell upsampling of ``(B, gh, gw)`` grids to ``(B, 1, H, W)``, on the tiling of the masks.

    Example::

        >>> expand_grid(torch.arange(4.0).view(1, 2, 2), 4)[0, 0]
        tensor([[0., 0., 1., 1.],
                [0., 0., 1., 1.],
                [2., 2., 3., 3.],
                [2., 2., 3., 3.]])
    """
    _check_heatmaps(heatmaps)
    size = _pair(image_size, "image_size")
    _check_grid_fits(heatmaps.shape[1:], size)
    return _expand(heatmaps, size)


def _topk_cells(heatmaps: Tensor, top_k: int) -> Tensor:
    """:func:`topk_cell_indices` without the checks: stable sorts by score, then NaN last."""
    scores = heatmaps.flatten(1).double()
    is_nan = scores.isnan()
    order = torch.sort(scores.masked_fill(is_nan, -math.inf), dim=1, descending=True, stable=True).indices
    nan_last = torch.sort(is_nan.gather(1, order).byte(), dim=1, stable=True).indices
    return order.gather(1, nan_last)[:, :top_k]


def topk_cell_indices(heatmaps: Tensor, top_k: int) -> Tensor:
    """Row-major indices ``r * gw + c`` ``(B, top_k)`` of the ``top_k`` highest cells of ``(B, gh, gw)`` maps, hottest first.

    Ties go to the cell that comes first in row-major order, NaN ranks below every number: a
    constant (or all-NaN) heatmap gives its first ``top_k`` cells.

    Raises:
        ValueError: if ``top_k`` is not in ``[1, gh * gw]``.

    Example::

        >>> topk_cell_indices(torch.tensor([[[0.1, 0.9], [0.5, 0.5]]]), top_k=3)
        tensor([[1, 2, 3]])
    """
    _check_heatmaps(heatmaps)
    _check_grid_fits(heatmaps.shape[1:], heatmaps.shape[1:], top_k)
    return _topk_cells(heatmaps, top_k)


def _cell_mask(cell_indices: Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    chosen = torch.zeros(cell_indices.shape[0], grid[0] * grid[1], dtype=torch.bool, device=cell_indices.device)
    return _expand(chosen.scatter_(1, cell_indices.long(), True).view(-1, *grid), image_size)


def cell_mask(cell_indices: Tensor, grid_size: Size2, image_size: Size2) -> Tensor:
    """``(B, 1, H, W)`` bool mask of the union of the ``(B, k)`` row-major cells of a grid, tiled as
    :func:`cell_index_maps` says; ``grid_size`` and ``image_size`` are an int (square) or ``(h, w)``.

    Example::

        >>> cell_mask(torch.tensor([[2]]), grid_size=2, image_size=4)[0, 0].int()
        tensor([[0, 0, 0, 0],
                [0, 0, 0, 0],
                [1, 1, 0, 0],
                [1, 1, 0, 0]], dtype=torch.int32)
    """
    grid, size = _pair(grid_size, "grid_size"), _pair(image_size, "image_size")
    _check_grid_fits(grid, size)
    if not isinstance(cell_indices, Tensor) or cell_indices.dtype not in (torch.int64, torch.int32) or cell_indices.ndim != 2:
        raise TypeError("Expected `cell_indices` to be an integer tensor of shape (B, k), e.g. from `topk_cell_indices`.")
    if cell_indices.numel() > 0 and not 0 <= int(cell_indices.min()) <= int(cell_indices.max()) < grid[0] * grid[1]:
        raise ValueError(f"Expected `cell_indices` in [0, {grid[0] * grid[1]}) for a {grid[0]}x{grid[1]} grid.")
    return _cell_mask(cell_indices, grid, size)


def topk_cell_mask(heatmaps: Tensor, top_k: int, image_size: Size2) -> Tensor:
    """``(B, 1, H, W)`` bool union of the ``top_k`` highest cells of each heatmap (ranked as
    :func:`topk_cell_indices`, tiled as :func:`cell_index_maps`).

    Raises:
        ValueError: if ``top_k`` is out of range or the image is smaller than the grid.

    Example::

        >>> heatmap = torch.zeros(1, 2, 2)
        >>> heatmap[0, 1, 0] = 1.0  # bottom-left cell is the hottest
        >>> topk_cell_mask(heatmap, top_k=1, image_size=4)[0, 0].int()
        tensor([[0, 0, 0, 0],
                [0, 0, 0, 0],
                [1, 1, 0, 0],
                [1, 1, 0, 0]], dtype=torch.int32)
    """
    _check_heatmaps(heatmaps)
    grid, size = (heatmaps.shape[1], heatmaps.shape[2]), _pair(image_size, "image_size")
    _check_grid_fits(grid, size, top_k)
    return _cell_mask(_topk_cells(heatmaps, top_k), grid, size)


def _mask_share(mask: Tensor) -> Tensor:
    """``(B,)`` float32 share of each mask that is set; a float64 quotient rounds alike on every device."""
    flat = mask.flatten(1)
    return (flat.sum(1, dtype=torch.float64) / flat.shape[1]).float()


def _box_mask(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``(B, 1, H, W)`` bool mask inside ``(B, 4)`` boxes ``(top, bottom, left, right)``, bottom/right exclusive."""
    top, bottom, left, right = boxes.unsqueeze(2).unbind(1)
    rows, cols = (torch.arange(n, device=boxes.device) for n in image_size)
    return (((rows >= top) & (rows < bottom)).unsqueeze(2) & ((cols >= left) & (cols < right)).unsqueeze(1)).unsqueeze(1)


def _cutmix_boxes(area: np.ndarray, image_size: tuple[int, int], generator: np.random.Generator) -> Tensor:
    """``(B, 4)`` int64 boxes of the image's aspect ratio and ``area``, centred uniformly, clipped to the border."""
    (height, width), side = image_size, np.sqrt(np.clip(area, 0.0, 1.0)) / 2
    centre_y, centre_x = generator.uniform(0, height, area.shape[0]), generator.uniform(0, width, area.shape[0])
    bounds = [centre_y - side * height, centre_y + side * height, centre_x - side * width, centre_x + side * width]
    limits = [height, height, width, width]
    return torch.from_numpy(np.stack([np.clip(np.round(v), 0, n) for v, n in zip(bounds, limits)], axis=1).astype(np.int64))


def cutmix_box_mask(
    batch_size: int, image_size: Size2, area: Tensor, *, generator: Generator = None, device: Optional[torch.device] = None
) -> Tensor:
    """One box per sample, ``(B, 1, H, W)`` bool, of the image's aspect ratio and ``area[i]`` of its size.

    Its centre is uniform over the image (as in CutMix), so boxes near the border are clipped: the
    pasted fraction is the mask's mean, which is what the mixing ops use as ``lam``.

    Example::

        >>> cutmix_box_mask(2, 8, torch.tensor([0.0, 0.5]), generator=np.random.default_rng(0)).shape
        torch.Size([2, 1, 8, 8])
    """
    size = _pair(image_size, "image_size")
    if not isinstance(area, Tensor) or tuple(area.shape) != (batch_size,):
        shape = tuple(area.shape) if isinstance(area, Tensor) else type(area).__name__
        raise ValueError(f"Expected `area` to have shape ({batch_size},), but got shape {shape}.")
    return _box_mask(_cutmix_boxes(area.detach().cpu().double().numpy(), size, _rng(generator)).to(device), size)



def paste(images: Tensor, mask: Tensor, permutation: Tensor) -> Tensor:
    """``mixed[i] = where(mask[i], images[p[i]], images[i])``, ``mask`` boolean and broadcastable to ``images``.

    Example::

        >>> images = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
        >>> paste(images, torch.tensor([True, False]).view(1, 1, 1, 2), torch.tensor([1, 0]))[0, 0]
        tensor([[1., 0.],
                [1., 0.]])
    """
    _check_images(images)
    permutation = _check_permutation(permutation, images.shape[0])
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError("Expected `mask` to be a boolean tensor broadcastable to `images`, e.g. (B, 1, H, W).")
    return torch.where(mask, images.index_select(0, permutation), images)


def _probabilities(targets: Tensor, num_classes: Optional[int], label_smoothing: float) -> Tensor:
    """Targets checked by :func:`_targets` as float probabilities ``(B, K)``, smoothed."""
    if targets.ndim == 1:
        probabilities = F.one_hot(targets.long(), int(num_classes)).float()  # type: ignore[arg-type]
    else:
        probabilities = targets.to(torch.promote_types(targets.dtype, torch.float32))
    if label_smoothing > 0:
        probabilities = probabilities * (1.0 - label_smoothing) + label_smoothing / probabilities.shape[1]
    return probabilities


def to_probabilities(targets: Tensor, num_classes: Optional[int] = None, *, label_smoothing: float = 0.0) -> Tensor:
    """Class indices ``(B,)`` or ``(B, 1)``, or probabilities ``(B, K)``, as float probabilities ``(B, K)``.

    Index targets need ``num_classes`` and must lie in ``[0, num_classes)``; float targets must be
    ``num_classes`` wide (when given), non-negative, with rows that sum to 1 within the rounding of
    their dtype (``max(0.01, 4 * eps)``).

    Raises:
        TypeError: if ``targets`` is not a tensor.
        ValueError: for a missing ``num_classes``, out-of-range labels, integer targets wider than 1,
            or soft targets of the wrong width, negative, or whose rows do not sum to 1.

    Example::

        >>> to_probabilities(torch.tensor([[1], [0]]), 3, label_smoothing=0.3)
        tensor([[0.1000, 0.8000, 0.1000],
                [0.8000, 0.1000, 0.1000]])
    """
    return _probabilities(_checked_targets(targets, num_classes, None, label_smoothing), num_classes, label_smoothing)


def _mix_targets(targets: Tensor, lam: Tensor, permutation: Tensor, num_classes: Optional[int], label_smoothing: float) -> Tensor:
    """:func:`mix_targets` for targets checked by :func:`_targets`."""
    probabilities = _probabilities(targets, num_classes, label_smoothing)
    weight = lam.to(probabilities.device, probabilities.dtype).unsqueeze(1)
    return weight * probabilities.index_select(0, permutation) + (1.0 - weight) * probabilities


def mix_targets(
    targets: Tensor, lam: Tensor, permutation: Tensor, num_classes: Optional[int] = None, *, label_smoothing: float = 0.0
) -> Tensor:
    """``soft[i] = lam[i] * y[p[i]] + (1 - lam[i]) * y[i]``, ``y`` from :func:`to_probabilities` (same errors).

    Example::

        >>> mix_targets(torch.tensor([0, 2]), torch.tensor([0.25, 0.5]), torch.tensor([1, 0]), 3)
        tensor([[0.7500, 0.0000, 0.2500],
                [0.5000, 0.0000, 0.5000]])
    """
    targets = _checked_targets(targets, num_classes, lam.shape[0], label_smoothing)
    permutation = _check_permutation(permutation, lam.shape[0])
    return _mix_targets(targets, lam, permutation.to(targets.device), num_classes, label_smoothing)


def mix_with_mask(
    images: Tensor, targets: Tensor, mask: Tensor, permutation: Tensor, num_classes: Optional[int] = None, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Paste ``images[p]`` inside ``mask`` with ``lam`` the mask's mean: ``(mixed, soft_targets, lam)``."""
    mixed = paste(images, mask, permutation)
    lam = _mask_share(mask.expand(images.shape[0], 1, *images.shape[-2:]))
    return mixed, mix_targets(targets, lam, permutation, num_classes, label_smoothing=label_smoothing), lam


def _prepare(
    images: Tensor, targets: Tensor, num_classes: Optional[int], permutation: Optional[Tensor], generator: Generator, smoothing: float
) -> tuple[Tensor, Tensor, np.random.Generator]:
    """The mixing ops' checks: ``(targets, permutation on the images' device, generator)``."""
    _check_images(images)
    targets, generator = _checked_targets(targets, num_classes, images.shape[0], smoothing), _rng(generator)
    if permutation is None:
        return targets, pairing_permutation(images.shape[0], generator=generator, device=images.device), generator
    return targets, _check_permutation(permutation, images.shape[0]).to(images.device), generator


def _paste_topk_cells(images: Tensor, partner_heatmaps: Tensor, top_k: int, permutation: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Paste the ``top_k`` hottest cells of ``partner_heatmaps[i]``, the map of ``images[p[i]]``:
    ``(mixed, lam, cell_indices (B, top_k))``."""
    _check_grid_fits(partner_heatmaps.shape[1:], images.shape[2:], top_k)
    cells = _topk_cells(partner_heatmaps.to(images.device), top_k)
    mask = _cell_mask(cells, (partner_heatmaps.shape[1], partner_heatmaps.shape[2]), (images.shape[2], images.shape[3]))
    return torch.where(mask, images.index_select(0, permutation), images), _mask_share(mask), cells


def attentive_cutmix(
    images: Tensor,
    targets: Tensor,
    heatmaps: Tensor,
    *,
    top_k: int = 6,
    num_classes: Optional[int] = None,
    permutation: Optional[Tensor] = None,
    generator: Generator = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attentive CutMix (Walawalkar et al., 2020): paste the ``top_k`` hottest cells of each partner.

    ``mixed[i]`` is ``images[p[i]]`` inside ``topk_cell_mask(heatmaps[p[i]])`` and ``images[i]``
    outside: ``heatmaps[i]`` is the ``(gh, gw)`` attention of ``images[i]``, and the cells come from
    the map of the pasted image. ``top_k`` is in ``[1, gh * gw]`` (6 of 7x7 in the paper); see the
    module docstring for the other arguments and the result.

    Raises:
        ValueError: for bad shapes, ``top_k``, targets (see :func:`to_probabilities`) or ``permutation``.

    Example::

        >>> images = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
        >>> heatmaps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
        >>> mixed, soft, lam = attentive_cutmix(
        ...     images, torch.tensor([0, 1]), heatmaps, top_k=1, num_classes=2, permutation=torch.tensor([1, 0])
        ... )
        >>> mixed[0, 0]  # image 1's hottest cell (bottom right) pasted onto image 0
        tensor([[0., 0., 0., 0.],
                [0., 0., 0., 0.],
                [0., 0., 1., 1.],
                [0., 0., 1., 1.]])
        >>> lam, soft[0]
        (tensor([0.2500, 0.2500]), tensor([0.7500, 0.2500]))
    """
    _check_images(images)
    _check_heatmaps(heatmaps, images.shape[0])
    _check_grid_fits(heatmaps.shape[1:], images.shape[2:], top_k)
    targets, permutation, _ = _prepare(images, targets, num_classes, permutation, generator, label_smoothing)
    partner_heatmaps = heatmaps.to(images.device).index_select(0, permutation)
    mixed, lam, _ = _paste_topk_cells(images, partner_heatmaps, top_k, permutation)
    return mixed, _mix_targets(targets, lam, permutation, num_classes, label_smoothing), lam


def _cutmix_paste(
    images: Tensor, permutation: Tensor, alpha: float, generator: np.random.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw CutMix's boxes (areas, then centres) and paste them: ``(mixed, lam, boxes (B, 4))``."""
    size = (images.shape[2], images.shape[3])
    boxes = _cutmix_boxes(generator.beta(alpha, alpha, images.shape[0]), size, generator)
    lam = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).double().div(size[0] * size[1]).float()
    boxes = boxes.to(images.device)
    mixed = torch.where(_box_mask(boxes, size), images.index_select(0, permutation), images)
    return mixed, lam.to(images.device), boxes


def cutmix(
    images: Tensor,
    targets: Tensor,
    *,
    alpha: float = 1.0,
    num_classes: Optional[int] = None,
    permutation: Optional[Tensor] = None,
    generator: Generator = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """CutMix (Yun et al., 2019): paste one box of each partner, of area ``~ Beta(alpha, alpha)`` and
    uniform centre; ``lam`` is the pasted fraction after clipping at the border.

    Example::

        >>> images, labels = torch.rand(8, 3, 32, 32), torch.arange(8)
        >>> mixed, soft, lam = cutmix(images, labels, num_classes=8, generator=np.random.default_rng(0))
        >>> torch.allclose(soft.sum(1), torch.ones(8))
        True
    """
    _check_alpha(alpha)
    targets, permutation, generator = _prepare(images, targets, num_classes, permutation, generator, label_smoothing)
    mixed, lam, _ = _cutmix_paste(images, permutation, alpha, generator)
    return mixed, _mix_targets(targets, lam, permutation, num_classes, label_smoothing), lam


def _mixup_blend(images: Tensor, permutation: Tensor, alpha: float, generator: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Draw Mixup's ``lam`` and blend: ``(lam * images[p] + (1 - lam) * images, lam)``."""
    if not images.is_floating_point():
        raise TypeError(
            f"Expected floating-point `images` for mixup, but got dtype {images.dtype}."
            " Convert the batch first, e.g. `images.float() / 255`."
        )
    lam = sample_beta(alpha, images.shape[0], generator=generator, device=images.device)
    return images.lerp(images.index_select(0, permutation), lam.to(images.dtype).view(-1, 1, 1, 1)), lam


def mixup(
    images: Tensor,
    targets: Tensor,
    *,
    alpha: float = 1.0,
    num_classes: Optional[int] = None,
    permutation: Optional[Tensor] = None,
    generator: Generator = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mixup (Zhang et al., 2018): ``mixed[i] = lam[i] * images[p[i]] + (1 - lam[i]) * images[i]``,
    ``lam ~ Beta(alpha, alpha)`` per sample; the images must be floating-point.

    Example::

        >>> images, labels = torch.rand(8, 3, 32, 32), torch.arange(8)
        >>> mixed, soft, lam = mixup(images, labels, num_classes=8, generator=np.random.default_rng(0))
        >>> mixed.shape, lam.shape
        (torch.Size([8, 3, 32, 32]), torch.Size([8]))
    """
    _check_alpha(alpha)
    targets, permutation, generator = _prepare(images, targets, num_classes, permutation, generator, label_smoothing)
    mixed, lam = _mixup_blend(images, permutation, alpha, generator)
    return mixed, _mix_targets(targets, lam, permutation, num_classes, label_smoothing), lam


def pasted_attention_share(partner_heatmaps: Tensor, mask: Tensor) -> Tensor:
    """Share ``(B,)`` of each partner's attention mass inside the pasted region ``mask`` ``(B, 1, H, W)``.

    Heatmaps are shifted to a minimum of 0 and spread over the pixels of each cell; a heatmap with
    no mass (constant) gives the pasted area fraction, what a uniform heatmap would give.

    Example::

        >>> heat = torch.tensor([[[3.0, 1.0], [1.0, 1.0]]])
        >>> pasted_attention_share(heat, topk_cell_mask(heat, 1, 2))
        tensor([1.])
    """
    _check_heatmaps(partner_heatmaps, mask.shape[0])
    dense = expand_grid(partner_heatmaps.float().nan_to_num(0.0), tuple(mask.shape[-2:])).flatten(1)
    dense = dense - dense.amin(dim=1, keepdim=True)
    inside, total = mask.flatten(1), dense.sum(dim=1)
    share = (dense * inside).sum(dim=1) / total.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(total > 0, share, _mask_share(inside))


def _cell_attention_share(partner_heatmaps: Tensor, cell_indices: Tensor, image_size: tuple[int, int]) -> Tensor:
    """:func:`pasted_attention_share` of a region made of whole cells, computed on the grid."""
    _, gh, gw = partner_heatmaps.shape
    rows, cols = cell_index_maps((gh, gw), image_size, partner_heatmaps.device)
    area = (torch.bincount(rows, minlength=gh).unsqueeze(1) * torch.bincount(cols, minlength=gw)).flatten().float()
    heat = partner_heatmaps.float().nan_to_num(0.0).flatten(1)
    heat = heat - heat.amin(dim=1, keepdim=True)
    total, pasted_area = heat @ area, area[cell_indices]
    inside = (heat.gather(1, cell_indices) * pasted_area).sum(dim=1)
    pasted = (pasted_area.sum(dim=1).double() / (image_size[0] * image_size[1])).float()
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(torch.float32).tiny), pasted)
