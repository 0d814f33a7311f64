"""Lightning callbacks that mix training batches in place: Attentive CutMix, CutMix and Mixup.

Each batch is mixed with a numpy generator seeded by ``SeedSequence([seed, rank, epoch, batch index])``,
so reruns and resumed runs mix identically (the seed is in the callback's ``state_dict``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import deque
from collections.abc import MutableMapping, MutableSequence, Sequence
from typing import Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_acm import functional as AF
from lightning_acm import validation as V
from lightning_acm.attention import Teacher
from lightning_acm.cache import (
    HeatmapCache,
    HeatmapCacheConfig,
    batch_geometry,
    cache_for_trainer,
    reference_datamodule,
    regrid_attention_model,
)
from lightning_acm.loss import SoftTargetLossMixin

__all__ = ["AttentiveCutMix", "CutMix", "MixResult", "MixingCallback", "MixUp", "RandomMixing"]


def batch_generator(*keys: int) -> np.random.Generator:
    """The numpy generator of one batch, seeded by ``SeedSequence(keys)``: every key counts, order included."""
    return np.random.default_rng(np.random.SeedSequence([int(key) & ((1 << 64) - 1) for key in keys]))


@dataclasses.dataclass(eq=False, repr=False)
class MixResult:
    """What one mixed batch is made of (``lam``: the fraction of each image taken from its partner).

    Attributes:
        mixed, soft_targets, lam, permutation: ``(B, C, H, W)``, ``(B, K)``, ``(B,)`` and ``(B,)`` partner indices.
        mask: ``(B, 1, H, W)`` bool pasted region, ``None`` for Mixup.
        partner_heatmaps, cell_indices: ``(B, gh, gw)`` partner attention and ``(B, k)`` row-major cells pasted.
        boxes: ``(B, 4)`` ``(top, bottom, left, right)`` pasted box, bottom/right exclusive (CutMix).
        source, source_targets: the batch's own images and targets before mixing.

    Example::

        >>> mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
        >>> result = MixResult(torch.rand(2, 3, 4, 4), torch.eye(2), torch.full((2,), 0.0), torch.tensor([1, 0]), mask)
        >>> result.has_region, result
        (True, MixResult(batch=2, region=box, mean_lam=0.000))
    """

    mixed: Tensor
    soft_targets: Tensor
    lam: Tensor
    permutation: Tensor
    mask: Optional[Tensor] = None
    partner_heatmaps: Optional[Tensor] = None
    _: dataclasses.KW_ONLY
    cell_indices: Optional[Tensor] = None
    boxes: Optional[Tensor] = None
    source: Optional[Tensor] = None
    source_targets: Optional[Tensor] = None

    @property
    def has_region(self) -> bool:
        """Whether a region of the partner was pasted (CutMix, Attentive CutMix) rather than blended in (Mixup)."""
        return self.mask is not None

    def __repr__(self) -> str:
        kind = "cells" if self.cell_indices is not None else "box" if self.has_region else "blend"
        return f"{type(self).__name__}(batch={len(self.mixed)}, region={kind}, mean_lam={float(self.lam.mean()):.3f})"

    def pasted_attention(self) -> Optional[Tensor]:
        """``(B,)`` share of each partner's attention that reaches the mixed image (``lam`` for Mixup), or ``None``."""
        if not self.has_region:
            return self.lam
        return None if self.partner_heatmaps is None else AF.pasted_attention_share(self.partner_heatmaps, self.mask)


def _build_teacher(teacher: Teacher, trainer: pl.Trainer, owner: str) -> nn.Module:
    """``teacher`` built on the training device, normalised as ``trainer.datamodule``'s ``mean``/``std`` say."""
    mean, std = getattr(trainer.datamodule, "mean", None), getattr(trainer.datamodule, "std", None)
    return teacher.build(trainer.strategy.root_device, input_mean=mean, input_std=std, owner=owner)


