"""A heatmap cache: the frozen teacher runs once per un-augmented training image instead of once per batch, and
:func:`warp_heatmaps` moves each map through the crop and flip that the augmentation recorded.

``geometry`` is ``(B, 6)`` float ``[index, y0, x0, y1, x1, flipped]`` (or ``(B, 5)`` without the index): the
augmented image is the box ``[y0, y1] x [x0, x1]`` of the un-augmented one, in coordinates normalised to ``[0, 1]``
(outside: padding), resized, then flipped left-right where ``flipped`` is 1. Fine maps ``(B, fh, fw)`` tile it evenly.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_acm.attention import _NORMALIZATION, AttentionModel
from lightning_acm.validation import Size2, check_choice, check_heatmaps, check_int, check_size2

__all__ = [
    "HeatmapCache",
    "HeatmapCacheConfig",
    "batch_geometry",
    "cache_for_trainer",
    "reference_datamodule",
    "regrid_attention_model",
    "warp_heatmaps",
]

_FORMAT_VERSION = 1
Device = Optional[Union[str, torch.device]]


def _check_geometry(geometry: Any, batch_size: Optional[int] = None, *, with_index: bool = False) -> Tensor:
    """The ``(B, 5)`` box-and-flip part of a ``(B, 6)`` (or, unless ``with_index``, ``(B, 5)``) geometry, as float32."""
    if not isinstance(geometry, Tensor):
        raise TypeError(f"Expected `geometry` to be a torch.Tensor, but got {type(geometry).__name__}.")
    if geometry.ndim != 2 or geometry.shape[1] not in ((6,) if with_index else (5, 6)):
        kind = "with the dataset index first" if with_index else "or (B, 5) without the index"
        raise ValueError(
            f"Expected `geometry` of shape (B, 6) [index, y0, x0, y1, x1, flipped] {kind}, but got"
            f" {tuple(geometry.shape)}."
        )
    if batch_size is not None and geometry.shape[0] != batch_size:
        raise ValueError(
            f"Expected `geometry` to have one row per sample, but got {geometry.shape[0]} != {batch_size}."
        )
    return geometry[:, -5:].float()


def _cell_weights(start: Tensor, end: Tensor, cells_out: int, cells_in: int) -> Tensor:
    """``(B, cells_out, cells_in)``: the share of output cell ``i``'s source interval in each input cell."""
    steps = torch.arange(cells_out + 1, device=start.device, dtype=torch.float32) / cells_out
    bounds = start.unsqueeze(1) + steps * (end - start).unsqueeze(1)
    lo, hi = bounds[:, :-1, None], bounds[:, 1:, None]
    edges = torch.arange(cells_in + 1, device=start.device, dtype=torch.float32) / cells_in
    overlap = (torch.minimum(hi, edges[1:]) - torch.maximum(lo, edges[:-1])).clamp_min(0.0)
    return overlap / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)


def warp_heatmaps(fine_maps: Tensor, geometry: Tensor, grid_size: Size2 = 7) -> Tensor:
    """Move heatmaps of un-augmented images through each sample's crop and flip, onto ``(B, gh, gw)`` float32 cells.

    A cell is the area-weighted mean of the fine map over what lands in it, padding counting as the
    map's minimum (the identity box gives ``F.adaptive_avg_pool2d``).

    Args:
        fine_maps: ``(B, fh, fw)`` heatmaps; geometry: ``(B, 6)`` or ``(B, 5)``; grid_size: int or ``(gh, gw)``.

    Example::

        >>> warp_heatmaps(torch.tensor([[[1.0, 2.0]]]), torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]), (1, 2))  # flipped
        tensor([[[2., 1.]]])
    """
    check_heatmaps(fine_maps)
    y0, x0, y1, x1, flipped = _check_geometry(geometry, fine_maps.shape[0]).to(fine_maps.device).unbind(1)
    gh, gw = check_size2(grid_size, "grid_size")
    rows = _cell_weights(y0, y1, gh, fine_maps.shape[1])
    cols = _cell_weights(x0, x1, gw, fine_maps.shape[2])
    cols = torch.where((flipped > 0.5).view(-1, 1, 1), cols.flip(1), cols)
    maps = fine_maps.float()
    inside = rows.sum(2).unsqueeze(2) * cols.sum(2).unsqueeze(1)
    floor = maps.flatten(1).amin(dim=1).view(-1, 1, 1)
    return rows @ maps @ cols.transpose(1, 2) + (1.0 - inside).clamp_min(0.0) * floor


