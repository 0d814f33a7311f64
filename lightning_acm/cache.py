"""A heatmap cache that runs the frozen teacher once per dataset instead of once per batch.

Attentive CutMix's cost is the teacher: a ResNet-152 at 224 px is about 60x slower than a
CIFAR ResNet-18 training step. The teacher's attention moves with the image, so instead of
running it on every augmented batch, :class:`HeatmapCache` stores one heatmap per training
sample, computed once on the un-augmented image, and :func:`warp_heatmaps` moves it through the
crop box and flip that the augmentation recorded and averages it onto the mixing grid. Warping
a batch is a few small batched matrix products: no per-sample loop and no host-device sync.

The cached grid may be finer than the mixing grid (``14x14`` for ``7x7``), but a finer grid
made by running the teacher at twice the size shows it the objects at another scale: in
``benchmarks/bench_cache.py`` (EfficientNet-Lite0, Fashion-MNIST, pad-4 crops and flips) the
teacher's own ``7x7`` grid, warped, picked the same top-6 cells as the teacher on the augmented
image with a mean IoU of 0.62, a ``14x14`` cache at 448 px 0.31, ignoring the geometry 0.24 and
chance 0.07. On a grid as coarse as the teacher's, the area-weighted warp is a linear
interpolation between cell centres, which is how a convolutional map moves with a shift.

Conventions:

* ``fine_maps`` are ``(B, fh, fw)`` heatmaps of the un-augmented images, whose cells tile the
  image evenly; heatmaps returned for the mixing are ``(B, gh, gw)`` float32.
* ``geometry`` is ``(B, 6)`` float ``[index, y0, x0, y1, x1, flipped]`` (or ``(B, 5)`` without the
  index): the augmented image is the crop box ``[y0, y1] x [x0, x1]`` of the un-augmented image,
  in coordinates normalised to ``[0, 1]`` (a box reaching below 0 or above 1 was padded), resized
  to the output, then flipped left-right when ``flipped`` is 1 (the flip comes after the crop).

Example::

    >>> import torch
    >>> from lightning_acm.cache import warp_heatmaps
    >>> fine = torch.arange(16.0).view(1, 4, 4)
    >>> left_half = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.5, 0.0]])  # index 0, y 0..1, x 0..0.5
    >>> warp_heatmaps(fine, left_half, 2)
    tensor([[[ 2.,  3.],
             [10., 11.]]])
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_acm.validation import Size2, check_heatmaps, check_images, check_size2

__all__ = [
    "HeatmapCache",
    "apply_geometry",
    "batch_geometry",
    "cache_fingerprint",
    "cache_for_trainer",
    "reference_datamodule",
    "regrid_attention_model",
    "topk_overlap",
    "warp_heatmaps",
]

_FORMAT_VERSION = 1


def _check_geometry(geometry: Tensor, batch_size: Optional[int] = None) -> Tensor:
    """The ``(B, 5)`` box-and-flip part of a ``(B, 6)`` or ``(B, 5)`` geometry, as float32."""
    if not isinstance(geometry, Tensor):
        raise TypeError(f"Expected `geometry` to be a torch.Tensor, but got {type(geometry).__name__}.")
    if geometry.ndim != 2 or geometry.shape[1] not in (5, 6):
        raise ValueError(
            "Expected `geometry` to have shape (B, 6) [index, y0, x0, y1, x1, flipped] or (B, 5) without the index,"
            f" but got shape {tuple(geometry.shape)}."
        )
    if batch_size is not None and geometry.shape[0] != batch_size:
        raise ValueError(
            "Expected `geometry` to have one row per sample, but the batch sizes do not match:"
            f" {geometry.shape[0]} != {batch_size}."
        )
    return geometry[:, -5:].float()


def _cell_weights(start: Tensor, end: Tensor, flipped: Tensor, cells_out: int, cells_in: int) -> Tensor:
    """``(B, cells_out, cells_in)``: share of each output cell's source interval lying in each input cell.

    Output cell ``i`` of an axis covers ``[i / n, (i + 1) / n]`` of the augmented image, i.e.
    ``start + [i / n, (i + 1) / n] * (end - start)`` of the un-augmented one (mirrored when
    ``flipped``). A row sums to the part of the cell that lies inside the image (1 without padding).
    """
    # (B, 2, cells_out): the low and high ends of each output cell as fractions of the box, mirrored
    # where flipped; then in the un-augmented image's coordinates.
    fractions = torch.where((flipped > 0.5).view(-1, 1, 1), *_cell_fractions(cells_out, start.device))
    bounds = start.view(-1, 1, 1) + fractions * (end - start).view(-1, 1, 1)
    lo, hi = bounds[:, 0].unsqueeze(2), bounds[:, 1].unsqueeze(2)
    edges = _cell_fractions(cells_in, start.device)[1]  # forward: (low ends, high ends) of the input cells
    overlap = (torch.minimum(hi, edges[1]) - torch.maximum(lo, edges[0])).clamp_min(0.0)
    return overlap / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)


@functools.lru_cache(maxsize=16)
def _cell_fractions(cells: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(mirrored, forward)``, each ``(2, cells)`` float32: the low and high ends of the ``cells`` equal
    cells of ``[0, 1]``, forward (``i / n``, ``(i + 1) / n``) and mirrored (``1 - (i + 1) / n``,
    ``1 - i / n``). Built once per size and device (read-only)."""
    steps = torch.arange(cells + 1, device=device, dtype=torch.float32) / cells
    forward = torch.stack([steps[:-1], steps[1:]])
    return torch.stack([1.0 - steps[1:], 1.0 - steps[:-1]]), forward


