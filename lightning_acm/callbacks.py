"""Lightning callbacks that mix training batches: Attentive CutMix, CutMix and Mixup.

Each callback replaces, in ``on_train_batch_start``, the images and targets of the batch
*in place* (Lightning passes the same list or dict to ``training_step``), so an existing
``LightningModule`` needs only a loss that takes soft targets
(:class:`~lightning_acm.loss.SoftTargetLossMixin`).

Example::

    >>> import lightning as L
    >>> from lightning_acm import CutMix
    >>> trainer = L.Trainer(callbacks=[CutMix(alpha=1.0, seed=0)], accelerator="cpu", logger=False)

Randomness: each batch is mixed with a ``numpy.random.Generator`` built for it from
``SeedSequence([seed, global rank, epoch, batch index])``. Ranks therefore mix differently, a rerun with the
same seed mixes identically, and a run resumed from a checkpoint continues exactly as the
uninterrupted run would (the seed is part of the callback's ``state_dict``).
"""

from __future__ import annotations

import copy
import numbers
from collections import deque
from collections.abc import MutableMapping, MutableSequence, Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_acm import functional as AF
from lightning_acm.cache import (
    HeatmapCache,
    batch_geometry,
    cache_for_trainer,
    reference_datamodule,
    regrid_attention_model,
)
from lightning_acm.loss import SoftTargetLossMixin
from lightning_acm.validation import check_class_indices, check_label_range, check_real, check_size2, check_targets

__all__ = ["AttentiveCutMix", "CutMix", "MixResult", "MixingCallback", "MixUp"]


def batch_generator(*keys: int) -> np.random.Generator:
    """The numpy generator of one batch, seeded by ``SeedSequence(keys)``: every key counts, order included."""
    return np.random.default_rng(np.random.SeedSequence([int(key) & ((1 << 64) - 1) for key in keys]))


class MixResult:
    """What one mixed batch is made of.

    Attributes:
        mixed: ``(B, C, H, W)`` mixed images.
        soft_targets: ``(B, K)`` mixed label distributions.
        lam: ``(B,)`` fraction of each mixed image taken from its partner.
        permutation: ``(B,)`` partner index of each sample.
        partner_heatmaps: ``(B, gh, gw)`` attention of each partner, when a teacher ran.
        cell_indices: ``(B, k)`` row-major grid cells pasted into each sample (Attentive CutMix).
        boxes: ``(B, 4)`` int64 ``(top, bottom, left, right)`` pixel bounds of the box pasted into
            each sample, bottom and right exclusive (CutMix).
        source: ``(B, C, H, W)`` images before mixing (the batch's own tensor, not a copy).
        source_targets: the targets before mixing (the batch's own tensor).

    ``mask`` is the ``(B, 1, H, W)`` pasted region (``None`` for Mixup); when the result holds
    ``cell_indices`` or ``boxes`` it is built from them the first time it is read.

    Example::

        >>> images = torch.rand(2, 3, 4, 4)
        >>> result = MixResult(images, torch.eye(2), torch.full((2,), 0.25), torch.tensor([1, 0]),
        ...                    partner_heatmaps=torch.rand(2, 2, 2), cell_indices=torch.tensor([[0], [3]]))
        >>> result.mask[1, 0].int()
        tensor([[0, 0, 0, 0],
                [0, 0, 0, 0],
                [0, 0, 1, 1],
                [0, 0, 1, 1]], dtype=torch.int32)
    """

    def __init__(
        self,
        mixed: Tensor,
        soft_targets: Tensor,
        lam: Tensor,
        permutation: Tensor,
        mask: Optional[Tensor] = None,
        partner_heatmaps: Optional[Tensor] = None,
        *,
        cell_indices: Optional[Tensor] = None,
        boxes: Optional[Tensor] = None,
        source: Optional[Tensor] = None,
        source_targets: Optional[Tensor] = None,
    ) -> None:
        if cell_indices is not None and partner_heatmaps is None:
            raise ValueError("`cell_indices` need the `partner_heatmaps` whose grid they index.")
        self.mixed = mixed
        self.soft_targets = soft_targets
        self.lam = lam
        self.permutation = permutation
        self.partner_heatmaps = partner_heatmaps
        self.cell_indices = cell_indices
        self.boxes = boxes
        self.source = source
        self.source_targets = source_targets
        self._mask = mask

    @property
    def mask(self) -> Optional[Tensor]:
        """``(B, 1, H, W)`` bool pasted region, or ``None`` for Mixup."""
        if self._mask is None:
            image_size = (self.mixed.shape[-2], self.mixed.shape[-1])
            if self.cell_indices is not None and self.partner_heatmaps is not None:
                grid = (self.partner_heatmaps.shape[-2], self.partner_heatmaps.shape[-1])
                self._mask = AF._cell_mask(self.cell_indices, grid, image_size)
            elif self.boxes is not None:
                self._mask = AF._box_mask(self.boxes, image_size)
        return self._mask

    @property
    def has_region(self) -> bool:
        """Whether a region of the partner was pasted (CutMix, Attentive CutMix) rather than blended in (Mixup)."""
        return self.cell_indices is not None or self.boxes is not None or self._mask is not None

    def __repr__(self) -> str:
        kind = "cells" if self.cell_indices is not None else "box" if self.has_region else "blend"
        return f"{type(self).__name__}(batch={self.mixed.shape[0]}, region={kind}, mean_lam={float(self.lam.mean()):.3f})"

    def pasted_attention(self) -> Optional[Tensor]:
        """``(B,)`` share of each partner's attention mass that reaches the mixed image, or ``None``.

        For a pasted region it is :func:`~lightning_acm.functional.pasted_attention_share` (needs
        ``partner_heatmaps``). For Mixup
        (no region) every pixel of the partner enters with weight ``lam``, so the share is ``lam``
        whatever the heatmap, and no teacher is needed.
        """
        if not self.has_region:
            return self.lam
        if self.partner_heatmaps is None:
            return None
        return AF.pasted_attention_share(self.partner_heatmaps, self.mask)  # type: ignore[arg-type]