class _EpochMeans:
    """Epoch means of per-image metrics over all ranks: sums stay on the device, one ``reduce`` per epoch."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.reset(torch.device("cpu"))

    def reset(self, device: torch.device) -> None:
        self._sums = torch.zeros(len(self.names), device=device)
        self._counts = [0] * len(self.names)

    def add(self, name: str, total: Union[Tensor, float], count: int) -> None:
        """Count ``total``, the sum of ``count`` values of ``name``."""
        row = self.names.index(name)
        self._sums[row].add_(total)
        self._counts[row] += count

    def log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str) -> None:
        """Log ``{prefix}/{name}`` for every name with values on some rank; every rank must call it."""
        counts = torch.tensor(self._counts, dtype=self._sums.dtype, device=self._sums.device)
        totals = trainer.strategy.reduce(torch.stack([self._sums, counts]), reduce_op="sum")
        for name, total, count in zip(self.names, *totals.tolist(), strict=True):
            if count > 0:
                # Already global: sync_dist only averages equal values (and keeps Lightning from warning).
                pl_module.log(f"{prefix}/{name}", total / count, on_step=False, on_epoch=True, sync_dist=True)


class _LabelRangeCheck:
    """Checks class-index labels against ``[0, num_classes)``; on CUDA without a host sync: their bounds are checked
    once landed in pinned memory (a later batch or :meth:`flush`), the labels clamped meanwhile for the scatters."""

    def __init__(self) -> None:
        self._pending: deque[tuple[Tensor, Any, int, str]] = deque()

    def __call__(self, targets: Tensor, num_classes: int, where: str) -> Tensor:
        """Check ``targets`` (or queue the check); returns the labels to build soft targets from."""
        if targets.ndim != 1 or targets.numel() == 0:
            return targets  # probabilities
        if targets.device.type != "cuda":
            V.check_class_indices(targets, num_classes, where)
            return targets
        self.flush(wait=False)
        # non_blocking to the CPU lands in pinned memory; the event says when it has.
        bounds = torch.stack(torch.aminmax(targets)).to("cpu", non_blocking=True)
        landed = torch.cuda.Event()
        landed.record(torch.cuda.current_stream(targets.device))
        self._pending.append((bounds, landed, num_classes, where))
        return targets.clamp(0, num_classes - 1)

    def flush(self, wait: bool = True) -> None:
        """Check every queued batch (only those whose bounds have landed, without ``wait``)."""
        while self._pending:
            bounds, landed, num_classes, where = self._pending[0]
            if not wait and not landed.query():
                return
            landed.synchronize()
            self._pending.popleft()
            V.check_label_range(*bounds.tolist(), num_classes, where)


def _locate(batch: Any, image_key: Any, target_key: Any, owner: str) -> tuple[Union[int, str], Union[int, str]]:
    """Where the images and targets are in ``batch`` (a mutable list or dict), with defaults for ``None`` keys."""
    if isinstance(batch, tuple):
        fields = getattr(batch, "_fields", None)
        fix = (
            "Collate it into a dict that keeps the field names (`collate_fn=lambda s: default_collate(s)._asdict()`)"
            f" and pass `image_key=` and `target_key=` (of {', '.join(map(repr, fields))})."
            if fields
            else "Return a list from your collate_fn (`collate_fn=lambda s: list(default_collate(s))`)."
        )
        kind = f"a namedtuple {type(batch).__name__}" if fields else "a tuple"
        raise TypeError(f"{owner} mixes the batch in place, but the batch is {kind}, which cannot be changed. {fix}")
    is_dict = isinstance(batch, MutableMapping)
    if not is_dict and not (isinstance(batch, MutableSequence) and len(batch) >= 2):
        raise TypeError(
            f"{owner} expects a batch list [images, targets, ...] or a dict with `image_key` and `target_key`, but"
            f" got {type(batch).__name__}{f' of length {len(batch)}' if isinstance(batch, Sequence) else ''}."
            " Make the dataset return (image, target) samples, or collate batches into such a list or dict."
        )
    image_key = ("image" if is_dict else 0) if image_key is None else image_key
    target_key = ("target" if is_dict else 1) if target_key is None else target_key
    for key, name in ((image_key, "image_key"), (target_key, "target_key")):
        if is_dict and key not in batch:
            raise KeyError(
                f"{owner}: the dict batch has no key {key!r} (`{name}`); its keys are"
                f" {sorted(map(str, batch))}. Pass `{name}=...` with the right key."
            )
        if not is_dict and (isinstance(key, str) or not -len(batch) <= key < len(batch)):
            raise ValueError(
                f"Expected `{name}` to be an int (a position) in the list batch of length {len(batch)}, but got"
                f" {key!r}. Pass `{name}=` with the position in the list (a str is the key of a dict batch), or"
                " None for the default."
            )
    return image_key, target_key


class MixingCallback(Callback):
    """Base of the mixing callbacks (subclasses implement :meth:`mix`): when to mix, where the batch is, seeding.

    Several mixing callbacks run in order, each mixing what the previous made. Class-index labels are checked
    to lie in ``[0, num_classes)`` (on CUDA a few batches late).

    Args:
        p: probability that a batch is mixed.
        num_classes: number of classes; from ``trainer.datamodule`` or the LightningModule when ``None``.
        seed: base seed; ``None`` takes ``torch.initial_seed()`` at the setup of each fit.
        label_smoothing: smoothing folded into the targets of every batch, mixed or not.
        stop_after_step, stop_after_epoch: stop mixing (not the checks and smoothing) at this step / 0-based epoch.
        image_key, target_key: list-batch position or dict-batch key (default ``0``/``1`` or ``"image"``/``"target"``).
        log_prefix: prefix of the logged epoch means ``{prefix}/mixed``, ``/lam`` and ``/pasted_attention``.

    Example::

        >>> callback = CutMix(p=0.5, num_classes=10, stop_after_epoch=5, image_key="image", target_key="label")
        >>> isinstance(callback, MixingCallback), callback.label_smoothing
        (True, 0.0)
    """

    def __init__(
        self,
        *,
        p: float = 1.0,
        num_classes: Optional[int] = None,
        seed: Optional[int] = None,
        label_smoothing: float = 0.0,
        stop_after_step: Optional[int] = None,
        stop_after_epoch: Optional[int] = None,
        image_key: Optional[Union[int, str]] = None,
        target_key: Optional[Union[int, str]] = None,
        log_prefix: str = "mix",
    ) -> None:
        super().__init__()
        self.p = V.check_real(p, "p", low=0.0, high=1.0, what="the probability that a batch is mixed")
        self.num_classes = V.check_int(num_classes, "num_classes", minimum=2, optional=True)
        self.seed = V.check_int(seed, "seed", optional=True)
        self.label_smoothing = V.check_label_smoothing(label_smoothing)
        self.stop_after_step = V.check_int(stop_after_step, "stop_after_step", minimum=0, optional=True)
        self.stop_after_epoch = V.check_int(stop_after_epoch, "stop_after_epoch", minimum=0, optional=True)
        for key, name in ((image_key, "image_key"), (target_key, "target_key")):
            if key is not None and not V.is_int(key) and not isinstance(key, str):
                raise TypeError(
                    f"Expected `{name}` to be None, an int (a position in a list batch) or a str (a key of a dict"
                    f" batch), but got {key!r}."
                )
        if image_key is not None and image_key == target_key:
            raise ValueError(f"Expected `image_key` and `target_key` to differ, but both are {image_key!r}.")
        self.image_key = int(image_key) if V.is_int(image_key) else image_key
        self.target_key = int(target_key) if V.is_int(target_key) else target_key
        self.log_prefix = log_prefix

        self.batches_seen, self.batches_mixed = 0, 0  # training batches seen and mixed on this rank
        self._num_classes, self._seed, self._rank = self.num_classes, self.seed, 0  # resolved in `setup`
        self._generator = batch_generator(self.seed or 0)  # rebuilt for every batch in on_train_batch_start
        self._warned_single = False
        self._epoch_means = _EpochMeans(("mixed", "lam", "pasted_attention"))
        self._label_check = _LabelRangeCheck()
        self._last_mix: Optional[MixResult] = None

    @property
    @override
    def state_key(self) -> str:
        # Every argument that defines the mixing, so that two callbacks of one class can share a Trainer.
        return self._generate_state_key(**self.state_key_arguments())

    def state_key_arguments(self) -> dict[str, Any]:
        """The arguments that make up :attr:`state_key` (subclasses add theirs): every one of ``__init__`` but ``seed``."""
        return {name: getattr(self, name) for name in _BASE_DEFAULTS if name != "seed"}

    @property
    def last_mix(self) -> Optional[MixResult]:
        """The read-only :class:`MixResult` of the current training batch, ``None`` when it was not mixed."""
        return self._last_mix

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._num_classes = self.num_classes
        if self._num_classes is None:
            owners = (getattr(trainer, "datamodule", None), pl_module, pl_module.hparams)
            found = [n for n in (getattr(owner, "num_classes", None) for owner in owners) if V.is_int(n) and n >= 2]
            if not found:
                raise MisconfigurationException(
                    f"{type(self).__name__} needs the number of classes to build soft targets, but `num_classes` is"
                    " None and neither the datamodule nor the LightningModule has a `num_classes` attribute. Pass"
                    f" `{type(self).__name__}(num_classes=K)`."
                )
            self._num_classes = int(found[0])
        # Taken anew for every fit; a resumed fit then restores the saved seed in `load_state_dict`.
        self._seed = self.seed if self.seed is not None else torch.initial_seed() & ((1 << 63) - 1)
        self._rank = trainer.global_rank
        if self.label_smoothing > 0 and isinstance(pl_module, SoftTargetLossMixin) and pl_module.label_smoothing > 0:
            rank_zero_warn(
                f"{type(self).__name__}(label_smoothing={self.label_smoothing}) smooths the targets and"
                f" {type(pl_module).__name__}(label_smoothing={pl_module.label_smoothing}) smooths them again in"
                " its loss. Set one of the two to 0."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._seed, "batches_seen": self.batches_seen, "batches_mixed": self.batches_mixed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._seed, self.batches_seen, self.batches_mixed = (state_dict[key] for key in self.state_dict())

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._last_mix = None  # frees the previous batch before this one is mixed
        image_slot, target_slot = _locate(batch, self.image_key, self.target_key, type(self).__name__)
        images, targets = batch[image_slot], batch[target_slot]  # type: ignore[index]
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise ValueError(
                f"{type(self).__name__} expects images of shape (B, C, H, W), but got {V.shape_of(images)}. Make the"
                " dataset return (C, H, W) image tensors (not flattened), or point `image_key` at the images of a dict"
                " batch."
            )
        num_classes = self._num_classes
        if num_classes is None:
            raise MisconfigurationException(f"{type(self).__name__} was not set up: call it through a Trainer.")

        self._generator = batch_generator(self._seed or 0, self._rank, trainer.current_epoch, batch_idx)
        self.batches_seen += 1
        # Only the mixing stops: the targets are still checked and smoothed below.
        step, epoch = self.stop_after_step, self.stop_after_epoch
        active = (step is None or trainer.global_step < step) and (epoch is None or trainer.current_epoch < epoch)
        mix_now = self.p > 0 and self._generator.random() < self.p and active
        size = images.shape[0]
        if mix_now and size < 2:
            if not self._warned_single:
                what = "a batch of one sample has no partner" if size else "an empty batch has no sample"
                rank_zero_warn(
                    f"{type(self).__name__}: {what} to mix with; it is left unmixed."
                    " Use `drop_last=True` in the training DataLoader to avoid a short last batch."
                )
                self._warned_single = True
            mix_now = False

        where = f" (training batch {batch_idx} of epoch {trainer.current_epoch})"
        checked = self._label_check(V.check_targets(targets, num_classes, size), num_classes, where)
        self._epoch_means.add("mixed", float(size) if mix_now else 0.0, size)
        if not mix_now:
            if self.label_smoothing > 0:
                batch[target_slot] = AF._probabilities(checked, num_classes, self.label_smoothing)  # type: ignore[index]
            return
        result = self.mix(images, checked, num_classes, batch)
        batch[image_slot], batch[target_slot] = result.mixed, result.soft_targets  # type: ignore[index]
        result.source, result.source_targets = images, targets
        self._last_mix = result
        self.batches_mixed += 1
        self._epoch_means.add("lam", result.lam.sum(), size)
        if (share := result.pasted_attention()) is not None:
            self.add_pasted_attention(share)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_means.reset(pl_module.device)
        self._label_check = _LabelRangeCheck()  # drops the checks an interrupted epoch left queued

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._label_check.flush()
        self._epoch_means.log(trainer, pl_module, self.log_prefix)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._label_check.flush()  # whatever ended the fit, no queued check is left unread

    def add_pasted_attention(self, shares: Tensor) -> None:
        """Count ``(B,)`` pasted-attention shares of this batch into the epoch's ``{log_prefix}/pasted_attention``:
        the mixer's own, or those a :class:`~lightning_acm.visualize.PastedAttentionMonitor`'s teacher measured."""
        self._epoch_means.add("pasted_attention", shares.sum(), shares.shape[0])

    def draw_permutation(self, batch_size: int, device: torch.device) -> Tensor:
        """The pairing for the current batch, from the callback's generator."""
        return AF.pairing_permutation(batch_size, generator=self._generator, device=device)

    def mix(self, images: Tensor, targets: Tensor, num_classes: int, batch: Any) -> MixResult:
        """Mix ``(B, C, H, W)`` images and ``(B,)`` or ``(B, K)`` checked targets; ``batch`` is read-only."""
        raise NotImplementedError

    def soft_targets(self, targets: Tensor, lam: Tensor, permutation: Tensor, num_classes: int) -> Tensor:
        """:func:`~lightning_acm.functional.mix_targets` with the callback's label smoothing."""
        return AF._mix_targets(targets, lam, permutation, num_classes, self.label_smoothing)