def warp_heatmaps(fine_maps: Tensor, geometry: Tensor, grid_size: Size2 = 7) -> Tensor:
    """Move heatmaps of un-augmented images through each sample's crop and flip, on a coarser grid.

    Each fine heatmap is read as piecewise constant over its cells; cell ``(i, j)`` of the result
    is its exact area-weighted mean over the part of the un-augmented image that lands in that
    cell of the augmented image. The part of a cell that falls outside the image (padding) counts
    with the map's minimum, so padding never attracts the paste. With the identity box
    ``[0, 0, 1, 1]`` and a fine grid divisible by ``grid_size`` this is
    ``F.adaptive_avg_pool2d(fine_maps, grid_size)``. Boxes are taken as given (no sync to check
    them on the device): ``y1 > y0`` and ``x1 > x0`` are assumed.

    Args:
        fine_maps: ``(B, fh, fw)`` heatmaps of the un-augmented images (any float dtype).
        geometry: ``(B, 6)`` ``[index, y0, x0, y1, x1, flipped]`` or ``(B, 5)`` without the index.
        grid_size: cells per side of the result (int or ``(gh, gw)``).

    Returns:
        ``(B, gh, gw)`` float32 heatmaps on the device of ``fine_maps``.

    Raises:
        ValueError: if the shapes do not match.

    Example::

        >>> fine = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
        >>> flipped = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
        >>> warp_heatmaps(fine, flipped, 2)
        tensor([[[2., 1.],
                 [4., 3.]]])
    """
    check_heatmaps(fine_maps)
    box = _check_geometry(geometry, fine_maps.shape[0]).to(fine_maps.device)
    gh, gw = check_size2(grid_size, "grid_size")
    fh, fw = fine_maps.shape[-2:]
    y0, x0, y1, x1, flipped = box.unbind(1)
    if (gh, fh) == (gw, fw):
        # Rows and columns in one call (half the small ops); the weights are elementwise, so the same bits.
        # Starts (y0..., x0...), ends (y1..., x1...); rows are never flipped (zeros before the flips).
        rows, cols = _cell_weights(
            box[:, 0:2].t().reshape(-1), box[:, 2:4].t().reshape(-1), F.pad(flipped, (box.shape[0], 0)), gw, fw
        ).chunk(2)
    else:
        rows = _cell_weights(y0, y1, torch.zeros_like(flipped), gh, fh)
        cols = _cell_weights(x0, x1, flipped, gw, fw)
    maps = fine_maps.float()
    warped = rows @ maps @ cols.transpose(1, 2)
    inside = rows.sum(2).unsqueeze(2) * cols.sum(2).unsqueeze(1)
    floor = maps.flatten(1).amin(dim=1).view(-1, 1, 1)
    return warped + (1.0 - inside).clamp_min(0.0) * floor