def _is_int(value: Any) -> bool:
    """An integer, Python's or numpy's, but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A real number, Python's or numpy's, but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_probability(p: float) -> None:
    if not _is_real(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"Expected `p` (the probability that a batch is mixed) to be in [0, 1], but got {p!r}.")


def _check_optional_nonnegative(value: Optional[int], name: str) -> None:
    if value is not None and (not _is_int(value) or value < 0):
        raise ValueError(f"Expected `{name}` to be None or an int >= 0, but got {value!r}.")


def _check_optional_size(value: Optional[int], name: str) -> None:
    if value is not None and (not _is_int(value) or value < 1):
        raise ValueError(f"Expected `{name}` to be None or a positive int, but got {value!r}.")


def _plain_size(value: Any) -> Any:
    """A size (an int or a pair) with numpy integers made Python ints, for ``functional._pair``."""
    if _is_int(value):
        return int(value)
    if isinstance(value, (tuple, list)):
        return type(value)(int(v) if _is_int(v) else v for v in value)
    return value


def _check_key(key: Optional[Union[int, str]], name: str) -> None:
    if key is not None and not _is_int(key) and not isinstance(key, str):
        raise TypeError(
            f"Expected `{name}` to be None, an int (a position in a list batch) or a str (a key of a dict batch),"
            f" but got {key!r}."
        )


def _input_normalization(
    trainer: pl.Trainer, owner: str, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
) -> tuple[Sequence[float], Sequence[float]]:
    if mean is not None and std is not None:
        return mean, std
    datamodule = getattr(trainer, "datamodule", None)
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if mean is not None and std is not None:
        return tuple(mean), tuple(std)
    rank_zero_warn(
        f"{owner}: the training images' normalisation is unknown (no `input_mean`/`input_std` and no"
        " `datamodule.mean`/`std`), so they are taken to be in [0, 1] (integer images, e.g. uint8, are scaled by"
        " 1/255 first). Pass `input_mean=` and `input_std=` if your images are normalised, or the teacher sees"
        " wrongly scaled images."
    )
    return (0.0,), (1.0,)


def frozen_attention_model(
    trainer: pl.Trainer,
    *,
    owner: str,
    attention: str,
    attention_weights: Optional[str],
    attention_layer: Optional[str],
    attention_input_size: Optional[int],
    grid_size: tuple[int, int],
    reduction: Literal["mean", "max"],
    attention_precision: Optional[Literal["bf16", "fp16"]] = None,
    attention_model: Optional[nn.Module] = None,
    input_mean: Optional[Sequence[float]] = None,
    input_std: Optional[Sequence[float]] = None,
    attention_channels_last: bool = False,
    attention_compile: Union[bool, dict[str, Any]] = False,
) -> nn.Module:
    """The frozen teacher of a callback (``owner`` names it in messages), on the training device.

    A given ``attention_model`` is copied (``copy.deepcopy``) and the copy is frozen, so the
    module passed in is never changed: it may be shared with the student (e.g. its backbone),
    which keeps training; the teacher is a frozen snapshot of it taken here. A ready
    :class:`~lightning_acm.attention.AttentionModel` is used as it is, but for the
    ``input_mean``/``input_std``, ``attention_precision``, ``attention_channels_last`` and
    ``attention_compile`` given explicitly; a plain module is tapped at ``attention_layer``; otherwise the model is built from
    ``attention``. The input normalisation is taken from ``trainer.datamodule.mean``/``std`` when
    not given.
    """
    from lightning_acm.attention import AttentionModel, attention_model_from_module, build_attention_model

    if attention_model is not None:
        attention_model = copy.deepcopy(attention_model)
    if isinstance(attention_model, AttentionModel):
        # A ready AttentionModel carries its own normalisation; explicit callback arguments win.
        if input_mean is not None and input_std is not None:
            attention_model.set_input_normalization(input_mean, input_std)
        if attention_precision is not None:
            attention_model.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[attention_precision]
        if attention_channels_last:
            attention_model.use_channels_last()
        model: nn.Module = attention_model
    else:
        if attention_model is not None and attention_layer is None:
            raise MisconfigurationException(
                f"{owner}: `attention_model` is a plain nn.Module, so `attention_layer` must name"
                " the layer whose output gives the heatmap (e.g. 'layer4')."
            )
        mean, std = _input_normalization(trainer, owner, input_mean, input_std)
        common: dict[str, Any] = {
            "grid_size": grid_size,
            "reduction": reduction,
            "amp_dtype": attention_precision,
            "channels_last": attention_channels_last,
            "input_mean": mean,
            "input_std": std,
        }
        if attention_input_size is not None:
            common["input_size"] = attention_input_size
        if attention_model is not None:
            model = attention_model_from_module(attention_model, str(attention_layer), **common)
        else:
            model = build_attention_model(attention, weights=attention_weights, layer=attention_layer, **common)
    model = model.to(trainer.strategy.root_device).eval().requires_grad_(False)
    if attention_compile is not False and not model.compiled:  # type: ignore[union-attr]
        model.compile_features(**({} if attention_compile is True else attention_compile))  # type: ignore[operator]
    return model


@torch.no_grad()
def run_attention(model: nn.Module, images: Tensor) -> Tensor:
    """Run a frozen attention model on ``images`` under ``no_grad``, moving it to their device first.

    Raises:
        ValueError: if the model does not return one ``(gh, gw)`` heatmap per image.
    """
    first = next(model.parameters(), None)
    if first is not None and first.device != images.device:
        model.to(images.device)
    heatmaps = model(images)
    if not isinstance(heatmaps, Tensor) or heatmaps.ndim != 3 or heatmaps.shape[0] != images.shape[0]:
        got = f"shape {tuple(heatmaps.shape)}" if isinstance(heatmaps, Tensor) else type(heatmaps).__name__
        raise ValueError(
            f"Expected the attention model {type(model).__name__} to return heatmaps of shape"
            f" ({images.shape[0]}, gh, gw), one per image of the batch, but got {got}."
            " Check its forward: it must map (B, C, H, W) images to (B, gh, gw) heatmaps."
        )
    return heatmaps


class _EpochMeans:
    """Means over one epoch of a fixed set of per-image metrics, across all ranks, logged at its end.

    Sums stay on the device as batches come (no host-device sync per step); one ``reduce`` at the
    end of the epoch makes them global, so every rank logs the same keys and values. The key set
    is fixed, so ranks that mixed different batches still take part in the same collective.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.reset()

    def reset(self) -> None:
        self._sums: Optional[Tensor] = None
        self._counts = [0] * len(self.names)

    def add(self, name: str, total: Union[Tensor, float], count: int, device: torch.device) -> None:
        """Count ``total``, the sum of ``count`` values of ``name``."""
        if self._sums is None:
            self._sums = torch.zeros(len(self.names), device=device)
        row = self.names.index(name)
        self._sums[row].add_(total)
        self._counts[row] += count

    def log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str) -> None:
        """Log ``{prefix}/{name}`` for every name with values on some rank; every rank must call it."""
        sums = self._sums if self._sums is not None else torch.zeros(len(self.names), device=pl_module.device)
        counts = torch.tensor(self._counts, dtype=sums.dtype, device=sums.device)
        totals = trainer.strategy.reduce(torch.stack([sums, counts]), reduce_op="sum")
        for name, total, count in zip(self.names, *totals.tolist(), strict=True):
            if count > 0:
                # Already global: sync_dist only averages equal values (and keeps Lightning from warning).
                pl_module.log(f"{prefix}/{name}", total / count, on_step=False, on_epoch=True, sync_dist=True)
        self.reset()