@dataclass(frozen=True)
class HeatmapCacheConfig:
    """Settings of the heatmap cache of :class:`~lightning_acm.callbacks.AttentiveCutMix`.

    Args:
        grid_size: cells per side of the cached maps (the teacher's grid when ``None``).
        input_size, batch_size: the teacher's input size (``None``: scaled with ``grid_size``) and batch while filling.
        path: a file to load the cache from when its fingerprint matches, and to save it to otherwise.
        geometry_key: the geometry's index in a list batch (an int; else 2) or key in a dict batch (else "geometry").
    """

    grid_size: Optional[Union[int, tuple[int, int]]] = None
    input_size: Optional[int] = None
    path: Optional[str] = None
    batch_size: int = 64
    geometry_key: Union[int, str] = 2

    def __post_init__(self) -> None:
        check_size2(self.grid_size, "grid_size", optional=True)
        check_int(self.input_size, "input_size", minimum=1, optional=True)
        check_int(self.batch_size, "batch_size", minimum=1)
        if self.path is not None and not isinstance(self.path, (str, os.PathLike)):
            raise TypeError(f"Expected `path` to be None or a file path, but got {self.path!r}.")
        if isinstance(self.geometry_key, bool) or not isinstance(self.geometry_key, (int, str)):
            raise TypeError(f"Expected `geometry_key` to be an int or a str, but got {self.geometry_key!r}.")