#: MixingCallback's arguments and their defaults.
_BASE_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(MixingCallback.__init__).parameters.items()
    if name != "self"
}


class _BetaMixingCallback(MixingCallback):
    """A mixing callback whose amount is drawn from ``Beta(alpha, alpha)``."""

    def __init__(self, *, alpha: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha = V.check_beta_alpha(alpha)

    @override
    def state_key_arguments(self) -> dict[str, Any]:
        return {**super().state_key_arguments(), "alpha": self.alpha}


class CutMix(_BetaMixingCallback):
    """CutMix (Yun et al., 2019): paste a random box of the partner, box area ~ ``Beta(alpha, alpha)``.

    Args:
        alpha: Beta parameter of the box area; ``1.0`` draws it uniformly.
        **kwargs: see :class:`MixingCallback`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[CutMix(alpha=1.0, p=0.5, seed=0)], accelerator="cpu", logger=False)
    """

    @override
    def mix(self, images: Tensor, targets: Tensor, num_classes: int, batch: Any) -> MixResult:
        permutation = self.draw_permutation(images.shape[0], images.device)
        mixed, lam, boxes, mask = AF._cutmix_paste(images, permutation, self.alpha, self._generator)
        soft = self.soft_targets(targets, lam, permutation, num_classes)
        return MixResult(mixed, soft, lam, permutation, mask, boxes=boxes)


class MixUp(_BetaMixingCallback):
    """Mixup (Zhang et al., 2018): blend each image with its partner, weight ~ ``Beta(alpha, alpha)``.

    Args:
        alpha: Beta parameter of the blend weight.
        **kwargs: see :class:`MixingCallback`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[MixUp(alpha=0.2, seed=0)], accelerator="cpu", logger=False)
    """

    @override
    def mix(self, images: Tensor, targets: Tensor, num_classes: int, batch: Any) -> MixResult:
        permutation = self.draw_permutation(images.shape[0], images.device)
        mixed, lam = AF._mixup_blend(images, permutation, self.alpha, self._generator)
        return MixResult(mixed, self.soft_targets(targets, lam, permutation, num_classes), lam, permutation)


class AttentiveCutMix(MixingCallback):
    """Attentive CutMix (Walawalkar et al., 2020): paste the partner's ``top_k`` most attended cells.

    Args:
        top_k: cells pasted (6 of a 7x7 grid in the paper).
        teacher: a :class:`~lightning_acm.attention.Teacher` or its ``source``, normalised by default as
            ``trainer.datamodule.mean``/``std``; its grid is the mixing grid. ``"random"`` pastes uniformly drawn
            cells (the control method); ``Teacher(coldest=True)`` pastes the least attended cells.
        heatmap_cache: ``True`` or a :class:`~lightning_acm.cache.HeatmapCacheConfig`: run the teacher once per
            un-augmented training image and warp the maps by the recorded geometry.
        **kwargs: see :class:`MixingCallback`.

    Example::

        >>> import lightning as L
        >>> tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.ReLU())
        >>> callback = AttentiveCutMix(teacher=Teacher(module=tiny, layer="1", input_size=28), seed=0)
        >>> trainer = L.Trainer(callbacks=[callback], accelerator="cpu", logger=False)
    """

    def __init__(
        self,
        *,
        top_k: int = 6,
        teacher: Union[str, Teacher] = "efficientnet_lite0",
        heatmap_cache: Union[bool, HeatmapCacheConfig] = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        teacher = Teacher(source=teacher) if isinstance(teacher, str) else teacher
        if not isinstance(teacher, Teacher):
            raise TypeError(f"Expected `teacher` to be a str or a Teacher, but got {type(teacher).__name__}.")
        heatmap_cache = HeatmapCacheConfig() if heatmap_cache is True else heatmap_cache
        if heatmap_cache is not False and not isinstance(heatmap_cache, HeatmapCacheConfig):
            raise TypeError(
                f"Expected `heatmap_cache` to be a bool or a HeatmapCacheConfig, but got {heatmap_cache!r}."
            )
        self.teacher = teacher
        self.grid_size: tuple[int, int] = V.check_size2(teacher.grid_size, "grid_size")
        self.top_k = V.check_top_k(top_k, self.grid_size)
        self.heatmap_cache: Optional[HeatmapCacheConfig] = heatmap_cache or None
        if teacher.is_random and self.heatmap_cache is not None:
            raise ValueError(
                "Expected `heatmap_cache=False` with `teacher='random'`: random cells run no teacher, so there is"
                " nothing to cache."
            )
        cache_grid = None if self.heatmap_cache is None else self.heatmap_cache.grid_size
        self.cache_grid_size = self.grid_size if cache_grid is None else V.check_size2(cache_grid, "grid_size")
        if self.cache_grid_size[0] < self.grid_size[0] or self.cache_grid_size[1] < self.grid_size[1]:
            raise ValueError(
                "Expected `heatmap_cache.grid_size` to be at least the teacher's `grid_size`"
                f" {self.grid_size[0]}x{self.grid_size[1]}, but got {cache_grid!r}."
            )
        self._attention: Optional[nn.Module] = None
        self._cache: Optional[HeatmapCache] = None

    @override
    def state_key_arguments(self) -> dict[str, Any]:
        teacher = {f.name: getattr(self.teacher, f.name) for f in dataclasses.fields(self.teacher)}
        if teacher.pop("module") is not None:  # the module's class, not its weights
            teacher["module"] = type(self.teacher.module).__name__
        cache = None if self.heatmap_cache is None else dataclasses.asdict(self.heatmap_cache)
        return {**super().state_key_arguments(), "top_k": self.top_k, "teacher": teacher, "heatmap_cache": cache}

    @property
    def attention_model(self) -> Optional[nn.Module]:
        """The frozen attention model after ``setup``, else ``None``."""
        return self._attention

    @property
    def cache(self) -> Optional[HeatmapCache]:
        """The filled :class:`~lightning_acm.cache.HeatmapCache` (with ``heatmap_cache``), else ``None``."""
        return self._cache

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.heatmap_cache is not None:
            reference_datamodule(trainer, type(self).__name__)
        if self._attention is None and not self.teacher.is_random:
            self._attention = _build_teacher(self.teacher, trainer, type(self).__name__)

    @torch.no_grad()
    def heatmaps(self, images: Tensor) -> Tensor:
        """``(B, gh, gw)`` attention of each image, from the frozen model on the images' device."""
        model = self._attention
        if model is None:
            raise MisconfigurationException(f"{type(self).__name__} was not set up: call it through a Trainer.")
        if (first := next(model.parameters(), None)) is not None and first.device != images.device:
            model.to(images.device)
        heatmaps = model(images)
        (gh, gw), expected = self.grid_size, (images.shape[0], *self.grid_size)
        if not isinstance(heatmaps, Tensor) or heatmaps.shape != expected:
            raise ValueError(
                f"Expected the attention model {type(model).__name__} to return heatmaps of shape {expected}, one per"
                f" image of the batch on the {gh}x{gw} `grid_size`, but got {V.shape_of(heatmaps)}. Check its"
                " forward: it must map (B, C, H, W) images to (B, gh, gw) heatmaps; build a given `module` with the"
                " same `grid_size`."
            )
        return heatmaps

    def random_heatmaps(self, batch_size: int, device: torch.device) -> Tensor:
        """``(B, gh, gw)`` i.i.d. uniform scores from the batch's generator: their top-k are uniform random cells."""
        scores = self._generator.random((batch_size, *self.grid_size), dtype=np.float32)
        return torch.from_numpy(scores).to(device)

    @override
    def mix(self, images: Tensor, targets: Tensor, num_classes: int, batch: Any) -> MixResult:
        if self.teacher.is_random:
            heatmaps = self.random_heatmaps(images.shape[0], images.device)
        elif self.heatmap_cache is None:
            heatmaps = self.heatmaps(images)
        else:
            heatmaps = self.cached_heatmaps(batch, images.shape[0])
        permutation = self.draw_permutation(images.shape[0], images.device)
        partner_heatmaps = heatmaps.index_select(0, permutation)
        ranking = -partner_heatmaps if self.teacher.coldest else partner_heatmaps
        mixed, lam, cells, mask = AF._paste_topk_cells(images, ranking, self.top_k, permutation)
        soft = self.soft_targets(targets, lam, permutation, num_classes)
        if self.teacher.is_random:  # random scores are no attention: the mask alone, measured by a monitor's teacher
            return MixResult(mixed, soft, lam, permutation, mask, cell_indices=cells)
        return MixResult(mixed, soft, lam, permutation, mask, partner_heatmaps, cell_indices=cells)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = self.heatmap_cache
        if config is None or self._attention is None:
            return
        size: Any = config.input_size
        if size is None:  # the teacher's input size (or else the images'), scaled like the grid
            reference = trainer.datamodule.train_reference_dataset  # type: ignore[attr-defined]
            size = getattr(self._attention, "input_size", None) or reference()[0][0].shape[-2:]
            sides = zip(size, self.cache_grid_size, self.grid_size, strict=True)
            size = tuple(round(side * fine / coarse) for side, fine, coarse in sides)
        model = regrid_attention_model(self._attention, self.cache_grid_size, size)  # type: ignore[arg-type]
        self._cache = cache_for_trainer(
            trainer,
            model,
            grid_size=self.cache_grid_size,
            path=config.path,
            batch_size=config.batch_size,
            previous=self._cache,
            owner=type(self).__name__,
        )

    def cached_heatmaps(self, batch: Any, batch_size: int) -> Tensor:
        """``(B, gh, gw)`` heatmaps of an augmented batch, warped from the cache by the batch's geometry."""
        if self._cache is None or self.heatmap_cache is None:
            raise MisconfigurationException(
                f"{type(self).__name__}(heatmap_cache=...) has no cache yet: it is filled in `on_fit_start`."
            )
        geometry = batch_geometry(batch, self.heatmap_cache.geometry_key, batch_size, type(self).__name__)
        return self._cache.warp(geometry, self.grid_size)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Free the teacher's memory after fit; the next fit's setup builds it again.
        if stage == "fit" and self.teacher.module is None:
            self._attention = None


def _check_methods(methods: Any, num_classes: Optional[int]) -> list[MixingCallback]:
    """``methods`` as a list of plain, distinct mixing callbacks that leave the governed arguments alone."""
    if not isinstance(methods, (list, tuple)) or not all(isinstance(m, MixingCallback) for m in methods):
        got = [type(m).__name__ for m in methods] if isinstance(methods, (list, tuple)) else type(methods).__name__
        raise TypeError(
            f"Expected `methods` to be a list of mixing callbacks (e.g. [CutMix(), MixUp()]), but got {got}."
        )
    if not methods:
        raise ValueError("Expected `methods` to hold at least one mixing callback, but got an empty list.")
    for i, method in enumerate(methods):
        name = f"methods[{i}] ({type(method).__name__})"
        if isinstance(method, RandomMixing):
            raise ValueError(
                f"Expected `methods` to hold no RandomMixing, but got one at {name}: list all the methods in one"
                " RandomMixing with their `weights`."
            )
        if any(method is other for other in methods[:i]):
            raise ValueError(f"Expected `methods` to hold distinct callbacks, but {name} is listed twice.")
        # RandomMixing decides these for all its methods; a method may repeat its `num_classes`.
        governed = {**_BASE_DEFAULTS, "num_classes": num_classes if method.num_classes is not None else None}
        for arg, default in governed.items():
            if getattr(method, arg) != default:
                raise ValueError(
                    f"Expected {name} to leave `{arg}` at {default!r}, but got {getattr(method, arg)!r}:"
                    f" RandomMixing decides it for all its methods. Set `{arg}` on RandomMixing instead."
                )
    return list(methods)


def _method_names(methods: Sequence[MixingCallback]) -> tuple[str, ...]:
    """Metric names: the class in lower case (``attentive_cutmix``, ``random_cells``), repeats numbered (``cutmix_1``)."""
    bases = [
        ("random_cells" if m.teacher.is_random else "attentive_cutmix")
        if isinstance(m, AttentiveCutMix)
        else type(m).__name__.lower()
        for m in methods
    ]
    return tuple(f"{base}_{bases[:i].count(base)}" if base in bases[:i] else base for i, base in enumerate(bases))


class RandomMixing(MixingCallback):
    """Mix each batch with one of several methods, picked at random per batch (like timm's ``Mixup`` with
    ``switch_prob`` or torchvision's ``RandomChoice``), from the batch's generator.

    The methods belong to this callback: do not add them to the Trainer, and set the :class:`MixingCallback`
    arguments here, not on them. It also logs ``{log_prefix}/picked/<name>``, each method's share of the
    epoch's mixed images.

    Args:
        methods: the mixing callbacks to pick from, e.g. ``[CutMix(alpha=1.0), MixUp(alpha=0.8)]``.
        weights: relative probability of each method (normalised); ``None`` picks them equally often.
        **kwargs: see :class:`MixingCallback`.

    Example::

        >>> mixing = RandomMixing([CutMix(alpha=1.0), MixUp(alpha=0.8)], weights=[0.5, 0.5], label_smoothing=0.1)
        >>> mixing.names, mixing.probabilities
        (('cutmix', 'mixup'), (0.5, 0.5))
    """

    def __init__(self, methods: list[MixingCallback], weights: Optional[list[float]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.methods = _check_methods(methods, self.num_classes)
        count = len(self.methods)
        weights = [1.0] * count if weights is None else weights
        if not isinstance(weights, (list, tuple)) or len(weights) != count:
            raise ValueError(
                f"Expected `weights` to be a list of {count} numbers, one per method, but got {weights!r}."
            )
        if not all(V.is_real(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"Expected `weights` to be finite numbers >= 0 with a positive sum, but got {weights!r}.")
        self.weights = [float(w) for w in weights]
        #: the probability of picking each method (the normalised weights)
        self.probabilities = tuple(w / sum(self.weights) for w in self.weights)
        #: the name of each method in the logged ``{log_prefix}/picked/<name>``
        self.names = _method_names(self.methods)
        self._epoch_means = _EpochMeans((*self._epoch_means.names, *(f"picked/{name}" for name in self.names)))

    @override
    def state_key_arguments(self) -> dict[str, Any]:
        methods = [(type(m).__name__, m.state_key_arguments()) for m in self.methods]
        return {**super().state_key_arguments(), "methods": methods, "weights": self.weights}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        listed = [type(m).__name__ for m in self.methods if any(m is cb for cb in trainer.callbacks)]  # type: ignore[attr-defined]
        if listed:
            raise MisconfigurationException(
                f"RandomMixing mixes with its methods itself, but {', '.join(listed)} is also in the Trainer's"
                " callbacks, so it would mix the batches again. Remove it from `Trainer(callbacks=[...])`."
            )
        for method in self.methods:  # builds an Attentive CutMix teacher
            method.setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for method in self.methods:  # fills an Attentive CutMix heatmap cache
            method.on_fit_start(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for method in self.methods:
            method.teardown(trainer, pl_module, stage)

    @override
    def mix(self, images: Tensor, targets: Tensor, num_classes: int, batch: Any) -> MixResult:
        picked = int(self._generator.choice(len(self.methods), p=self.probabilities))
        method = self.methods[picked]
        method._generator = self._generator
        result = method.mix(images, targets, num_classes, batch)
        if self.label_smoothing > 0:  # the methods have none: smoothing the mixed targets smooths both sides
            result.soft_targets = AF._probabilities(result.soft_targets, num_classes, self.label_smoothing)
        size = images.shape[0]
        for index, name in enumerate(self.names):
            self._epoch_means.add(f"picked/{name}", float(size if index == picked else 0), size)
        return result