class _LabelRangeCheck:
    """Checks that class-index labels lie in ``[0, num_classes)``, without a host-device sync on a GPU.

    On the CPU (and on accelerators other than CUDA) a batch is checked at once. On CUDA its
    minimum and maximum are copied to pinned host memory without waiting and read once the copy
    has landed: at a later batch, or at the latest at the end of the epoch (:meth:`flush`, one
    wait per epoch). A bad label then raises a few batches late, naming its batch; until then the
    labels are clamped into range, so that the scatters building the soft targets stay in bounds
    (an out-of-range index there would be an unrecoverable CUDA device-side assert instead).
    """

    def __init__(self) -> None:
        self._pending: deque[tuple[Tensor, Any, int, str]] = deque()

    def __call__(self, targets: Tensor, num_classes: int, where: str) -> Tensor:
        """Check ``targets`` (or queue the check); returns the labels to build soft targets from."""
        if targets.ndim != 1 or targets.numel() == 0:
            return targets  # probabilities
        if targets.device.type != "cuda":
            check_class_indices(targets, num_classes, where)
            return targets
        self.poll()
        # non_blocking to the CPU lands in pinned memory; the event says when it has.
        bounds = torch.stack(torch.aminmax(targets)).to("cpu", non_blocking=True)
        landed = torch.cuda.Event()
        landed.record(torch.cuda.current_stream(targets.device))
        self._pending.append((bounds, landed, num_classes, where))
        return targets.clamp(0, num_classes - 1)

    def poll(self, wait: bool = False) -> None:
        """Check the queued batches whose bounds have landed (all of them, waiting, with ``wait``)."""
        while self._pending:
            bounds, landed, num_classes, where = self._pending[0]
            if not wait and not landed.query():
                return
            landed.synchronize()
            self._pending.popleft()
            low, high = bounds.tolist()
            check_label_range(low, high, num_classes, where)

    def flush(self) -> None:
        """Check every queued batch now (end of the epoch)."""
        self.poll(wait=True)

    def clear(self) -> None:
        self._pending.clear()


