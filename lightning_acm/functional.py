"""Pure tensor ops for Attentive CutMix, CutMix and Mixup (no Lightning import).

Conventions used throughout this module:

* images are ``(B, C, H, W)``; heatmaps are ``(B, gh, gw)``; masks are boolean ``(B, 1, H, W)``.
* ``permutation`` ``p`` pairs sample ``i`` with its *partner* ``p[i]``: the partner is the
  pasted image ``x_A = images[p[i]]`` and ``images[i]`` is the canvas ``x_B``.
* ``lam[i]`` is the fraction of ``mixed[i]`` that came from the partner, so
  ``soft_targets[i] = lam[i] * y[p[i]] + (1 - lam[i]) * y[i]``.
* All randomness (pairing, box positions, Beta draws) is drawn on the CPU from the given
  ``torch.Generator`` (or torch's global generator) and then moved to the images' device,
  so the same seed gives the same mixes on every device and no sampling needs a sync.

Example::

    >>> import torch
    >>> from lightning_acm.functional import attentive_cutmix
    >>> images, labels = torch.rand(4, 3, 224, 224), torch.tensor([0, 1, 2, 3])
    >>> heatmaps = torch.rand(4, 7, 7)
    >>> mixed, soft, lam = attentive_cutmix(
    ...     images, labels, heatmaps, top_k=6, num_classes=10, generator=torch.Generator().manual_seed(0)
    ... )
    >>> mixed.shape, soft.shape, lam
    (torch.Size([4, 3, 224, 224]), torch.Size([4, 10]), tensor([0.1224, 0.1224, 0.1224, 0.1224]))
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "attention_grid",
    "attentive_cutmix",
    "cell_index_maps",
    "cell_mask",
    "cutmix",
    "cutmix_box_mask",
    "expand_grid",
    "mix_targets",
    "mix_with_mask",
    "mixup",
    "pairing_permutation",
    "paste",
    "paste_cells",
    "paste_topk_cells",
    "pasted_attention_share",
    "sample_beta",
    "sample_cutmix_mask",
    "to_probabilities",
    "topk_cell_indices",
    "topk_cell_mask",
]

Size2 = Union[int, tuple[int, int]]
Reduction = Literal["mean", "max"]


# --------------------------------------------------------------------------- validation


def _pair(value: Size2, name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be an int or a pair of ints, but got {value!r}.")
    if isinstance(value, int):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        pair = (int(value[0]), int(value[1]))
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


def _check_label_smoothing(label_smoothing: float) -> None:
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"Expected `label_smoothing` to be in [0, 1), but got {label_smoothing!r}.")


def _check_permutation(permutation: Tensor, batch_size: int) -> None:
    if not isinstance(permutation, Tensor) or permutation.dtype not in (torch.int64, torch.int32):
        raise TypeError("Expected `permutation` to be an integer tensor of shape (B,), e.g. `torch.randperm(B)`.")
    if tuple(permutation.shape) != (batch_size,):
        raise ValueError(
            f"Expected `permutation` to have shape ({batch_size},), but got shape {tuple(permutation.shape)}."
        )
    expected = torch.arange(batch_size, device=permutation.device)
    if not torch.equal(permutation.sort().values.long(), expected):
        raise ValueError(
            "Expected `permutation` to be a permutation of range(B) (each index exactly once),"
            f" but got {permutation.tolist()}."
        )


# --------------------------------------------------------------------------- randomness


def pairing_permutation(
    batch_size: int, *, generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None
) -> Tensor:
    """Draw a pairing ``p`` of ``range(batch_size)`` that never pairs a sample with itself.

    The pairing is a uniformly drawn single cycle (so ``p[i] != i`` whenever ``batch_size > 1``);
    with one sample it is ``[0]``. It is drawn on the CPU and moved to ``device``.

    Example::

        >>> p = pairing_permutation(5, generator=torch.Generator().manual_seed(0))
        >>> bool((p != torch.arange(5)).all())
        True
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be a positive int, but got {batch_size!r}.")
    order = torch.randperm(batch_size, generator=generator)
    permutation = torch.empty_like(order).index_copy_(0, order, order.roll(-1))  # p[order[i]] = order[i + 1]
    # non_blocking: a host-to-device copy from pageable memory is staged at once, without the stream sync.
    return permutation.to(device, non_blocking=True) if device is not None else permutation


def sample_beta(
    alpha: float, size: int, *, generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None
) -> Tensor:
    """Draw ``size`` samples of ``Beta(alpha, alpha)`` (float32) from ``generator``.

    ``torch.distributions.Beta`` cannot take a generator, so the draw uses two Gamma variates
    from Marsaglia and Tsang's method, vectorized with rejection rounds (not a loop per sample).

    Example::

        >>> lam = sample_beta(1.0, 3, generator=torch.Generator().manual_seed(0))
        >>> lam.shape, bool(((lam >= 0) & (lam <= 1)).all())
        (torch.Size([3]), True)
    """
    _check_alpha(alpha)
    gamma = _sample_gamma(float(alpha), 2 * size, generator)
    first, second = gamma[:size], gamma[size:]
    total = first + second
    # Both Gamma draws can underflow to 0 for tiny alpha; Beta then puts its mass on {0, 1}.
    lam = torch.where(total > 0, first / total.clamp_min(torch.finfo(torch.float64).tiny), (first >= second).double())
    lam = lam.float()
    return lam.to(device, non_blocking=True) if device is not None else lam


def _serial_log(values: Tensor) -> Tensor:
    """``log`` of a small CPU float64 tensor without entering an OpenMP region.

    ``torch.log``, ``torch.sqrt`` and ``torch.exp`` of CPU tensors enter a parallel region even
    for 256 values (their time grows with the thread count; that of ``xlogy`` and ``pow`` does
    not). In a training process whose cores are busy with DataLoader workers that region can
    wait milliseconds for its threads: on a 16-core H100 host, ``torch.profiler`` measured 4 ms per ``log`` and 11 ms per ``sqrt`` of CutMix's
    draws, and CutMix trained at half the speed of no mixing. ``xlogy(1, x)`` is ``1 * log(x)``
    with the C library's ``log``, one value at a time.
    """
    return torch.special.xlogy(1.0, values)