def apply_geometry(
    images: Tensor, geometry: Tensor, output_size: Optional[Size2] = None, *, padding_value: float = 0.0
) -> Tensor:
    """Render the augmented view that ``geometry`` describes, for every image of a batch at once.

    Crops the box (``padding_value`` outside the image), resizes it bilinearly to ``output_size``
    and flips it left-right where ``flipped`` is 1. Used to compare cached heatmaps with heatmaps
    of the augmented images themselves, and in tests.

    Args:
        images: ``(B, C, H, W)`` un-augmented images.
        geometry: ``(B, 6)`` or ``(B, 5)``, as in :func:`warp_heatmaps`.
        output_size: ``(h, w)`` or ``h`` of the result; the images' size when ``None``.
        padding_value: value of the padding (e.g. ``-mean / std`` for images normalised after
            zero padding, as the lightning_acm datamodules do).

    Returns:
        ``(B, C, h, w)`` in the dtype and device of ``images``.

    Example::

        >>> image = torch.arange(4.0).view(1, 1, 1, 4)
        >>> apply_geometry(image, torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]))
        tensor([[[[3., 2., 1., 0.]]]])
    """
    check_images(images)
    box = _check_geometry(geometry, images.shape[0]).to(images.device)
    height, width = images.shape[-2:] if output_size is None else check_size2(output_size, "output_size")
    y0, x0, y1, x1, flipped = box.unbind(1)
    sign = 1.0 - 2.0 * (flipped > 0.5).float()
    zero = torch.zeros_like(y0)
    h, w = y1 - y0, x1 - x0
    theta = torch.stack(
        [torch.stack([sign * w, zero, 2 * x0 + w - 1], 1), torch.stack([zero, h, 2 * y0 + h - 1], 1)], 1
    )
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], height, width], align_corners=False)
    shifted = images.float() - padding_value
    out = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + padding_value
    return out.to(images.dtype)


def topk_overlap(heatmaps: Tensor, reference: Tensor, top_k: int) -> Tensor:
    """Intersection over union of the ``top_k`` cells chosen from two heatmaps of each sample, ``(B,)``.

    Cells are chosen as :func:`lightning_acm.functional.topk_cell_mask` chooses them (ties in
    row-major order). 1 means both select the same cells; used to measure how well cached and
    warped heatmaps stand in for heatmaps of the augmented images.

    Raises:
        ValueError: if the shapes differ or ``top_k`` is out of range.

    Example::

        >>> a = torch.tensor([[[3.0, 2.0], [1.0, 0.0]]])
        >>> b = torch.tensor([[[3.0, 0.0], [2.0, 1.0]]])
        >>> topk_overlap(a, b, 2)  # {0, 1} vs {0, 2}: 1 shared of 3
        tensor([0.3333])
    """
    check_heatmaps(heatmaps)
    check_heatmaps(reference, heatmaps.shape[0])
    if heatmaps.shape != reference.shape:
        raise ValueError(
            f"Expected `heatmaps` and `reference` to have the same shape, but got {tuple(heatmaps.shape)}"
            f" and {tuple(reference.shape)}."
        )
    batch, gh, gw = heatmaps.shape
    cells = gh * gw
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= cells:
        raise ValueError(f"Expected `top_k` to be in [1, {cells}] for a {gh}x{gw} grid, but got {top_k!r}.")

    def chosen(maps: Tensor) -> Tensor:
        scores = torch.nan_to_num(maps.reshape(batch, cells).float(), nan=-float("inf"))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_k]
        return torch.zeros(batch, cells, dtype=torch.bool, device=maps.device).scatter_(1, order, True)

    first, second = chosen(heatmaps), chosen(reference.to(heatmaps.device))
    return (first & second).sum(1).float() / (first | second).sum(1).float()