class MixingCallback(Callback):
    """Base of the mixing callbacks: when to mix, where the batch lives, seeding, logging.

    Subclasses implement :meth:`mix`. The batch must be a mutable ``list`` (``[images, targets,
    ...]``, what ``DataLoader``'s default collate gives for ``(image, target)`` samples; other
    positions with integer ``image_key``/``target_key``) or a ``dict`` with ``image_key`` and
    ``target_key``.

    Several mixing callbacks on one Trainer run in their order on each batch: the second mixes
    the batch (and the soft targets) that the first made.

    Args:
        p: probability that a batch is mixed (per batch, drawn from the callback's generator).
        num_classes: number of classes; taken from ``trainer.datamodule.num_classes`` or the
            LightningModule's ``num_classes`` (attribute or hyperparameter) when ``None``.
        seed: base seed of the mixing; ``None`` takes ``torch.initial_seed()`` at the setup of
            each fit, so ``lightning.seed_everything`` makes the mixing reproducible (a fit resumed
            from a checkpoint restores the seed saved there).
        label_smoothing: smoothing folded into the targets of every batch, mixed or not, also
            after ``stop_after_step``/``stop_after_epoch`` (do not also smooth in the loss: a
            :class:`~lightning_acm.loss.SoftTargetLossMixin` module with its own
            ``label_smoothing > 0`` gets a warning).
        stop_after_step: stop mixing once ``trainer.global_step`` reaches this value (targets are
            still checked and smoothed).
        stop_after_epoch: stop mixing from this epoch on (0-based).
        image_key: where the images are: a position in a list batch (int) or a key of a dict
            batch (str); ``None`` means ``0`` in a list batch and ``"image"`` in a dict batch.
        target_key: where the targets are, as ``image_key``; ``None`` means ``1`` or ``"target"``.
        log_prefix: prefix of the logged metrics ``{prefix}/lam``, ``{prefix}/mixed`` and
            ``{prefix}/pasted_attention`` (see :meth:`MixResult.pasted_attention`; logged when
            the method has heatmaps or is Mixup, and for CutMix by
            :class:`~lightning_acm.visualize.PastedAttentionMonitor`). They are epoch means over
            the images of all ranks, summed on the device as batches come and reduced once at
            the end of the epoch (no sync per step).

    Class-index labels are checked to lie in ``[0, num_classes)`` on every batch, mixed or not:
    on the CPU at once; on CUDA without a host-device sync, so a bad label raises a few batches
    late (at the end of the epoch at the latest), naming its batch.

    Integer arguments accept numpy integers, and ``p``/``label_smoothing`` numpy floats.

    Raises:
        ValueError: for an argument out of range.
        TypeError: for an ``image_key``/``target_key`` that is neither an int nor a str.
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
        _check_probability(p)
        if num_classes is not None and (not _is_int(num_classes) or num_classes < 2):
            raise ValueError(f"Expected `num_classes` to be None or an int >= 2, but got {num_classes!r}.")
        if seed is not None and not _is_int(seed):
            raise ValueError(f"Expected `seed` to be None or an int, but got {seed!r}.")
        if not _is_real(label_smoothing) or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"Expected `label_smoothing` to be in [0, 1), but got {label_smoothing!r}.")
        _check_optional_nonnegative(stop_after_step, "stop_after_step")
        _check_optional_nonnegative(stop_after_epoch, "stop_after_epoch")
        _check_key(image_key, "image_key")
        _check_key(target_key, "target_key")
        if image_key is not None and image_key == target_key:
            raise ValueError(f"Expected `image_key` and `target_key` to differ, but both are {image_key!r}.")
        self.p = float(p)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.seed = None if seed is None else int(seed)
        self.label_smoothing = float(label_smoothing)
        self.stop_after_step = None if stop_after_step is None else int(stop_after_step)
        self.stop_after_epoch = None if stop_after_epoch is None else int(stop_after_epoch)
        self.image_key = int(image_key) if _is_int(image_key) else image_key
        self.target_key = int(target_key) if _is_int(target_key) else target_key
        self.log_prefix = log_prefix

        self._num_classes: Optional[int] = self.num_classes
        self._seed: Optional[int] = self.seed
        self._rank: int = 0
        self._generator = batch_generator(seed or 0)  # rebuilt for every batch in on_train_batch_start
        self._batches_seen = 0
        self._batches_mixed = 0
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
        """The arguments that make up :attr:`state_key` (subclasses add theirs)."""
        return {
            "p": self.p,
            "num_classes": self.num_classes,
            "label_smoothing": self.label_smoothing,
            "stop_after_step": self.stop_after_step,
            "stop_after_epoch": self.stop_after_epoch,
            "image_key": self.image_key,
            "target_key": self.target_key,
            "log_prefix": self.log_prefix,
        }

    @property
    def last_mix(self) -> Optional[MixResult]:
        """The :class:`MixResult` of the current training batch (``None`` when it was not mixed).

        It holds the unmixed batch in ``source`` (no copy: the batch's own tensors, kept until the
        next batch) for :class:`~lightning_acm.visualize.MixVisualizer` and
        :class:`~lightning_acm.visualize.PastedAttentionMonitor`, which read it and change nothing.
        """
        return self._last_mix

    @property
    def batches_seen(self) -> int:
        """Training batches this callback has seen on this rank."""
        return self._batches_seen

    @property
    def batches_mixed(self) -> int:
        """Training batches this callback has mixed on this rank."""
        return self._batches_mixed

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._num_classes = self._resolve_num_classes(trainer, pl_module)
        # Taken anew for every fit; a resumed fit then restores the saved seed in `load_state_dict`.
        self._seed = self.seed if self.seed is not None else torch.initial_seed() & ((1 << 63) - 1)
        self._rank = trainer.global_rank
        if self.label_smoothing > 0 and isinstance(pl_module, SoftTargetLossMixin) and pl_module.label_smoothing > 0:
            rank_zero_warn(
                f"{type(self).__name__}(label_smoothing={self.label_smoothing}) smooths the targets and"
                f" {type(pl_module).__name__}(label_smoothing={pl_module.label_smoothing}) smooths them again in"
                " its loss. Set one of the two to 0."
            )

    def _resolve_num_classes(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        if self.num_classes is not None:
            return self.num_classes
        candidates = [
            getattr(getattr(trainer, "datamodule", None), "num_classes", None),
            getattr(pl_module, "num_classes", None),
            getattr(getattr(pl_module, "hparams", {}), "get", lambda _k: None)("num_classes"),
        ]
        for found in candidates:
            if _is_int(found) and found >= 2:
                return int(found)
        raise MisconfigurationException(
            f"{type(self).__name__} needs the number of classes to build soft targets, but `num_classes` is None and"
            " neither the datamodule nor the LightningModule has a `num_classes` attribute."
            f" Pass `{type(self).__name__}(num_classes=K)`."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._seed, "batches_seen": self._batches_seen, "batches_mixed": self._batches_mixed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._seed = state_dict["seed"]
        self._batches_seen = state_dict["batches_seen"]
        self._batches_mixed = state_dict["batches_mixed"]

    # ------------------------------------------------------------------ the batch

    def is_active(self, trainer: pl.Trainer) -> bool:
        """Whether mixing is still on (``stop_after_step`` / ``stop_after_epoch`` not reached)."""
        if self.stop_after_step is not None and trainer.global_step >= self.stop_after_step:
            return False
        if self.stop_after_epoch is not None and trainer.current_epoch >= self.stop_after_epoch:
            return False
        return True

    def _locate(self, batch: Any) -> tuple[Union[int, str], Union[int, str]]:
        if isinstance(batch, MutableMapping):
            image_key = "image" if self.image_key is None else self.image_key
            target_key = "target" if self.target_key is None else self.target_key
            for key, name in ((image_key, "image_key"), (target_key, "target_key")):
                if key not in batch:
                    raise KeyError(
                        f"{type(self).__name__}: the dict batch has no key {key!r} (`{name}`); its keys are"
                        f" {sorted(map(str, batch))}. Pass `{name}=...` with the right key."
                    )
            return image_key, target_key
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):
            raise TypeError(
                f"{type(self).__name__} mixes the batch in place, but the batch is a namedtuple"
                f" {type(batch).__name__}, which cannot be changed. Collate it into a dict that keeps the field names"
                " (e.g. `collate_fn=lambda s: default_collate(s)._asdict()`) and pass `image_key=` and `target_key=`"
                f" with the fields of the images and targets (of {', '.join(map(repr, batch._fields))})."
            )
        if isinstance(batch, tuple):
            raise TypeError(
                f"{type(self).__name__} mixes the batch in place, but the batch is a tuple, which cannot be changed."
                " Return a list from your collate_fn (e.g. `collate_fn=lambda s: list(default_collate(s))`)"
                " or make the dataset return (image, target) samples, which the default collate turns into a list."
            )
        if isinstance(batch, MutableSequence) and len(batch) >= 2:
            image_key = 0 if self.image_key is None else self.image_key
            target_key = 1 if self.target_key is None else self.target_key
            for key, name in ((image_key, "image_key"), (target_key, "target_key")):
                if isinstance(key, str):
                    raise ValueError(
                        f"Expected `{name}` to be an int (a position) for a list batch, but got {key!r}, a key of"
                        f" a dict batch. Pass `{name}=` with the position in the list, or None for the default."
                    )
                if not -len(batch) <= key < len(batch):
                    raise ValueError(
                        f"Expected `{name}` to be a position in the list batch of length {len(batch)}, but got {key}."
                    )
            return image_key, target_key
        raise TypeError(
            f"{type(self).__name__} expects a batch list [images, targets, ...] or a dict with `image_key` and"
            f" `target_key`, but got {type(batch).__name__}"
            f"{f' of length {len(batch)}' if isinstance(batch, Sequence) else ''}."
            " Make the dataset return (image, target) samples, or collate batches into such a list or dict."
        )

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._last_mix = None  # frees the previous batch before this one is mixed
        image_slot, target_slot = self._locate(batch)
        images, targets = batch[image_slot], batch[target_slot]  # type: ignore[index]
        if not isinstance(images, Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(
                f"{type(self).__name__} expects images of shape (B, C, H, W), but got {shape}. Make the dataset"
                " return (C, H, W) image tensors (not flattened), or point `image_key` at the images of a dict batch."
            )
        num_classes = self._num_classes
        if num_classes is None:
            raise MisconfigurationException(f"{type(self).__name__} was not set up: call it through a Trainer.")

        self._generator = batch_generator(self._seed or 0, self._rank, trainer.current_epoch, batch_idx)
        self._batches_seen += 1
        mix_now = self.p > 0 and self._generator.random() < self.p
        # Only the mixing stops: the targets are still checked and smoothed below.
        mix_now = mix_now and self.is_active(trainer)
        if mix_now and images.shape[0] < 2:
            if not self._warned_single:
                what = "a batch of one sample has no partner" if images.shape[0] else "an empty batch has no sample"
                rank_zero_warn(
                    f"{type(self).__name__}: {what} to mix with; it is left unmixed."
                    " Use `drop_last=True` in the training DataLoader to avoid a short last batch."
                )
                self._warned_single = True
            mix_now = False

        where = f" (training batch {batch_idx} of epoch {trainer.current_epoch})"
        checked = self._label_check(check_targets(targets, num_classes, images.shape[0]), num_classes, where)
        if not mix_now:
            if self.label_smoothing > 0:
                batch[target_slot] = AF._probabilities(checked, num_classes, self.label_smoothing)  # type: ignore[index]
            self._epoch_means.add("mixed", 0.0, images.shape[0], images.device)
            return

        result = self.mix(images, checked, num_classes, batch)
        batch[image_slot] = result.mixed  # type: ignore[index]
        batch[target_slot] = result.soft_targets  # type: ignore[index]
        result.source, result.source_targets = images, targets
        self._last_mix = result
        self._batches_mixed += 1
        size = images.shape[0]
        self._epoch_means.add("mixed", float(size), size, images.device)
        self._epoch_means.add("lam", result.lam.sum(), size, images.device)
        share = result.pasted_attention()
        if share is not None:
            self.record_pasted_attention(share)

    def record_pasted_attention(self, share: Tensor) -> None:
        """Count ``(B,)`` pasted-attention shares of this epoch's batches into ``{log_prefix}/pasted_attention``."""
        self._epoch_means.add("pasted_attention", share.sum(), share.shape[0], share.device)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_means.reset()
        self._label_check.clear()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._label_check.flush()
        self._epoch_means.log(trainer, pl_module, self.log_prefix)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._label_check.flush()  # whatever ended the fit, no queued check is left unread

    def draw_permutation(self, batch_size: int, device: torch.device) -> Tensor:
        """The pairing for the current batch, from the callback's generator."""
        return AF.pairing_permutation(batch_size, generator=self._generator, device=device)

    def mix(self, images: Tensor, targets: Tensor, num_classes: int, batch: Any) -> MixResult:
        """Mix one batch: ``(B, C, H, W)`` images, ``(B,)`` or ``(B, K)`` targets.

        Class-index ``targets`` were range-checked already (on a GPU without a sync, reporting
        a few batches late; see :meth:`soft_targets`). ``batch`` is the whole batch as it
        arrived (for extra fields such as augmentation geometry); implementations must not
        modify it.
        """
        raise NotImplementedError

    def soft_targets(self, targets: Tensor, lam: Tensor, permutation: Tensor, num_classes: int) -> Tensor:
        """:func:`~lightning_acm.functional.mix_targets` with the callback's label smoothing, for
        the ``targets`` given to :meth:`mix` (their range is not checked again: no host-device sync)."""
        return AF._mix_targets(targets, lam, permutation, num_classes, self.label_smoothing)