def _serial_sqrt(values: Tensor) -> Tensor:
    """``sqrt`` of a small CPU float64 tensor, correctly rounded, without an OpenMP region (see :func:`_serial_log`)."""
    return torch.tensor([math.sqrt(v) for v in values.tolist()], dtype=torch.float64)


def _sample_gamma(shape: float, size: int, generator: Optional[torch.Generator]) -> Tensor:
    boost = shape < 1.0
    k = shape + 1.0 if boost else shape
    d = k - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(size, dtype=torch.float64)
    pending = torch.arange(size)
    while pending.numel() > 0:
        n = pending.numel()
        x = torch.randn(n, generator=generator, dtype=torch.float64)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        accept = (v > 0) & (_serial_log(u) < 0.5 * x * x + d - d * v + d * _serial_log(v.clamp_min(1e-300)))
        out[pending[accept]] = d * v[accept]
        pending = pending[~accept]
    if boost:
        u = torch.rand(size, generator=generator, dtype=torch.float64)
        out = out * u.pow(1.0 / shape)
    return out


# --------------------------------------------------------------------------- heatmaps and masks


def attention_grid(features: Tensor, grid_size: Size2 = 7, reduction: Reduction = "mean") -> Tensor:
    """Reduce a ``(B, C, h, w)`` feature map over channels and pool it to a ``(B, gh, gw)`` grid.

    Args:
        features: the attention model's feature map, e.g. ``(B, 2048, 7, 7)`` from ResNet-152.
        grid_size: cells per side (``int``) or ``(gh, gw)``; must not be finer than ``(h, w)``.
        reduction: ``"mean"`` (the paper) or ``"max"`` over the channels.

    Returns:
        ``(B, gh, gw)`` heatmaps in the dtype of ``features``; when the grid is coarser than the
        feature map, each cell is the average over the feature cells it covers.

    Raises:
        ValueError: if ``features`` is not 4-D, ``reduction`` is unknown or the grid is too fine.

    Example::

        >>> attention_grid(torch.rand(2, 2048, 14, 14), grid_size=7).shape
        torch.Size([2, 7, 7])
    """
    if not isinstance(features, Tensor) or features.ndim != 4:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"Expected `features` to be a 4-D feature map (B, C, h, w), but got {shape}.")
    gh, gw = _pair(grid_size, "grid_size")
    h, w = features.shape[-2:]
    if gh > h or gw > w:
        raise ValueError(
            f"Expected `grid_size` to be at most the feature map size {h}x{w}, but got {gh}x{gw}."
            " Use a coarser grid, a larger attention input size, or an earlier layer with a finer map."
        )
    if reduction == "mean":
        reduced = features.mean(dim=1, keepdim=True)
    elif reduction == "max":
        reduced = features.amax(dim=1, keepdim=True)
    else:
        raise ValueError(f"Expected `reduction` to be one of 'mean', 'max', but got {reduction!r}.")
    if (gh, gw) != (h, w):
        reduced = F.adaptive_avg_pool2d(reduced, (gh, gw))
    return reduced.squeeze(1)


def cell_index_maps(grid: tuple[int, int], image_size: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    """Map each pixel row and column to its grid cell (as evenly as possible; exact when divisible).

    Row ``r`` of an ``H``-pixel image lies in cell row ``floor(r * gh / H)``, so cells differ in
    height by at most one pixel. Returns ``(row_cells (H,), col_cells (W,))`` of dtype long.
    """
    (gh, gw), (height, width) = grid, image_size
    rows = torch.arange(height, device=device) * gh // height
    cols = torch.arange(width, device=device) * gw // width
    return rows, cols


def expand_grid(heatmaps: Tensor, image_size: Size2) -> Tensor:
    """Nearest-cell upsampling of ``(B, gh, gw)`` grids to ``(B, 1, H, W)`` on the same tiling as the masks.

    Example::

        >>> expand_grid(torch.arange(4.0).view(1, 2, 2), 4)[0, 0]
        tensor([[0., 0., 1., 1.],
                [0., 0., 1., 1.],
                [2., 2., 3., 3.],
                [2., 2., 3., 3.]])
    """
    _check_heatmaps(heatmaps)
    height, width = _pair(image_size, "image_size")
    gh, gw = heatmaps.shape[-2:]
    _check_grid_fits(gh, gw, height, width)
    rows, cols = cell_index_maps((gh, gw), (height, width), heatmaps.device)
    return heatmaps.index_select(1, rows).index_select(2, cols).unsqueeze(1)


def _check_grid_fits(gh: int, gw: int, height: int, width: int) -> None:
    if gh > height or gw > width:
        raise ValueError(
            f"Expected `image_size` to be at least the grid size {gh}x{gw}, but got {height}x{width}."
            " Use a coarser `grid_size` for such small images."
        )


def _check_top_k(top_k: int, gh: int, gw: int) -> None:
    cells = gh * gw
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= cells:
        raise ValueError(f"Expected `top_k` to be in [1, {cells}] for a {gh}x{gw} grid, but got {top_k!r}.")


_HIGH_WORD = 1 << 32


def _ranking_key(scores: Tensor) -> Tensor:
    """A unique int64 key per float32 score whose order is the ranking of :func:`topk_cell_indices`.

    The high 32 bits are the score's bits made monotone (so integer order is float order, -0.0
    first folded into +0.0, NaN below -inf); the low 32 bits favour the earlier cell, which
    breaks ties in row-major order. Unique keys make ``topk`` deterministic on every device.
    """
    bits = (scores + 0.0).view(torch.int32)
    monotone = (bits >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)
    monotone.masked_fill_(torch.isnan(scores), torch.iinfo(torch.int32).min)
    return torch.add(_earlier_first(scores.shape[1], scores.device), monotone.long(), alpha=_HIGH_WORD)


@functools.lru_cache(maxsize=16)
def _earlier_first(cells: int, device: torch.device) -> Tensor:
    return torch.arange(cells - 1, -1, -1, device=device)


def topk_cell_indices(heatmaps: Tensor, top_k: int) -> Tensor:
    """Row-major indices ``r * gw + c`` of the ``top_k`` highest cells of each heatmap, hottest first.

    Ties are broken deterministically in favour of the cell that comes first in row-major
    order, and NaN scores rank below every number: a constant (or all-NaN) heatmap selects
    its first ``top_k`` cells in row-major order.

    Args:
        heatmaps: ``(B, gh, gw)`` scores.
        top_k: number of cells to select, in ``[1, gh * gw]``.

    Returns:
        ``(B, top_k)`` int64 indices on the heatmaps' device.

    Raises:
        ValueError: if ``top_k`` is out of range.

    Example::

        >>> topk_cell_indices(torch.tensor([[[0.1, 0.9], [0.5, 0.5]]]), top_k=3)
        tensor([[1, 2, 3]])
    """
    _check_heatmaps(heatmaps)
    _check_top_k(top_k, *heatmaps.shape[-2:])
    return _topk_cells(heatmaps, top_k)


def _topk_cells(heatmaps: Tensor, top_k: int) -> Tensor:
    """:func:`topk_cell_indices` once ``heatmaps`` and ``top_k`` were checked."""
    batch, gh, gw = heatmaps.shape
    scores = heatmaps.reshape(batch, gh * gw)
    if scores.dtype in (torch.float16, torch.bfloat16, torch.float32):
        scores = scores.float()
        if scores.device.type == "cpu":
            # When the top_k + 1 highest scores of every row strictly decrease (no tie, no NaN, no
            # signed zeros among them), one float top-k gives the same cells in the same order.
            # Checking that needs the values on the host: free on the CPU, a sync on accelerators.
            values, indices = torch.topk(scores, min(top_k + 1, gh * gw), dim=1)
            if bool((values[:, :-1] > values[:, 1:]).all()):
                return indices[:, :top_k]
        return torch.topk(_ranking_key(scores), top_k, dim=1).indices
    # float64 and integer maps: rank in float64 with stable sorts, keeping ties in row-major order.
    scores = scores.to(torch.float64)
    is_nan = torch.isnan(scores)
    order = torch.sort(torch.where(is_nan, -math.inf, scores), dim=1, descending=True, stable=True).indices
    # A second stable sort moves NaN below every number, real -inf included, keeping the order otherwise.
    nan_last = torch.sort(is_nan.gather(1, order).to(torch.uint8), dim=1, stable=True).indices
    return order.gather(1, nan_last)[:, :top_k]


def _check_cell_indices(cell_indices: Tensor, batch_size: Optional[int], gh: int, gw: int) -> None:
    if not isinstance(cell_indices, Tensor) or cell_indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            "Expected `cell_indices` to be an integer tensor of shape (B, k), e.g. from `topk_cell_indices`."
        )
    if cell_indices.ndim != 2 or (batch_size is not None and cell_indices.shape[0] != batch_size):
        expected = "B" if batch_size is None else batch_size
        raise ValueError(
            f"Expected `cell_indices` to have shape ({expected}, k), but got shape {tuple(cell_indices.shape)}."
        )
    if cell_indices.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(cell_indices))
    if low < 0 or high >= gh * gw:
        raise ValueError(
            f"Expected `cell_indices` in [0, {gh * gw}) for a {gh}x{gw} grid, but got values in [{low}, {high}]."
        )
    ordered = cell_indices.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("Expected the `cell_indices` of each sample to be distinct, but a row repeats a cell.")