class HeatmapCache:
    """``maps`` ``(N, fh, fw)`` and ``filled`` ``(N,)`` flags: one fine heatmap per training sample, by dataset index.

    Args:
        num_samples: ``N``; grid_size: fine cells per side; dtype: float16, bfloat16 or float32; device: where it lives.

    Example::

        >>> cache = HeatmapCache(3, grid_size=2)
        >>> cache.update(torch.tensor([0, 1, 2]), torch.arange(12.0).view(3, 2, 2))
        >>> cache.is_complete(), cache.warp(torch.tensor([[2.0, 0.0, 0.0, 1.0, 1.0, 0.0]]), 1)  # sample 2, identity box
        (True, tensor([[[9.5000]]]))
    """

    def __init__(
        self, num_samples: int, grid_size: Size2 = 14, *, dtype: torch.dtype = torch.float16, device: Device = None
    ) -> None:
        check_int(num_samples, "num_samples", minimum=1)
        check_choice(dtype, "dtype", (torch.float16, torch.bfloat16, torch.float32))
        self.grid_size: tuple[int, int] = check_size2(grid_size, "grid_size")
        self.maps = torch.zeros(num_samples, *self.grid_size, dtype=dtype, device=device)
        self.filled = torch.zeros(num_samples, dtype=torch.bool, device=device)
        self.meta: dict[str, Any] = {}  # how the maps were made, saved with them

    def __len__(self) -> int:
        return self.maps.shape[0]

    @property
    def device(self) -> torch.device:
        return self.maps.device

    def is_complete(self) -> bool:
        """Whether every sample has a map (a host sync: call it once after filling, not per batch)."""
        return bool(self.filled.all())

    def missing(self) -> Tensor:
        """Indices ``(M,)`` of the samples without a map."""
        return (~self.filled).nonzero().flatten()

    def update(self, indices: Tensor, maps: Tensor) -> None:
        """Store ``maps`` ``(M, fh, fw)`` for the dataset ``indices`` ``(M,)`` and mark them filled."""
        check_heatmaps(maps)
        indices = torch.as_tensor(indices).to(self.device, torch.long).flatten()
        if tuple(maps.shape[-2:]) != self.grid_size or indices.shape[0] != maps.shape[0]:
            raise ValueError(
                f"Expected one index per heatmap and heatmaps on the cache's {self.grid_size[0]}x{self.grid_size[1]}"
                f" grid, but got {indices.shape[0]} indices and {maps.shape[0]} heatmaps of {maps.shape[-2]}x"
                f"{maps.shape[-1]}. Build the teacher with the cache's `grid_size`."
            )
        self.maps[indices] = maps.to(self.device, self.maps.dtype)
        self.filled[indices] = True

    def lookup(self, indices: Tensor) -> Tensor:
        """``(B, fh, fw)`` float32 maps of the dataset ``indices`` (rounded), unchecked (no sync)."""
        indices = indices.round() if indices.is_floating_point() else indices
        return self.maps.index_select(0, indices.to(self.device, torch.long)).float()

    def warp(self, geometry: Tensor, grid_size: Size2 = 7) -> Tensor:
        """``(B, gh, gw)`` heatmaps of an augmented batch from its ``(B, 6)`` geometry (see :func:`warp_heatmaps`)."""
        _check_geometry(geometry, with_index=True)
        return warp_heatmaps(self.lookup(geometry[:, 0]), geometry, grid_size)

    @torch.no_grad()
    def fill(
        self,
        attention_model: nn.Module,
        data: Dataset,
        *,
        indices: Optional[Sequence[int]] = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> HeatmapCache:
        """Store ``attention_model``'s heatmaps for ``indices`` (all when ``None``) of ``data``; return ``self``.
        ``data`` yields ``(image, target, index)`` samples, or ``(image, target)`` ones keyed by position."""
        positions = list(range(len(data))) if indices is None else [int(i) for i in indices]  # type: ignore[arg-type]
        device = next(attention_model.parameters(), self.maps).device
        loader = DataLoader(Subset(data, positions), batch_size=batch_size, num_workers=num_workers)
        for start, batch in zip(range(0, len(positions), batch_size), loader):
            keys = batch[2] if len(batch) >= 3 else positions[start : start + batch_size]
            self.update(torch.as_tensor(keys), attention_model(batch[0].to(device, non_blocking=True)))
        return self

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the maps, flags and ``meta`` to ``path`` atomically (derived data: a file, not checkpoint state)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        state = {"version": _FORMAT_VERSION, "maps": self.maps.cpu(), "filled": self.filled.cpu(), "meta": self.meta}
        torch.save(state, f"{path}.partial-{os.getpid()}")
        os.replace(f"{path}.partial-{os.getpid()}", path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device: Device = None) -> HeatmapCache:
        """Read a cache written by :meth:`save` onto ``device`` (ValueError if the file is damaged)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Expected a heatmap cache file at {path!r}, but it does not exist.")
        try:  # a damaged file fails in many ways: EOFError, OSError, RuntimeError, KeyError, AttributeError
            state = torch.load(path, map_location="cpu", weights_only=True)
            maps, filled, meta = state["maps"], state["filled"], dict(state["meta"])
            if state["version"] != _FORMAT_VERSION or filled.shape != maps.shape[:1]:
                raise ValueError(f"format {state['version']}, {tuple(filled.shape)} flags, {tuple(maps.shape)} maps")
        except Exception as error:
            raise ValueError(
                f"Expected {path!r} to be a heatmap cache written by HeatmapCache.save, but it cannot be read"
                f" ({type(error).__name__}: {error}). Delete the file: a cache is derived data, and a fit with"
                " `heatmap_cache.path` writes it again."
            ) from error
        cache = cls(maps.shape[0], tuple(maps.shape[-2:]), dtype=maps.dtype, device=device)
        cache.maps, cache.filled, cache.meta = maps.to(cache.device), filled.to(cache.device), meta
        return cache


def regrid_attention_model(model: AttentionModel, grid_size: Size2, input_size: Optional[Size2]) -> AttentionModel:
    """The same frozen teacher (its backbone shared) on another grid and input size, e.g. to fill a finer cache."""
    same = {name: getattr(model, name) for name in ("reduction", "channels", "amp_dtype", "channels_last", "relu")}
    stats = {name: getattr(model, name).flatten().tolist() for name in _NORMALIZATION}
    regridded = AttentionModel(model.backbone, model.layer, input_size=input_size, grid_size=grid_size, **stats, **same)
    return regridded.to(model.input_mean.device)


def reference_datamodule(trainer: Any, owner: str) -> Any:
    """The trainer's datamodule, checked to record augmentation and to give reference images (else misconfigured)."""
    datamodule = getattr(trainer, "datamodule", None)
    if not callable(getattr(datamodule, "train_reference_dataset", None)):
        found = "no datamodule" if datamodule is None else f"{type(datamodule).__name__} without it"
    elif not getattr(datamodule, "record_augmentation", False):
        found = f"{type(datamodule).__name__} with `record_augmentation=False`"
    else:
        return datamodule
    raise MisconfigurationException(
        f"Expected {owner}(heatmap_cache=True) to get a datamodule with `train_reference_dataset()` and"
        f" `record_augmentation=True`, but got {found}. Use a lightning_acm datamodule with"
        " `data.record_augmentation: true`, or set `heatmap_cache: false`."
    )


def batch_geometry(batch: Any, key: Union[int, str], batch_size: int, owner: str) -> Tensor:
    """The checked ``(B, 6)`` geometry of a training batch: ``batch[key]``, an int key indexing a list batch and a
    str key a dict batch (a batch of the other kind uses position 2 or ``"geometry"``)."""
    if isinstance(batch, dict):
        key = key if isinstance(key, str) else "geometry"
        if key not in batch:
            raise KeyError(
                f"Expected the dict batch of {owner}(heatmap_cache=True) to hold the geometry at"
                f" `geometry_key` {key!r}, but its keys are {sorted(map(str, batch))}."
            )
    else:
        key = key if isinstance(key, int) else 2
        if not isinstance(batch, (list, tuple)) or len(batch) <= key:
            raise ValueError(
                f"Expected the batch of {owner}(heatmap_cache=True) to hold the geometry at position {key}"
                " (`geometry_key`), but it has none. Set `data.record_augmentation: true`."
            )
    _check_geometry(batch[key], batch_size, with_index=True)
    return batch[key]


def _digest(tensors: Mapping[str, Any]) -> str:
    """SHA-256 of named tensors (or arrays): their names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, value in tensors.items():
        tensor = (value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))).detach().cpu()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _fingerprint(teacher: AttentionModel, dataset: Dataset, grid_size: Size2) -> dict[str, Any]:
    """A cache's ``meta``: the teacher (a hash of all its weights) and its settings, and a hash of three images."""
    size = len(dataset)  # type: ignore[arg-type]
    samples = {str(index): dataset[index] for index in sorted({0, size // 2, size - 1} if size else set())}
    images = {name: sample[0] if isinstance(sample, (list, tuple)) else sample for name, sample in samples.items()}
    return {
        "teacher": type(teacher.backbone).__name__,
        "teacher_weights": _digest(teacher.state_dict()),
        "grid_size": list(check_size2(grid_size, "grid_size")),
        "num_samples": size,
        "dataset_pixels": _digest(images),
        "layer": teacher.layer,
        "input_size": teacher.input_size and list(teacher.input_size),
        "reduction": teacher.reduction,
        "relu": teacher.relu,
        "precision": str(teacher.amp_dtype),
        "normalization": [getattr(teacher, name).flatten().tolist() for name in _NORMALIZATION],
    }


def _mismatch(cache: HeatmapCache, meta: dict[str, Any], required: Tensor) -> Optional[str]:
    """Why ``cache`` cannot serve a fit with this ``meta`` and these training indices, or ``None``."""
    differ = sorted(key for key in meta.keys() | cache.meta.keys() if cache.meta.get(key) != meta.get(key))
    if differ or len(cache) != meta["num_samples"] or list(cache.grid_size) != meta["grid_size"]:
        return f"its {', '.join(differ) or 'grid_size'} differ"
    missing = int((~cache.filled[required.to(cache.device)]).sum())
    return f"it lacks {missing} of the {required.numel()} training samples" if missing else None


def cache_for_trainer(
    trainer: Any,
    teacher: AttentionModel,
    *,
    grid_size: tuple[int, int],
    path: Optional[str] = None,
    batch_size: int = 64,
    previous: Optional[HeatmapCache] = None,
    owner: str = "AttentiveCutMix",
) -> HeatmapCache:
    """Fill (or load) the heatmap cache of the trainer's training indices, on every rank, on the training device.

    ``previous``, else the file at ``path``, is used when its ``meta`` matches on every rank; otherwise each rank
    computes its shard (all-gathered under DDP) and rank 0 writes ``path``.
    """
    datamodule = reference_datamodule(trainer, owner)
    reference = datamodule.train_reference_dataset()
    indices = getattr(datamodule, "train_indices", None)
    required = torch.as_tensor(range(len(reference)) if indices is None else indices).long().flatten()
    meta = _fingerprint(teacher, reference, grid_size)
    found, problem, on_disk = None, None, path is not None and os.path.isfile(path)
    if previous is not None and _mismatch(previous, meta, required) is None:
        found = previous
    elif on_disk:
        try:
            found = HeatmapCache.load(path, trainer.strategy.root_device)
            problem = _mismatch(found, meta, required)
        except ValueError:
            problem = "it is empty, truncated or not a heatmap cache"
    # Every rank takes part, so that all ranks use a cache or all fill one (filling all-gathers).
    if trainer.strategy.reduce_boolean_decision(found is not None and problem is None, all=True):
        if found is not previous:
            rank_zero_info(f"{owner}: loaded {len(found)} cached heatmaps from {path!r}.")
        return found
    if on_disk:
        rank_zero_warn(
            f"{owner}: not using the heatmap cache {path!r}: {problem or 'another process cannot'};"
            " it is recomputed and overwritten."
        )
    cache = HeatmapCache(len(reference), grid_size, device=trainer.strategy.root_device)
    cache.meta, world, start = meta, trainer.world_size, time.perf_counter()
    shard = required[trainer.global_rank :: world]
    workers = getattr(datamodule, "num_workers", 0)
    cache.fill(teacher, reference, indices=shard.tolist(), batch_size=batch_size, num_workers=workers)
    if world > 1:  # every rank gets every shard
        local = torch.zeros(-(-required.numel() // world), *grid_size, dtype=torch.float32, device=cache.device)
        local[: shard.numel()] = cache.lookup(shard)
        for other, maps in enumerate(trainer.strategy.all_gather(local)):
            cache.update(required[other::world], maps[: required[other::world].numel()])
    if problem := _mismatch(cache, meta, required):
        raise RuntimeError(
            f"{owner}: the filled heatmap cache is incomplete ({problem}); the reference dataset must"
            " return (image, target, index) for every training index."
        )
    rank_zero_info(
        f"{owner}: computed {required.numel()} heatmaps ({grid_size[0]}x{grid_size[1]}) in"
        f" {time.perf_counter() - start:.1f} s on {world} process(es)."
    )
    if path is not None and trainer.is_global_zero:
        cache.save(path)
    trainer.strategy.barrier("heatmap_cache")
    return cache