class _BetaMixingCallback(MixingCallback):
    """A mixing callback whose amount is drawn from ``Beta(alpha, alpha)``."""

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.alpha = check_real(alpha, "alpha", low=0.0, low_open=True, what="the Beta(alpha, alpha) parameter")

    @override
    def state_key_arguments(self) -> dict[str, Any]:
        return {**super().state_key_arguments(), "alpha": self.alpha}


class CutMix(_BetaMixingCallback):
    """CutMix (Yun et al., 2019): paste a random box of the partner, box area ~ ``Beta(alpha, alpha)``.

    Args:
        alpha: Beta parameter of the box area; ``1.0`` draws it uniformly.
        **kwargs: see :class:`MixingCallback` (``p``, ``num_classes``, ``seed``, ...).

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[CutMix(alpha=1.0, p=0.5, seed=0)], accelerator="cpu", logger=False)
    """

    @override
    def mix(self, images: Tensor, targets: Tensor, num_classes: int, batch: Any) -> MixResult:
        permutation = self.draw_permutation(images.shape[0], images.device)
        mixed, lam, boxes = AF._cutmix_paste(images, permutation, self.alpha, self._generator)
        soft = self.soft_targets(targets, lam, permutation, num_classes)
        return MixResult(mixed, soft, lam, permutation, boxes=boxes)


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

    A frozen attention model (see :mod:`lightning_acm.attention`) is built in ``setup()`` on the
    training device, kept on this callback (never a submodule of the LightningModule, so it is
    neither optimized nor checkpointed) and run under ``torch.no_grad()`` on each batch that is
    mixed; batches that ``p`` leaves unmixed skip it.

    Args:
        top_k: cells pasted (6 of a 7x7 grid in the paper).
        grid_size: cells per side of the heatmap grid (int or ``(gh, gw)``).
        attention: attention source: a preset (``"efficientnet_lite0"``, the offline default;
            ``"paper"`` = ResNet-152), a torchvision model name, or an architecture name for
            a local ``attention_weights`` file.
        attention_weights: torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V2"``) or the path
            of a local state_dict / checkpoint.
        attention_layer: layer (or method) of the teacher to tap; the preset's when ``None``.
        attention_input_size: teacher input size (224 by default for the presets).
        reduction: channel reduction of the tapped features, ``"mean"`` (paper) or ``"max"``.
        attention_precision: run the teacher under autocast (``"bf16"`` or ``"fp16"``), or in fp32
            (``None``; a given :class:`~lightning_acm.attention.AttentionModel` then keeps its ``amp_dtype``).
        attention_channels_last: run the teacher in ``torch.channels_last`` memory format (faster
            convolutions on GPUs, with ``attention_precision`` above all); ``False`` leaves a given
            :class:`~lightning_acm.attention.AttentionModel` as it is.
        attention_compile: run the teacher up to its tapped layer through ``torch.compile``
            (``True``, or a dict of ``torch.compile`` arguments such as ``{"mode": "max-autotune"}``);
            the first batch pays the compilation. See
            :meth:`~lightning_acm.attention.AttentionModel.compile_features`.
        attention_model: a ready ``nn.Module`` to use instead of building one (Python use);
            an :class:`~lightning_acm.attention.AttentionModel` is used as it is (but for
            ``attention_precision`` and ``input_mean``/``input_std`` when given), any other module
            is tapped at ``attention_layer``. The callback freezes a copy made at the first
            ``setup`` and never changes the module given, so it may be the student's own backbone
            (the teacher is then that backbone as it was when the first fit started).
        input_mean: the normalisation the training images carry (to be undone before the teacher);
            taken from ``trainer.datamodule.mean`` when ``None``.
        input_std: as ``input_mean``, from ``trainer.datamodule.std``.
        heatmap_cache: compute each training sample's heatmap once, on its un-augmented image, at
            ``cache_grid_size``, and warp it through the crop and flip that the batch records
            (:mod:`lightning_acm.cache`), instead of running the teacher on every mixed batch. Needs a
            datamodule with ``record_augmentation=True`` and ``train_reference_dataset()``. The cache
            is filled in ``on_fit_start`` (sharded over DDP ranks) and kept on the training device,
            out of the checkpoint and of this callback's ``state_dict``.
        cache_grid_size: cells per side of the cached heatmaps, at least ``grid_size``; ``None`` (the
            default) caches the teacher's own grid at its own input size, which matched heatmaps of
            the augmented images best in ``benchmarks/bench_cache.py`` (a finer grid made by a larger
            input shows the teacher the objects at another scale).
        cache_input_size: teacher input size while filling the cache; ``None`` scales the teacher's
            input size by ``cache_grid_size / grid_size`` (448 px for a 14x14 cache of a 224 px teacher).
        cache_path: a file to load the cache from when it matches the dataset and teacher, and to
            save it to otherwise (rank 0 writes).
        cache_batch_size: teacher batch size while filling the cache.
        geometry_key: key of the geometry in dict batches (list batches carry it at index 2).
        **kwargs: see :class:`MixingCallback`.

    Example::

        >>> import lightning as L, torch
        >>> from lightning_acm.attention import attention_model_from_module
        >>> tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.ReLU())
        >>> callback = AttentiveCutMix(attention_model=tiny, attention_layer="1", attention_input_size=28, seed=0)
        >>> trainer = L.Trainer(callbacks=[callback], accelerator="cpu", logger=False)
    """

    def __init__(
        self,
        *,
        top_k: int = 6,
        grid_size: Union[int, tuple[int, int]] = 7,
        attention: str = "efficientnet_lite0",
        attention_weights: Optional[str] = None,
        attention_layer: Optional[str] = None,
        attention_input_size: Optional[int] = None,
        reduction: Literal["mean", "max"] = "mean",
        attention_precision: Optional[Literal["bf16", "fp16"]] = None,
        attention_channels_last: bool = False,
        attention_compile: Union[bool, dict[str, Any]] = False,
        attention_model: Optional[nn.Module] = None,
        input_mean: Optional[Sequence[float]] = None,
        input_std: Optional[Sequence[float]] = None,
        heatmap_cache: bool = False,
        cache_grid_size: Optional[Union[int, tuple[int, int]]] = None,
        cache_input_size: Optional[int] = None,
        cache_path: Optional[str] = None,
        cache_batch_size: int = 64,
        geometry_key: str = "geometry",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        grid = check_size2(grid_size, "grid_size")
        cells = grid[0] * grid[1]
        if not _is_int(top_k) or not 1 <= top_k <= cells:
            raise ValueError(
                f"Expected `top_k` to be in [1, {cells}] for a {grid[0]}x{grid[1]} grid, but got {top_k!r}."
            )
        if reduction not in ("mean", "max"):
            raise ValueError(f"Expected `reduction` to be one of 'mean', 'max', but got {reduction!r}.")
        if attention_precision not in (None, "bf16", "fp16"):
            raise ValueError(f"Expected `attention_precision` to be None, 'bf16' or 'fp16', but got {attention_precision!r}.")
        if not isinstance(attention_channels_last, bool):
            raise TypeError(f"Expected `attention_channels_last` to be a bool, but got {attention_channels_last!r}.")
        if not (isinstance(attention_compile, bool) or (
            isinstance(attention_compile, dict) and all(isinstance(key, str) for key in attention_compile)
        )):
            raise TypeError(
                "Expected `attention_compile` to be a bool or a dict of torch.compile arguments (e.g."
                f" {{'mode': 'max-autotune'}}), but got {attention_compile!r}."
            )
        _check_optional_size(attention_input_size, "attention_input_size")
        if (input_mean is None) != (input_std is None):
            raise ValueError("Expected `input_mean` and `input_std` to be given together, but got only one of them.")
        if attention_model is not None and not isinstance(attention_model, nn.Module):
            raise TypeError(f"Expected `attention_model` to be an nn.Module, but got {type(attention_model).__name__}.")
        self.top_k = int(top_k)
        self.grid_size = grid
        self.attention = attention
        self.attention_weights = attention_weights
        self.attention_layer = attention_layer
        self.attention_input_size = None if attention_input_size is None else int(attention_input_size)
        self.reduction = reduction
        self.attention_precision = attention_precision
        self.attention_channels_last = attention_channels_last
        self.attention_compile = attention_compile
        self.input_mean = tuple(input_mean) if input_mean is not None else None
        self.input_std = tuple(input_std) if input_std is not None else None
        self._given_model = attention_model
        self._attention: Optional[nn.Module] = None
        # --- heatmap cache (issue 4): all of it is off unless `heatmap_cache=True`.
        cache_grid = grid if cache_grid_size is None else check_size2(cache_grid_size, "cache_grid_size")
        if cache_grid[0] < grid[0] or cache_grid[1] < grid[1]:
            raise ValueError(
                f"Expected `cache_grid_size` to be at least `grid_size` {grid[0]}x{grid[1]}, but got"
                f" {cache_grid[0]}x{cache_grid[1]}."
            )
        _check_optional_size(cache_input_size, "cache_input_size")
        if not _is_int(cache_batch_size) or cache_batch_size < 1:
            raise ValueError(f"Expected `cache_batch_size` to be a positive int, but got {cache_batch_size!r}.")
        self.heatmap_cache = bool(heatmap_cache)
        self.cache_grid_size = cache_grid
        self.cache_input_size = None if cache_input_size is None else int(cache_input_size)
        self.cache_path = cache_path
        self.cache_batch_size = int(cache_batch_size)
        self.geometry_key = geometry_key
        self._cache: Optional[HeatmapCache] = None

    @override
    def state_key_arguments(self) -> dict[str, Any]:
        return {
            **super().state_key_arguments(),
            "top_k": self.top_k,
            "grid_size": self.grid_size,
            "attention": self.attention if self._given_model is None else type(self._given_model).__name__,
            "attention_weights": self.attention_weights,
            "attention_layer": self.attention_layer,
            "attention_input_size": self.attention_input_size,
            "reduction": self.reduction,
            "input_mean": self.input_mean,
            "input_std": self.input_std,
            "heatmap_cache": self.heatmap_cache,
            "cache_grid_size": self.cache_grid_size,
            "cache_input_size": self.cache_input_size,
        }

    @property
    def attention_model(self) -> Optional[nn.Module]:
        """The frozen attention model once built (after ``setup``), else ``None``."""
        return self._attention

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.heatmap_cache:
            reference_datamodule(trainer, type(self).__name__)
        if stage != "fit" or self._attention is not None:
            return
        self._attention = self.build_attention(trainer)

    def build_attention(self, trainer: pl.Trainer) -> nn.Module:
        """Build the frozen attention model on the training device (called by ``setup``)."""
        return frozen_attention_model(
            trainer,
            owner=type(self).__name__,
            attention=self.attention,
            attention_weights=self.attention_weights,
            attention_layer=self.attention_layer,
            attention_input_size=self.attention_input_size,
            grid_size=self.grid_size,
            reduction=self.reduction,
            attention_precision=self.attention_precision,
            attention_model=self._given_model,
            input_mean=self.input_mean,
            input_std=self.input_std,
            attention_channels_last=self.attention_channels_last,
            attention_compile=self.attention_compile,
        )

    def heatmaps(self, images: Tensor) -> Tensor:
        """``(B, gh, gw)`` attention of each image, from the frozen model on the images' device."""
        if self._attention is None:
            raise MisconfigurationException(f"{type(self).__name__} was not set up: call it through a Trainer.")
        return run_attention(self._attention, images)

    @override
    def mix(self, images: Tensor, targets: Tensor, num_classes: int, batch: Any) -> MixResult:
        heatmaps = self.cached_heatmaps(batch, images.shape[0]) if self.heatmap_cache else self.heatmaps(images)
        gh, gw = heatmaps.shape[-2:]
        if (gh, gw) != tuple(self.grid_size):
            raise ValueError(
                f"The attention model returned a {gh}x{gw} grid but `grid_size` is {self.grid_size[0]}x{self.grid_size[1]}."
                " Build the given `attention_model` with the same `grid_size`, or pass the callback its grid."
            )
        permutation = self.draw_permutation(images.shape[0], images.device)
        partner_heatmaps = heatmaps.index_select(0, permutation)
        mixed, lam, cells = AF._paste_topk_cells(images, partner_heatmaps, self.top_k, permutation)
        soft = self.soft_targets(targets, lam, permutation, num_classes)
        return MixResult(mixed, soft, lam, permutation, partner_heatmaps=partner_heatmaps, cell_indices=cells)

    # ------------------------------------------------------------------ heatmap cache (issue 4)

    @property
    def cache(self) -> Optional[HeatmapCache]:
        """The :class:`~lightning_acm.cache.HeatmapCache` once filled (``heatmap_cache=True``), else ``None``."""
        return self._cache

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.heatmap_cache:
            return
        if self._attention is None:
            raise MisconfigurationException(f"{type(self).__name__} was not set up: call it through a Trainer.")
        teacher = regrid_attention_model(self._attention, self.cache_grid_size, self._cache_input_size(trainer))
        self._cache = cache_for_trainer(
            trainer,
            teacher,
            grid_size=self.cache_grid_size,
            path=self.cache_path,
            batch_size=self.cache_batch_size,
            previous=self._cache,
            owner=type(self).__name__,
        )

    def _cache_input_size(self, trainer: pl.Trainer) -> Optional[tuple[int, int]]:
        if self.cache_input_size is not None:
            return (self.cache_input_size, self.cache_input_size)
        size = getattr(self._attention, "input_size", None)
        if size is None:
            size = tuple(trainer.datamodule.train_reference_dataset()[0][0].shape[-2:])  # type: ignore[union-attr]
        return tuple(  # type: ignore[return-value]
            round(side * fine / coarse) for side, fine, coarse in zip(size, self.cache_grid_size, self.grid_size, strict=True)
        )

    def cached_heatmaps(self, batch: Any, batch_size: int) -> Tensor:
        """``(B, gh, gw)`` heatmaps of an augmented batch, warped from the cache by the batch's geometry."""
        if self._cache is None:
            raise MisconfigurationException(
                f"{type(self).__name__}(heatmap_cache=True) has no cache yet: it is filled in `on_fit_start`."
            )
        geometry = batch_geometry(batch, self.geometry_key, batch_size, type(self).__name__)
        return self._cache.warp(geometry, self.grid_size)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Free the teacher's memory after fit; a built-in one is rebuilt by the next fit's setup.
        if stage == "fit" and self._given_model is None:
            self._attention = None