def cell_mask(cell_indices: Tensor, grid_size: Size2, image_size: Size2) -> Tensor:
    """Pixel mask ``(B, 1, H, W)`` (bool) of the union of the given cells of a ``gh x gw`` grid.

    Cells tile the image as :func:`cell_index_maps` says: exactly when ``H`` and ``W`` are
    divisible by the grid, otherwise as evenly as possible.

    Args:
        cell_indices: ``(B, k)`` row-major cell indices ``r * gw + c``, e.g. from :func:`topk_cell_indices`.
        grid_size: ``gh`` (square) or ``(gh, gw)``.
        image_size: ``H`` (square) or ``(H, W)``.

    Example::

        >>> cell_mask(torch.tensor([[2]]), grid_size=2, image_size=4)[0, 0].int()
        tensor([[0, 0, 0, 0],
                [0, 0, 0, 0],
                [1, 1, 0, 0],
                [1, 1, 0, 0]], dtype=torch.int32)
    """
    gh, gw = _pair(grid_size, "grid_size")
    height, width = _pair(image_size, "image_size")
    _check_grid_fits(gh, gw, height, width)
    _check_cell_indices(cell_indices, None, gh, gw)
    return _cell_mask(cell_indices.long(), (gh, gw), (height, width))


def _cell_mask(
    cell_indices: Tensor,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    dtype: torch.dtype = torch.bool,
    value: Union[bool, int] = True,
) -> Tensor:
    """``(B, 1, H, W)`` mask of ``dtype``: ``value`` inside the given cells, 0 elsewhere."""
    batch, device = cell_indices.shape[0], cell_indices.device
    height, width = image_size
    if grid[1] <= _MAX_PATTERN_BITS:
        # Bit c of crossed[b, y] says whether pixel row y crosses a chosen cell in grid column c;
        # that bit pattern picks the pixel row of the mask from a table.
        patterns, row_bits = _row_patterns(grid, image_size, dtype, value, device)
        crossed = row_bits.index_select(0, cell_indices.flatten()).view(batch, -1, height).sum(1)
        return patterns.index_select(0, crossed.flatten()).view(batch, 1, height, width)
    pixel_cell = _tiling(grid, image_size, device)[0]
    chosen = torch.zeros(batch, grid[0] * grid[1], dtype=dtype, device=device)
    chosen.scatter_(1, cell_indices, value)
    return chosen.gather(1, pixel_cell.expand(batch, -1)).view(batch, 1, height, width)


# Grids up to this many columns build masks from a table of the 2**gw possible pixel rows.
_MAX_PATTERN_BITS = 8