class HeatmapCache:
    """One fine heatmap per training sample, keyed by dataset index, filled once by a teacher.

    Holds ``maps`` ``(N, fh, fw)`` (float16 by default: 2 bytes per cell, 25 MB for 50 000
    samples at 14x14) and ``filled`` ``(N,)`` flags. Keep it on the training device: looking up
    a batch then indexes on the device and needs no sync. It is derived data: rebuild it, or
    :meth:`save` and :meth:`load` it, but keep it out of model checkpoints.

    Args:
        num_samples: ``N``, the size of the training set (indices run over ``[0, N)``).
        grid_size: fine cells per side (int or ``(fh, fw)``), e.g. 14 for a 7x7 mixing grid.
        dtype: storage dtype (float16, bfloat16 or float32); lookups return float32.
        device: where the maps live.

    Raises:
        ValueError: for a non-positive ``num_samples`` or a non-float ``dtype``.

    Example::

        >>> cache = HeatmapCache(3, grid_size=2)
        >>> cache.update(torch.tensor([0, 1, 2]), torch.arange(12.0).view(3, 2, 2))
        >>> cache.is_complete()
        True
        >>> geometry = torch.tensor([[2.0, 0.0, 0.0, 1.0, 1.0, 0.0]])  # sample 2, identity box
        >>> cache.warp(geometry, 1)
        tensor([[[9.5000]]])
    """

    def __init__(
        self,
        num_samples: int,
        grid_size: Size2 = 14,
        *,
        dtype: torch.dtype = torch.float16,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"Expected `num_samples` to be a positive int, but got {num_samples!r}.")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"Expected `dtype` to be torch.float16, torch.bfloat16 or torch.float32, but got {dtype}.")
        self.grid_size = check_size2(grid_size, "grid_size")
        self.maps = torch.zeros(num_samples, *self.grid_size, dtype=dtype, device=device)
        self.filled = torch.zeros(num_samples, dtype=torch.bool, device=device)
        self.meta: dict[str, Any] = {}
        """Free-form description of how the maps were made (saved with them), e.g. the teacher."""

    def __len__(self) -> int:
        return self.maps.shape[0]

    def __repr__(self) -> str:
        fh, fw = self.grid_size
        return (
            f"{type(self).__name__}(num_samples={len(self)}, grid_size={fh}x{fw}, dtype={self.maps.dtype},"
            f" device={self.device})"
        )

    @property
    def device(self) -> torch.device:
        return self.maps.device

    def to(self, device: Union[str, torch.device]) -> HeatmapCache:
        """Move the maps and flags to ``device`` (in place); returns ``self``."""
        self.maps = self.maps.to(device)
        self.filled = self.filled.to(device)
        return self

    def is_complete(self) -> bool:
        """Whether every sample has a map (a host sync: call it once after filling, not per batch)."""
        return bool(self.filled.all())

    def missing(self) -> Tensor:
        """Indices ``(M,)`` of the samples without a map."""
        return (~self.filled).nonzero().flatten()

    def update(self, indices: Tensor, maps: Tensor) -> None:
        """Store ``maps`` ``(M, fh, fw)`` for the dataset ``indices`` ``(M,)`` and mark them filled."""
        check_heatmaps(maps)
        if tuple(maps.shape[-2:]) != self.grid_size:
            fh, fw = self.grid_size
            raise ValueError(
                f"Expected heatmaps on the cache's {fh}x{fw} grid, but got {maps.shape[-2]}x{maps.shape[-1]}."
                " Build the teacher with `grid_size` equal to the cache's."
            )
        indices = torch.as_tensor(indices).to(self.device, torch.long).flatten()
        if indices.shape[0] != maps.shape[0]:
            raise ValueError(
                f"Expected one index per heatmap, but the sizes do not match: {indices.shape[0]} != {maps.shape[0]}."
            )
        self.maps[indices] = maps.to(self.device, self.maps.dtype)
        self.filled[indices] = True

    def lookup(self, indices: Tensor) -> Tensor:
        """``(B, fh, fw)`` float32 maps of the dataset ``indices`` (float indices are rounded), on the cache's device.

        Indices are not checked against ``filled`` or ``[0, N)`` (that would sync); check
        :meth:`is_complete` once after filling.
        """
        if indices.is_floating_point():
            indices = indices.round()
        return self.maps.index_select(0, indices.to(self.device, torch.long)).float()

    def warp(self, geometry: Tensor, grid_size: Size2 = 7) -> Tensor:
        """``(B, gh, gw)`` heatmaps of an augmented batch from its ``(B, 6)`` geometry (see :func:`warp_heatmaps`)."""
        _check_geometry(geometry)
        if geometry.shape[1] != 6:
            raise ValueError(
                "Expected `geometry` of shape (B, 6) with the dataset index first to look up the cache,"
                f" but got shape {tuple(geometry.shape)}."
            )
        return warp_heatmaps(self.lookup(geometry[:, 0]), geometry, grid_size)

    @torch.no_grad()
    def fill(
        self,
        attention_model: nn.Module,
        data: Union[Dataset, Iterable[Any]],
        *,
        indices: Optional[Sequence[int]] = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> HeatmapCache:
        """Run ``attention_model`` over the (un-augmented) dataset and store each sample's heatmap.

        Args:
            attention_model: maps a ``(B, C, H, W)`` batch to ``(B, fh, fw)`` heatmaps on the
                cache's grid (e.g. an :class:`~lightning_acm.attention.AttentionModel` built with
                ``grid_size=14``); run on the device of its parameters, under ``no_grad``.
            data: a map-style ``Dataset`` of ``(image, target, index)`` samples (``index`` is the
                key; with ``(image, target)`` samples the position in the dataset is), or an iterable
                of ready batches ``[images, targets, indices, ...]``.
            indices: positions of the dataset to compute (e.g. one rank's shard); all when ``None``.
                Only for a ``Dataset``.
            batch_size: teacher batch size for a ``Dataset``.
            num_workers: ``DataLoader`` workers for a ``Dataset``.

        Returns:
            ``self``.

        Raises:
            ValueError: if the batches carry no index, or the heatmaps are not on the cache's grid.
        """
        if isinstance(data, Dataset):
            size = len(data)  # type: ignore[arg-type]
            positions = list(range(size)) if indices is None else [int(i) for i in indices]
            subset = Subset(data, positions)
            loader: Iterable[Any] = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        elif indices is not None:
            raise ValueError("Expected `indices` only with a map-style Dataset, but `data` is an iterable of batches.")
        else:
            positions, loader = [], data
        first = next(attention_model.parameters(), None)
        device = first.device if first is not None else self.device
        seen = 0
        for batch in loader:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            if isinstance(batch, (list, tuple)) and len(batch) >= 3:
                keys = torch.as_tensor(batch[2]).flatten()
            elif positions:
                keys = torch.tensor(positions[seen : seen + images.shape[0]])
            else:
                raise ValueError(
                    "Expected batches [images, targets, indices] to key the cache, but got batches without indices."
                )
            maps = attention_model(images.to(device, non_blocking=True))
            self.update(keys, maps)
            seen += images.shape[0]
        return self

    def state(self) -> dict[str, Any]:
        """What :meth:`save` writes: maps, flags and ``meta`` (CPU tensors)."""
        return {
            "version": _FORMAT_VERSION,
            "maps": self.maps.cpu(),
            "filled": self.filled.cpu(),
            "grid_size": self.grid_size,
            "meta": dict(self.meta),
        }

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the cache to ``path`` (a ``torch.save`` file; the write is atomic)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        partial = f"{path}.partial-{os.getpid()}"
        torch.save(self.state(), partial)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None) -> HeatmapCache:
        """Read a cache written by :meth:`save` onto ``device``.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if the file is empty, truncated or not a heatmap cache (the message names
                the file and says to delete it).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Expected a heatmap cache file at {path!r}, but it does not exist.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged file fails in many ways: EOFError, OSError, RuntimeError, KeyError
            found = f"it cannot be read ({type(error).__name__}: {error})"
        else:
            found = "it holds something else"
            if isinstance(state, dict) and state.get("version") == _FORMAT_VERSION:
                maps, filled = state.get("maps"), state.get("filled")
                if isinstance(maps, Tensor) and isinstance(filled, Tensor) and filled.shape == maps.shape[:1]:
                    cache = cls(maps.shape[0], tuple(maps.shape[-2:]), dtype=maps.dtype, device=device)
                    cache.maps.copy_(maps)
                    cache.filled.copy_(filled)
                    cache.meta = dict(state.get("meta", {}))
                    return cache
        raise ValueError(
            f"Expected {path!r} to be a heatmap cache written by HeatmapCache.save, but {found}."
            " Delete the file: a cache is derived data, and a fit with `cache_path` writes it again."
        )


# --------------------------------------------------------------------------- Lightning glue


def regrid_attention_model(model: nn.Module, grid_size: Size2, input_size: Optional[Size2]) -> nn.Module:
    """The same frozen teacher (its backbone shared, not copied) on another grid and input size.

    Used to fill a cache at a finer grid than the mixing grid: tapping the same layer at twice
    the input size gives twice the cells per side (14x14 at 448 px for a 7x7 teacher at 224 px).
    A model that is not an :class:`~lightning_acm.attention.AttentionModel` is returned unchanged.
    """
    from lightning_acm.attention import AttentionModel

    if not isinstance(model, AttentionModel):
        return model
    regridded = AttentionModel(
        model.backbone,
        model.layer,
        input_mean=model.input_mean.flatten().tolist(),
        input_std=model.input_std.flatten().tolist(),
        teacher_mean=model.teacher_mean.flatten().tolist(),
        teacher_std=model.teacher_std.flatten().tolist(),
        input_size=input_size,
        grid_size=grid_size,
        reduction=model.reduction,
        channels=model.channels,
        amp_dtype=model.amp_dtype,
        channels_last=model.channels_last,
        relu=model.relu,
    )
    return regridded.to(model.input_mean.device)


def reference_datamodule(trainer: Any, owner: str) -> Any:
    """The trainer's datamodule, checked to record augmentation and to give reference images.

    Raises:
        MisconfigurationException: if there is no such datamodule or ``record_augmentation`` is off.
    """
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not callable(getattr(datamodule, "train_reference_dataset", None)):
        found = "no datamodule" if datamodule is None else f"{type(datamodule).__name__}, which has none"
        raise MisconfigurationException(
            f"{owner}(heatmap_cache=True) computes each heatmap once on the un-augmented training images, so it needs a"
            f" datamodule with `train_reference_dataset()` and `record_augmentation`, but the trainer has {found}."
            " Use a lightning_acm datamodule with `data.record_augmentation: true`, or set `heatmap_cache: false`."
        )
    if not getattr(datamodule, "record_augmentation", False):
        raise MisconfigurationException(
            f"{owner}(heatmap_cache=True) moves cached heatmaps through each sample's crop and flip, but"
            f" {type(datamodule).__name__}.record_augmentation is False, so the batches carry no geometry."
            " Set `data.record_augmentation: true` (or `record_augmentation=True` on the datamodule)."
        )
    return datamodule


def batch_geometry(batch: Any, key: str, batch_size: int, owner: str) -> Tensor:
    """The ``(B, 6)`` geometry of a training batch: ``batch[2]`` of a list, ``batch[key]`` of a dict."""
    if isinstance(batch, dict):
        if key not in batch:
            raise KeyError(
                f"{owner}(heatmap_cache=True): the dict batch has no key {key!r} (`geometry_key`); its keys are"
                f" {sorted(map(str, batch))}. Set `data.record_augmentation: true` or pass `geometry_key=...`."
            )
        geometry = batch[key]
    elif isinstance(batch, (list, tuple)) and len(batch) >= 3:
        geometry = batch[2]
    else:
        raise ValueError(
            f"{owner}(heatmap_cache=True) needs the augmentation geometry as the third element of the batch"
            " [images, targets, geometry], but the batch has none. Set `data.record_augmentation: true`."
        )
    _check_geometry(geometry, batch_size)
    if geometry.shape[1] != 6:
        raise ValueError(
            f"Expected the batch's geometry to have shape (B, 6) [index, y0, x0, y1, x1, flipped], but got"
            f" shape {tuple(geometry.shape)}."
        )
    return geometry


def _digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 of named tensors: each name, dtype, shape and the bytes of its values."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        values = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {values.dtype} {tuple(tensor.shape)};".encode())
        digest.update(values.view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_fingerprint(teacher: nn.Module, dataset: Dataset, grid_size: Size2) -> dict[str, Any]:
    """What a cache's heatmaps are computed from, as a dict of plain values to save as its ``meta``.

    A saved cache is reused only when its fingerprint equals the current one, field by field:

    * ``teacher``: the type of the teacher (of the backbone of an
      :class:`~lightning_acm.attention.AttentionModel`), and ``teacher_weights``: a SHA-256 of
      its ``state_dict`` (names, dtypes, shapes, values), so a retrained teacher does not match;
    * for an ``AttentionModel``: ``layer``, ``input_size``, ``reduction``, ``relu``,
      ``precision`` and ``normalization`` (the students' ``input_mean``/``input_std`` it undoes
      and the teacher's own ``teacher_mean``/``teacher_std``);
    * ``grid_size`` of the cache;
    * ``num_samples`` (``len(dataset)``) and ``dataset_pixels``: a SHA-256 of the images of the
      first, middle and last samples (the first element of a tuple sample), so two datasets of
      one size (CIFAR-10 and CIFAR-100) do not match.

    Reads three samples and hashes every weight: call it once per fit, not per batch.

    Args:
        teacher: the model that fills the cache.
        dataset: the un-augmented images the cache is filled from (``train_reference_dataset()``).
        grid_size: the cache's grid (int or ``(fh, fw)``).

    Returns:
        A dict of strings, numbers and lists (what ``torch.load(weights_only=True)`` reads back).

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> teacher = nn.Conv2d(3, 1, 4, stride=4)
        >>> images = TensorDataset(torch.zeros(5, 3, 8, 8))
        >>> a = cache_fingerprint(teacher, images, 2)
        >>> a["num_samples"], a["grid_size"], a["teacher"]
        (5, [2, 2], 'Conv2d')
        >>> with torch.no_grad():
        ...     _ = teacher.weight.add_(1.0)
        >>> b = cache_fingerprint(teacher, images, 2)
        >>> sorted(key for key in a if a[key] != b[key])
        ['teacher_weights']
    """
    from lightning_acm.attention import AttentionModel

    size = len(dataset)  # type: ignore[arg-type]
    images = []
    for index in sorted({0, size // 2, size - 1} if size else set()):
        sample = dataset[index]
        image = sample[0] if isinstance(sample, (list, tuple)) else sample
        images.append((str(index), image if isinstance(image, Tensor) else torch.as_tensor(np.asarray(image))))
    backbone = teacher.backbone if isinstance(teacher, AttentionModel) else teacher
    fingerprint: dict[str, Any] = {
        "teacher": type(backbone).__name__,
        "teacher_weights": _digest(teacher.state_dict().items()),
        "grid_size": list(check_size2(grid_size, "grid_size")),
        "num_samples": size,
        "dataset_pixels": _digest(images),
    }
    if isinstance(teacher, AttentionModel):
        fingerprint.update(
            layer=teacher.layer,
            input_size=None if teacher.input_size is None else list(teacher.input_size),
            reduction=teacher.reduction,
            relu=teacher.relu,
            precision=str(teacher.amp_dtype),
            normalization=[
                stats.flatten().tolist()
                for stats in (teacher.input_mean, teacher.input_std, teacher.teacher_mean, teacher.teacher_std)
            ],
        )
    return fingerprint


def cache_for_trainer(
    trainer: Any,
    teacher: nn.Module,
    *,
    grid_size: Size2,
    path: Optional[str] = None,
    batch_size: int = 64,
    meta: Optional[dict[str, Any]] = None,
    previous: Optional[HeatmapCache] = None,
    owner: str = "AttentiveCutMix",
) -> HeatmapCache:
    """Fill (or load) the heatmap cache of the trainer's training set, on every rank, on the training device.

    Only the training indices (``datamodule.train_indices`` when the datamodule has them, else all
    reference samples) are computed. Under DDP each rank runs the teacher on its shard
    ``train_indices[rank::world_size]`` and the shards are exchanged with
    ``trainer.strategy.all_gather``, so every rank holds the whole cache and the teacher runs once
    per sample in total. With ``path``, a file whose ``meta`` (``meta`` and the
    :func:`cache_fingerprint` of ``teacher`` and the reference dataset) matches and that covers the
    training indices is loaded instead. Otherwise the cache is computed and rank 0 writes it to
    ``path``, after a one-line warning that names the file and the fields that differed (or that it
    is empty, truncated or not a cache).

    Raises:
        MisconfigurationException: see :func:`reference_datamodule`.
        RuntimeError: if a training sample is still missing after filling (the reference dataset
            does not cover the training indices).
    """
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

    datamodule = reference_datamodule(trainer, owner)
    reference = datamodule.train_reference_dataset()
    num_samples = len(reference)
    train_indices = getattr(datamodule, "train_indices", None)
    required = (
        torch.as_tensor(train_indices, dtype=torch.long).flatten()
        if train_indices is not None
        else torch.arange(num_samples)
    )
    grid = check_size2(grid_size, "grid_size")
    device = trainer.strategy.root_device
    meta = {**(meta or {}), **cache_fingerprint(teacher, reference, grid)}

    def mismatch(cache: HeatmapCache) -> Optional[str]:
        """Why ``cache`` cannot serve this fit (the fingerprint fields that differ), or ``None``."""
        differ = sorted(key for key in meta.keys() | cache.meta.keys() if cache.meta.get(key) != meta.get(key))
        if differ or len(cache) != num_samples or cache.grid_size != grid:
            return f"its {', '.join(differ) or 'grid_size'} differ"
        missing = int((~cache.filled[required.to(cache.device)]).sum())
        return f"it lacks {missing} of the {required.numel()} training samples" if missing else None

    if previous is not None and mismatch(previous) is None:
        return previous
    if path is not None and os.path.isfile(path):
        try:
            loaded = HeatmapCache.load(path, device)
        except ValueError:
            loaded, problem = None, "it is empty, truncated or not a heatmap cache"
        else:
            problem = mismatch(loaded)
        if trainer.strategy.reduce_boolean_decision(problem is None, all=True) and loaded is not None:
            rank_zero_info(f"{owner}: loaded {num_samples} cached heatmaps from {path!r}.")
            return loaded
        rank_zero_warn(
            f"{owner}: not using the heatmap cache {path!r}: {problem or 'another process cannot'};"
            " it is recomputed and overwritten."
        )

    world, rank = trainer.world_size, trainer.global_rank
    cache = HeatmapCache(num_samples, grid, device=device)
    cache.meta = meta
    shard = required[rank::world]
    start = time.perf_counter()
    cache.fill(teacher, reference, indices=shard.tolist(), batch_size=batch_size,
               num_workers=getattr(datamodule, "num_workers", 0))
    if world > 1:
        length = -(-required.numel() // world)
        local = torch.zeros(length, *grid, dtype=torch.float32, device=device)
        local[: shard.numel()] = cache.maps[shard.to(device)].float()
        gathered = trainer.strategy.all_gather(local)
        for other in range(world):
            indices = required[other::world]
            cache.update(indices, gathered[other, : indices.numel()])
    if not bool(cache.filled[required.to(device)].all()):
        raise RuntimeError(
            f"{owner}: {int((~cache.filled[required.to(device)]).sum())} training samples have no cached heatmap;"
            " the reference dataset must return (image, target, index) for every training index."
        )
    rank_zero_info(
        f"{owner}: computed {required.numel()} heatmaps ({grid[0]}x{grid[1]}) in {time.perf_counter() - start:.1f} s"
        f" on {world} process(es)."
    )
    if path is not None and trainer.is_global_zero:
        cache.save(path)
    trainer.strategy.barrier("heatmap_cache")
    return cache