@functools.lru_cache(maxsize=64)
def _row_patterns(
    grid: tuple[int, int], image_size: tuple[int, int], dtype: torch.dtype, value: Union[bool, int], device: torch.device
) -> tuple[Tensor, Tensor]:
    """The tables of :func:`_cell_mask` for narrow grids, built once per shape, dtype and device (read-only).

    Returns ``(patterns (2**gw, W), row_bits (gh * gw, H))``: row ``m`` of ``patterns`` is ``value``
    in the pixel columns of the grid columns ``c`` whose bit ``1 << c`` is set in ``m``, 0 elsewhere;
    ``row_bits[r * gw + c, y]`` is ``1 << c`` where pixel row ``y`` lies in grid row ``r``, 0 elsewhere.
    """
    gw, cells = grid[1], torch.arange(grid[0] * grid[1])
    pixel_row, pixel_col = cell_index_maps(grid, image_size, torch.device("cpu"))
    in_column = torch.arange(1 << gw).unsqueeze(1).bitwise_right_shift(pixel_col).bitwise_and(1).bool()
    patterns = torch.zeros(in_column.shape, dtype=dtype).masked_fill_(in_column, value)
    in_row = (cells // gw).unsqueeze(1) == pixel_row
    row_bits = torch.ones_like(cells).bitwise_left_shift(cells % gw).unsqueeze(1) * in_row
    return patterns.to(device), row_bits.to(device)


def topk_cell_mask(heatmaps: Tensor, top_k: int, image_size: Size2) -> Tensor:
    """Union of the ``top_k`` highest cells of each heatmap, as a pixel mask.

    Cells are ranked as in :func:`topk_cell_indices` (ties row-major first, NaN last).

    Args:
        heatmaps: ``(B, gh, gw)`` scores.
        top_k: number of cells to select, in ``[1, gh * gw]``.
        image_size: ``H`` (square) or ``(H, W)``; cells tile the image exactly when ``H`` and
            ``W`` are divisible by the grid, otherwise as evenly as possible (see
            :func:`cell_index_maps`).

    Returns:
        Boolean mask ``(B, 1, H, W)`` on the heatmaps' device.

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
    gh, gw = heatmaps.shape[-2:]
    _check_top_k(top_k, gh, gw)
    height, width = _pair(image_size, "image_size")
    _check_grid_fits(gh, gw, height, width)
    return _cell_mask(topk_cell_indices(heatmaps, top_k), (gh, gw), (height, width))


def _cell_sizes(cells: int, pixels: int) -> list[int]:
    """Pixels in each cell along one axis: cell ``j`` spans ``[ceil(j * n / g), ceil((j + 1) * n / g))``."""
    starts = [-(-j * pixels // cells) for j in range(cells + 1)]
    return [stop - start for start, stop in itertools.pairwise(starts)]


def _pixel_share(pixels: Tensor, total: int) -> Tensor:
    """``pixels / total`` in float32, correctly rounded on every device (the same bits on CPU and GPU).

    CUDA divides by a Python or CPU scalar as a product with its reciprocal, which is off by one
    ulp for some counts when ``total`` is not a power of two (224 * 224 is not); dividing by a
    0-dim tensor on the same device is a true division there, and what the CPU does anyway.
    """
    pixels = pixels.float()
    if pixels.device.type == "cpu":  # a true division already, and cheaper than with a tensor
        return pixels / total
    return pixels / torch.full((), total, dtype=torch.float32, device=pixels.device)


@functools.lru_cache(maxsize=64)
def _tiling(grid: tuple[int, int], image_size: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(pixel_cell (H * W,), cell_area (gh * gw,))`` of a tiling, built once per shape and device (read-only)."""
    rows, cols = cell_index_maps(grid, image_size, device)
    pixel_cell = (rows.unsqueeze(1) * grid[1] + cols).flatten()
    heights, widths = (_cell_sizes(cells, pixels) for cells, pixels in zip(grid, image_size, strict=True))
    cell_area = torch.tensor([h * w for h in heights for w in widths], device=device)
    return pixel_cell, cell_area


def paste_cells(images: Tensor, cell_indices: Tensor, grid_size: Size2, permutation: Tensor) -> tuple[Tensor, Tensor]:
    """Copy the given grid cells of each partner ``images[p[i]]`` onto ``images[i]``, at the same place.

    The same as ``paste(images, cell_mask(cell_indices, grid_size, (H, W)), permutation)``, but when
    the grid tiles the image exactly (and the batch is contiguous) only the pasted cells are
    copied, as rows of cell width, instead of selecting every pixel.

    Args:
        images: ``(B, C, H, W)`` batch.
        cell_indices: ``(B, k)`` row-major cell indices (distinct within a row), e.g. from
            :func:`topk_cell_indices` on the partners' heatmaps.
        grid_size: ``gh`` (square) or ``(gh, gw)``.
        permutation: the pairing ``p``, ``(B,)``.

    Returns:
        ``(mixed (B, C, H, W), lam (B,) float32)``, ``lam`` being the pasted pixel fraction.

    Example::

        >>> images = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
        >>> mixed, lam = paste_cells(images, torch.tensor([[3], [0]]), 2, torch.tensor([1, 0]))
        >>> mixed[0, 0], lam
        (tensor([[0., 0., 0., 0.],
                [0., 0., 0., 0.],
                [0., 0., 1., 1.],
                [0., 0., 1., 1.]]), tensor([0.2500, 0.2500]))
    """
    _check_images(images)
    batch = images.shape[0]
    grid = _pair(grid_size, "grid_size")
    _check_grid_fits(*grid, *images.shape[-2:])
    _check_cell_indices(cell_indices, batch, *grid)
    _check_permutation(permutation, batch)
    device = images.device
    cell_indices = cell_indices.to(device, torch.long)
    lam = _cell_lam(cell_indices, grid, (images.shape[-2], images.shape[-1]))
    return _paste_cell_pixels(images, cell_indices, grid, permutation.to(device, torch.long)), lam


def _cell_lam(cell_indices: Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """``(B,)`` float32 share of the image covered by the given cells (distinct within a row)."""
    cell_area = _tiling(grid, image_size, cell_indices.device)[1]
    return _pixel_share(cell_area.take(cell_indices).sum(1, dtype=torch.float32), image_size[0] * image_size[1])


def _paste_cell_pixels(images: Tensor, cell_indices: Tensor, grid: tuple[int, int], permutation: Tensor) -> Tensor:
    """The images of :func:`paste_cells` once its arguments were checked."""
    batch, channels, height, width = images.shape
    gh, gw = grid
    if height % gh or width % gw or not images.is_contiguous():
        mask_of = functools.partial(_cell_mask, cell_indices, grid, (height, width))
        return _masked_paste(images, mask_of, permutation)
    # Row t of cell (i, j) in channel c is one contiguous run of `width // gw` pixels; runs are
    # numbered in the (B * C * H * gw, width // gw) view of the batch:
    # run = i * C * H * gw + (c * H + t) * gw + first_run[j].
    first_run, run_offsets = _cell_runs(grid, (height, width), channels, images.device)
    per_image = channels * height * gw
    cell_first = first_run.take(cell_indices)
    target_runs = (cell_first + torch.arange(0, batch * per_image, per_image, device=images.device).unsqueeze(1))
    source_runs = torch.add(cell_first, permutation.unsqueeze(1), alpha=per_image)
    runs = images.view(-1, width // gw)
    mixed = images.clone()
    mixed.view(-1, width // gw).index_copy_(
        0, (target_runs.unsqueeze(2) + run_offsets).flatten(), runs.index_select(0, (source_runs.unsqueeze(2) + run_offsets).flatten())
    )
    return mixed


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_dtype(images: Tensor) -> Optional[torch.dtype]:
    """The signed integer type that views the images' elements bit for bit, if there is one."""
    return None if images.is_complex() else _SAME_SIZE_INT.get(images.element_size())


def _masked_paste(images: Tensor, mask_of: Callable[[torch.dtype, Union[bool, int]], Tensor], permutation: Tensor) -> Tensor:
    """:func:`paste` with a mask that ``mask_of(dtype, value)`` builds (``value`` inside, 0 outside).

    The mask is built in the images' bit type directly (all ones inside): converting a bool mask
    would cost more than the paste. Images without one (complex) get a bool mask and ``where``.
    """
    bits_dtype = _bits_dtype(images)
    if bits_dtype is None:
        return paste(images, mask_of(torch.bool, True), permutation)
    return _bitwise_paste(images, mask_of(bits_dtype, -1), permutation)


def _bitwise_paste(images: Tensor, pasted: Tensor, permutation: Tensor) -> Tensor:
    """``where(pasted, images[p], images)`` as ``image ^ ((image ^ partner) & pasted)`` on the bits.

    ``pasted`` holds all-ones (-1) or 0 in the integer type of :func:`_bits_dtype`. Written in place
    on the gathered partners, it is exact for every value (inf and NaN included) and, unlike
    ``torch.where`` with a mask broadcast over the channels, vectorized on the CPU.
    """
    bits_dtype = pasted.dtype
    partners = images.index_select(0, permutation)
    image_bits = images.view(bits_dtype)
    partners.view(bits_dtype).bitwise_xor_(image_bits).bitwise_and_(pasted).bitwise_xor_(image_bits)
    return partners


@functools.lru_cache(maxsize=64)
def _cell_runs(grid: tuple[int, int], image_size: tuple[int, int], channels: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For an exact tiling: the first run of each cell ``(gh * gw,)`` and the runs of a cell after it ``(C * cell_h,)``."""
    (gh, gw), cell_h = grid, image_size[0] // grid[0]
    cells = torch.arange(gh * gw, device=device)
    first_run = cells // gw * cell_h * gw + cells % gw
    run_offsets = (torch.arange(channels, device=device).unsqueeze(1) * image_size[0] + torch.arange(cell_h, device=device)) * gw
    return first_run, run_offsets.flatten()


def cutmix_box_mask(
    batch_size: int,
    image_size: Size2,
    area: Tensor,
    *,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> Tensor:
    """One random box per sample covering about ``area[i]`` of the image, clipped to the border.

    The box has the image's aspect ratio and side ``sqrt(area)``; its centre is uniform over
    the image (as in CutMix), so boxes near the border are clipped: the true pasted fraction is
    the mask's mean, which is what the mixing functions use as ``lam``.

    Returns:
        Boolean mask ``(B, 1, H, W)`` on ``device``.
    """
    height, width = _pair(image_size, "image_size")
    boxes = _cutmix_boxes(batch_size, (height, width), area, generator)
    return _box_mask(boxes.to(device, non_blocking=True) if device is not None else boxes, (height, width))


def _cutmix_boxes(
    batch_size: int, image_size: tuple[int, int], area: Tensor, generator: Optional[torch.Generator]
) -> Tensor:
    """The boxes of :func:`cutmix_box_mask` as ``(B, 4)`` int64 ``(top, bottom, left, right)`` on the CPU, bottom/right exclusive."""
    height, width = image_size
    area = area.detach().to("cpu", torch.float64)
    if tuple(area.shape) != (batch_size,):
        raise ValueError(f"Expected `area` to have shape ({batch_size},), but got shape {tuple(area.shape)}.")
    ratio = _serial_sqrt(area.clamp(0, 1))
    box_h, box_w = ratio * height, ratio * width
    centre_y = torch.rand(batch_size, generator=generator, dtype=torch.float64) * height
    centre_x = torch.rand(batch_size, generator=generator, dtype=torch.float64) * width
    return torch.stack(
        [
            (centre_y - box_h / 2).round().clamp(0, height),
            (centre_y + box_h / 2).round().clamp(0, height),
            (centre_x - box_w / 2).round().clamp(0, width),
            (centre_x + box_w / 2).round().clamp(0, width),
        ],
        dim=1,
    ).long()


def _box_mask(
    boxes: Tensor, image_size: tuple[int, int], dtype: torch.dtype = torch.bool, value: Union[bool, int] = True
) -> Tensor:
    """``(B, 1, H, W)`` mask of ``dtype`` on the boxes' device: ``value`` inside each box, 0 outside."""
    height, width = image_size
    # Rows and columns in one comparison: (top, left) and (bottom, right), each (B, 2, 1), against
    # the pixel positions (the longer side's). The row and column masks are small; only their
    # product has the size of the image.
    sides = boxes.reshape(-1, 2, 2, 1)  # [b, rows/columns, start/stop]
    positions = _positions(max(height, width), boxes.device)
    inside = (positions >= sides[:, :, 0]).logical_and_(positions < sides[:, :, 1])
    if dtype != torch.bool:
        inside = inside.to(dtype).mul_(value)
    return inside[:, 0, :height].view(-1, 1, height, 1) & inside[:, 1, :width].view(-1, 1, 1, width)


@functools.lru_cache(maxsize=16)
def _positions(size: int, device: torch.device) -> Tensor:
    """``arange(size)`` on ``device``, built once per size and device (read-only)."""
    return torch.arange(size, device=device)


def _box_lam(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``(B,)`` float32 share of the image inside each box: bit-equal to the pixel count of :func:`_box_mask` over ``H * W``."""
    top, bottom, left, right = boxes.unbind(1)
    return _pixel_share((bottom - top) * (right - left), image_size[0] * image_size[1])


def _cutmix_paste(
    images: Tensor, permutation: Tensor, alpha: float, generator: Optional[torch.Generator]
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw CutMix's boxes and paste them: ``(mixed, lam, boxes)``, ``boxes`` on the images' device."""
    boxes = _draw_boxes(images, alpha, generator)
    return _paste_boxes(images, boxes, permutation), _box_lam(boxes, (images.shape[-2], images.shape[-1])), boxes


def _draw_boxes(images: Tensor, alpha: float, generator: Optional[torch.Generator]) -> Tensor:
    """CutMix's boxes for ``images`` (areas, then positions), ``(B, 4)`` on the images' device."""
    batch, image_size = images.shape[0], (images.shape[-2], images.shape[-1])
    area = sample_beta(alpha, batch, generator=generator)
    # non_blocking: a host-to-device copy from pageable memory is staged at once, without the stream sync.
    return _cutmix_boxes(batch, image_size, area, generator).to(images.device, non_blocking=True)


def _paste_boxes(images: Tensor, boxes: Tensor, permutation: Tensor) -> Tensor:
    """Paste each partner's box (``boxes`` on the images' device) onto its image."""
    return _masked_paste(images, functools.partial(_box_mask, boxes, (images.shape[-2], images.shape[-1])), permutation)


def sample_cutmix_mask(images: Tensor, alpha: float = 1.0, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """CutMix boxes for a batch: area ~ ``Beta(alpha, alpha)`` per sample, see :func:`cutmix_box_mask`.

    Returns a boolean ``(B, 1, H, W)`` mask on the images' device.
    """
    _check_images(images)
    _check_alpha(alpha)
    return _box_mask(_draw_boxes(images, alpha, generator), (images.shape[-2], images.shape[-1]))


# --------------------------------------------------------------------------- pasting and targets


def paste(images: Tensor, mask: Tensor, permutation: Tensor) -> Tensor:
    """``mixed[i] = where(mask[i], images[p[i]], images[i])`` in the dtype and device of ``images``.

    ``mask`` is boolean, broadcastable to ``images`` (e.g. ``(B, 1, H, W)``); values are copied bit for bit.
    """
    bits_dtype = _bits_dtype(images)
    if bits_dtype is None or mask.dtype != torch.bool or torch.broadcast_shapes(mask.shape, images.shape) != images.shape:
        return torch.where(mask, images.index_select(0, permutation), images)
    return _bitwise_paste(images, mask.to(bits_dtype).neg_(), permutation)


def _is_class_indices(targets: Tensor, num_classes: Optional[int], check_range: bool = True) -> bool:
    """Whether ``targets`` are class indices ``(B,)``; if so, checks them against ``num_classes``.

    The range check reads the labels' minimum and maximum on the host: one host-device sync on
    an accelerator. ``check_range=False`` skips it, for callers that check the range themselves
    (the callbacks, without a sync: ``callbacks._LabelRangeCheck``).
    """
    if not isinstance(targets, Tensor):
        raise TypeError(f"Expected `targets` to be a torch.Tensor, but got {type(targets).__name__}.")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"Expected `num_classes` to be a positive int, but got {num_classes!r}.")
    if targets.ndim != 1 or targets.is_floating_point():
        return False
    if num_classes is None:
        raise ValueError(
            "Expected `num_classes` for class-index targets of shape (B,), but got None."
            " Pass `num_classes=K` or give one-hot/probability targets of shape (B, K)."
        )
    if check_range:
        _check_class_index_range(targets, num_classes)
    return True


def _check_class_index_range(targets: Tensor, num_classes: int, where: str = "") -> None:
    """Raise if class indices ``targets`` are outside ``[0, num_classes)`` (read now: one sync on an accelerator)."""
    if targets.numel() == 0:
        return
    bounds = torch.aminmax(targets)
    # On an accelerator one transfer (one sync) rather than two; on the CPU no stack.
    low, high = (int(b) for b in bounds) if targets.device.type == "cpu" else torch.stack(bounds).tolist()
    _check_label_range(low, high, num_classes, where)


def _check_label_range(low: int, high: int, num_classes: int, where: str = "") -> None:
    """Raise if class indices with minimum ``low`` and maximum ``high`` are outside ``[0, num_classes)``."""
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"Expected class-index `targets` in [0, {num_classes}), but got values in [{low}, {high}]{where}."
            " Check `num_classes` or the dataset's labels."
        )


def to_probabilities(
    targets: Tensor, num_classes: Optional[int] = None, *, label_smoothing: float = 0.0
) -> Tensor:
    """Turn class indices ``(B,)`` or probabilities ``(B, K)`` into float probabilities ``(B, K)``.

    Index targets need ``num_classes`` and are checked to lie in ``[0, num_classes)``; soft
    targets must be ``num_classes`` wide when it is given. ``label_smoothing`` ``eps`` maps
    ``y`` to ``(1 - eps) * y + eps / K``. The result is at least float32.

    Raises:
        ValueError: for a missing ``num_classes``, out-of-range labels or a wrong width.

    Example::

        >>> to_probabilities(torch.tensor([1, 0]), 3)
        tensor([[0., 1., 0.],
                [1., 0., 0.]])
    """
    _check_label_smoothing(label_smoothing)
    return _probabilities(targets, num_classes, _is_class_indices(targets, num_classes), label_smoothing)


def _probabilities(targets: Tensor, num_classes: Optional[int], class_indices: bool, label_smoothing: float) -> Tensor:
    """:func:`to_probabilities` once ``targets`` were checked by :func:`_is_class_indices` (``class_indices``)."""
    if class_indices:
        assert num_classes is not None  # checked by _is_class_indices
        # scatter_ rather than one_hot: the range was checked above, one_hot would check it again.
        probabilities = torch.zeros(targets.shape[0], num_classes, device=targets.device)
        probabilities.scatter_(1, targets.long().unsqueeze(1), 1.0)
    elif targets.ndim == 2:
        if num_classes is not None and targets.shape[1] != num_classes:
            raise ValueError(
                f"Expected soft `targets` of width `num_classes`, but the widths do not match:"
                f" {targets.shape[1]} != {num_classes}."
            )
        dtype = torch.promote_types(targets.dtype, torch.float32) if targets.is_floating_point() else torch.float32
        probabilities = targets.to(dtype)
    else:
        raise ValueError(
            "Expected `targets` to be class indices of shape (B,) (an integer tensor) or probabilities of"
            f" shape (B, K), but got shape {tuple(targets.shape)} and dtype {targets.dtype}."
        )
    if label_smoothing > 0:
        probabilities = probabilities * (1.0 - label_smoothing) + label_smoothing / probabilities.shape[1]
    return probabilities


def mix_targets(
    targets: Tensor,
    lam: Tensor,
    permutation: Tensor,
    num_classes: Optional[int] = None,
    *,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``soft[i] = lam[i] * y[p[i]] + (1 - lam[i]) * y[i]`` with ``y`` from :func:`to_probabilities`.

    Example::

        >>> mix_targets(torch.tensor([0, 2]), torch.tensor([0.25, 0.5]), torch.tensor([1, 0]), 3)
        tensor([[0.7500, 0.0000, 0.2500],
                [0.5000, 0.0000, 0.5000]])
    """
    return _mix_targets(targets, lam, permutation, num_classes, label_smoothing, check_range=True)


def _mix_targets(
    targets: Tensor,
    lam: Tensor,
    permutation: Tensor,
    num_classes: Optional[int],
    label_smoothing: float,
    check_range: bool,
) -> Tensor:
    """:func:`mix_targets`; ``check_range=False`` for labels whose range the caller checks."""
    _check_label_smoothing(label_smoothing)
    class_indices = _is_class_indices(targets, num_classes, check_range)
    hard = class_indices and label_smoothing == 0
    probabilities = targets if hard else _probabilities(targets, num_classes, class_indices, label_smoothing)
    if probabilities.shape[0] != lam.shape[0]:
        raise ValueError(
            "Expected `targets` to have one entry per image, but the batch sizes do not match:"
            f" {probabilities.shape[0]} != {lam.shape[0]}."
        )
    if hard:
        assert num_classes is not None  # checked by _is_class_indices
        # Two scatters instead of mixing one-hot rows, four fewer ops for the same float32 bits:
        # w * 1 + (1 - w) * 0 is w, and w and 1 - w add alike in either order when the labels agree.
        weight = lam.to(targets.device, torch.float32).unsqueeze(1)
        labels = targets.long().unsqueeze(1)
        soft = torch.zeros(targets.shape[0], num_classes, device=targets.device)
        return soft.scatter_(1, labels, torch.rsub(weight, 1.0)).scatter_add_(1, labels.index_select(0, permutation), weight)
    weight = lam.to(probabilities.device, probabilities.dtype).unsqueeze(1)
    return weight * probabilities.index_select(0, permutation) + (1.0 - weight) * probabilities


def _resolve_permutation(
    batch_size: int, permutation: Optional[Tensor], generator: Optional[torch.Generator], device: torch.device
) -> Tensor:
    if permutation is None:
        return pairing_permutation(batch_size, generator=generator, device=device)
    _check_permutation(permutation, batch_size)
    return permutation.to(device=device, dtype=torch.long)


def mix_with_mask(
    images: Tensor,
    targets: Tensor,
    mask: Tensor,
    permutation: Tensor,
    num_classes: Optional[int] = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Paste ``images[p]`` inside ``mask``; ``lam`` = the mask's mean; soft targets to match."""
    mixed = paste(images, mask, permutation)
    flat = mask.flatten(1)
    lam = _pixel_share(flat.sum(1, dtype=torch.float32), flat.shape[1])
    soft = mix_targets(targets, lam, permutation, num_classes, label_smoothing=label_smoothing)
    return mixed, soft, lam


def attentive_cutmix(
    images: Tensor,
    targets: Tensor,
    heatmaps: Tensor,
    *,
    top_k: int = 6,
    num_classes: Optional[int] = None,
    permutation: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attentive CutMix (Walawalkar et al., 2020): paste the partner's ``top_k`` hottest cells.

    ``mixed[i]`` is ``images[i]`` outside the mask and ``images[p[i]]`` inside it, where the mask
    is ``topk_cell_mask(heatmaps[p[i]])``: the cells come from the heatmap of the pasted image.

    Args:
        images: ``(B, C, H, W)`` batch, any float dtype, any device.
        targets: class indices ``(B,)`` (needs ``num_classes``) or probabilities ``(B, K)``.
        heatmaps: ``(B, gh, gw)`` attention of each image of ``images`` (not of its partner).
        top_k: cells pasted, in ``[1, gh * gw]`` (6 of 7x7 in the paper).
        num_classes: number of classes ``K``.
        permutation: the pairing ``p``; drawn with :func:`pairing_permutation` when omitted.
        generator: CPU generator for the pairing.
        label_smoothing: smoothing folded into the soft targets.

    Returns:
        ``(mixed (B, C, H, W), soft_targets (B, K) float32+, lam (B,) float32)``.

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
    batch = images.shape[0]
    _check_heatmaps(heatmaps, batch)
    _check_top_k(top_k, *heatmaps.shape[-2:])
    _check_grid_fits(*heatmaps.shape[-2:], *images.shape[-2:])
    permutation = _resolve_permutation(batch, permutation, generator, images.device)
    grid = (heatmaps.shape[1], heatmaps.shape[2])
    cells = _topk_cells(heatmaps.to(images.device).index_select(0, permutation), top_k)
    lam = _cell_lam(cells, grid, (images.shape[-2], images.shape[-1]))
    # The small ops first and the pixel paste last: a small op that follows a pass over the
    # whole batch finds the CPU's caches flushed and runs several times slower.
    soft = mix_targets(targets, lam, permutation, num_classes, label_smoothing=label_smoothing)
    return _paste_cell_pixels(images, cells, grid, permutation), soft, lam


def paste_topk_cells(
    images: Tensor, partner_heatmaps: Tensor, top_k: int, permutation: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The image half of :func:`attentive_cutmix`: paste each partner's ``top_k`` hottest cells.

    Unlike :func:`attentive_cutmix` it takes the heatmaps already paired (``partner_heatmaps[i]``
    is the map of ``images[p[i]]``), trusts ``permutation`` (no check, hence no host-device
    sync) and also returns the pasted cells, for callers that log or draw them.

    Returns:
        ``(mixed (B, C, H, W), lam (B,) float32, cell_indices (B, top_k))``.

    Example::

        >>> images, permutation = torch.rand(4, 3, 28, 28), torch.tensor([1, 2, 3, 0])
        >>> mixed, lam, cells = paste_topk_cells(images, torch.rand(4, 7, 7)[permutation], 6, permutation)
        >>> cells.shape, lam
        (torch.Size([4, 6]), tensor([0.1224, 0.1224, 0.1224, 0.1224]))
    """
    _check_images(images)
    _check_heatmaps(partner_heatmaps, images.shape[0])
    _check_top_k(top_k, *partner_heatmaps.shape[-2:])
    _check_grid_fits(*partner_heatmaps.shape[-2:], *images.shape[-2:])
    grid = (partner_heatmaps.shape[1], partner_heatmaps.shape[2])
    cells = _topk_cells(partner_heatmaps, top_k)
    lam = _cell_lam(cells, grid, (images.shape[-2], images.shape[-1]))
    return _paste_cell_pixels(images, cells, grid, permutation), lam, cells


def cutmix(
    images: Tensor,
    targets: Tensor,
    *,
    alpha: float = 1.0,
    num_classes: Optional[int] = None,
    permutation: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """CutMix (Yun et al., 2019) with one box per sample, vectorized.

    The box area is drawn from ``Beta(alpha, alpha)`` per sample, its centre uniformly; after
    clipping to the border ``lam[i]`` is corrected to the pasted pixel fraction. Same pairing and
    return conventions as :func:`attentive_cutmix`.

    Example::

        >>> images, labels = torch.rand(8, 3, 32, 32), torch.arange(8)
        >>> mixed, soft, lam = cutmix(images, labels, num_classes=8, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(soft.sum(1), torch.ones(8))
        True
    """
    _check_images(images)
    _check_alpha(alpha)
    batch = images.shape[0]
    permutation = _resolve_permutation(batch, permutation, generator, images.device)
    boxes = _draw_boxes(images, alpha, generator)
    lam = _box_lam(boxes, (images.shape[-2], images.shape[-1]))
    # The targets before the paste, as in attentive_cutmix.
    soft = mix_targets(targets, lam, permutation, num_classes, label_smoothing=label_smoothing)
    return _paste_boxes(images, boxes, permutation), soft, lam


def mixup(
    images: Tensor,
    targets: Tensor,
    *,
    alpha: float = 1.0,
    num_classes: Optional[int] = None,
    permutation: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mixup (Zhang et al., 2018): ``mixed[i] = lam[i] * images[p[i]] + (1 - lam[i]) * images[i]``.

    ``lam`` is drawn from ``Beta(alpha, alpha)`` per sample. Same conventions as
    :func:`attentive_cutmix`.

    Example::

        >>> images, labels = torch.rand(8, 3, 32, 32), torch.arange(8)
        >>> mixed, soft, lam = mixup(images, labels, num_classes=8, generator=torch.Generator().manual_seed(0))
        >>> mixed.shape, lam.shape
        (torch.Size([8, 3, 32, 32]), torch.Size([8]))
    """
    _check_images(images)
    _check_alpha(alpha)
    _check_floating_images(images)
    permutation = _resolve_permutation(images.shape[0], permutation, generator, images.device)
    lam = sample_beta(alpha, images.shape[0], generator=generator, device=images.device)
    # The targets before the blend, as in attentive_cutmix.
    soft = mix_targets(targets, lam, permutation, num_classes, label_smoothing=label_smoothing)
    return _blend(images, permutation, lam), soft, lam


def _mixup_blend(
    images: Tensor, permutation: Tensor, alpha: float, generator: Optional[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """Draw Mixup's ``lam`` and blend: ``(mixed, lam)``."""
    _check_floating_images(images)
    lam = sample_beta(alpha, images.shape[0], generator=generator, device=images.device)
    return _blend(images, permutation, lam), lam


def _check_floating_images(images: Tensor) -> None:
    if not images.is_floating_point():
        raise TypeError(
            f"Expected floating-point `images` for mixup, but got dtype {images.dtype}."
            " Convert the batch first, e.g. `images.float() / 255`."
        )


def _blend(images: Tensor, permutation: Tensor, lam: Tensor) -> Tensor:
    """``lam[i] * images[p[i]] + (1 - lam[i]) * images[i]`` (``lerp``)."""
    return images.lerp(images.index_select(0, permutation), lam.to(images.dtype).view(-1, 1, 1, 1))


def pasted_attention_share(partner_heatmaps: Tensor, mask: Tensor) -> Tensor:
    """Share of each partner's attention mass that lies inside the pasted region, ``(B,)`` float32.

    ``partner_heatmaps[i]`` is the ``(gh, gw)`` heatmap of the pasted image ``images[p[i]]`` and
    ``mask[i]`` the ``(1, H, W)`` pasted region. Heatmaps are shifted to be non-negative (their
    minimum becomes 0) and spread over the pixels of each cell; a heatmap with no mass (constant)
    gives the pasted area fraction, i.e. what a uniform heatmap would give.

    Example::

        >>> heat = torch.tensor([[[3.0, 1.0], [1.0, 1.0]]])
        >>> mask = topk_cell_mask(heat, 1, 2)
        >>> pasted_attention_share(heat, mask)
        tensor([1.])
    """
    _check_heatmaps(partner_heatmaps, mask.shape[0])
    dense = expand_grid(partner_heatmaps.float().nan_to_num(0.0), tuple(mask.shape[-2:])).flatten(1)
    dense = dense - dense.amin(dim=1, keepdim=True)
    inside = mask.flatten(1).float()
    total = dense.sum(dim=1)
    area = _pixel_share(inside.sum(dim=1), inside.shape[1])
    share = (dense * inside).sum(dim=1) / total.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(total > 0, share, area)


def _cell_attention_share(partner_heatmaps: Tensor, cell_indices: Tensor, image_size: tuple[int, int]) -> Tensor:
    """:func:`pasted_attention_share` for a region made of whole cells, computed on the grid (no pixel map)."""
    batch, gh, gw = partner_heatmaps.shape
    area = _tiling((gh, gw), image_size, partner_heatmaps.device)[1].float()
    heat = partner_heatmaps.float().nan_to_num(0.0).flatten(1)
    heat = heat - heat.amin(dim=1, keepdim=True)
    total = heat @ area
    inside = (heat.gather(1, cell_indices) * area.take(cell_indices)).sum(dim=1)
    pasted_area = _pixel_share(area.take(cell_indices).sum(dim=1), image_size[0] * image_size[1])
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(torch.float32).tiny), pasted_area)
