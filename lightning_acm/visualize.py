"""See what the mixing does: :func:`render_mix_grid` draws mixes (no Lightning), :class:`MixVisualizer` logs
them while training, :class:`PastedAttentionMonitor` measures CutMix's ``pasted_attention``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torchvision.transforms.v2.functional import to_dtype, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid
from typing_extensions import override

from lightning_acm.attention import Teacher, _stats
from lightning_acm.callbacks import AttentiveCutMix, MixingCallback, MixResult, MixUp, RandomMixing, _build_teacher
from lightning_acm.functional import pasted_attention_share
from lightning_acm.validation import check_int, check_real, check_shape, shape_of

__all__ = ["MixVisualizer", "PastedAttentionMonitor", "render_mix_grid"]

_BACKGROUND = 30  # dark grey between the panels and behind the captions
_CAPTION_HEIGHT = 14  # one line of PIL's default font
_MIN_PANEL = 96  # small images are upscaled by an integer factor to at least this


def _unit_images(images: Tensor, name: str, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> Tensor:
    """Float ``(B, 3, H, W)`` in [0, 1] on the CPU: integers scaled as ``ToDtype(scale=True)``, floats un-normalised."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"Expected `{name}` to be a batch (B, C, H, W), but got {shape_of(images)}.")
    if (channels := images.shape[1]) not in (1, 3):
        raise ValueError(f"Expected `{name}` to have 1 or 3 channels, but got {channels}.")
    if not images.is_floating_point():
        return to_dtype(images.detach().cpu(), torch.float32, scale=True).clamp(0.0, 1.0).expand(-1, 3, -1, -1)
    x = images.detach().cpu().float()
    if std is not None:
        x = x * _stats(std, "std", channels)
    if mean is not None:
        x = x + _stats(mean, "mean", channels)
    return x.clamp(0.0, 1.0).expand(-1, 3, -1, -1)


def _captions(side: str, labels: Any, name: str, batch: int, n: int, class_names: Optional[Sequence[str]]) -> list[str]:
    """The captions of the first ``n`` panels of one side: ``side`` and each class index and name."""
    if labels is None:
        return [side] * n
    if not isinstance(labels, Tensor) or labels.ndim not in (1, 2) or labels.shape[0] != batch:
        raise ValueError(
            f"Expected `{name}` to be class indices ({batch},) or probabilities ({batch}, K), but got"
            f" {shape_of(labels)}."
        )
    indices = (labels.argmax(dim=1) if labels.ndim == 2 else labels)[:n].long().tolist()
    names = class_names or []
    return [f"{side}: {i}" + (f" {names[i]}" if 0 <= i < len(names) else "") for i in indices]


def _overlay_heatmaps(x_a: Tensor, heatmaps: Any, batch: int, alpha: float) -> Tensor:
    """``x_a`` ``(n, 3, H, W)`` under its first ``n`` heatmaps, min-max scaled in the "jet" colormap."""
    if not isinstance(heatmaps, Tensor) or heatmaps.ndim != 3 or len(heatmaps) != batch:
        raise ValueError(
            f"Expected `partner_heatmaps` to have shape ({batch}, gh, gw), one map per image, but got"
            f" {shape_of(heatmaps)}."
        )
    n, _, height, width = x_a.shape
    heat = heatmaps[:n, None].detach().cpu().float().nan_to_num(0.0)
    low, high = heat.amin(dim=(2, 3), keepdim=True), heat.amax(dim=(2, 3), keepdim=True)
    heat = F.interpolate((heat - low) / (high - low).clamp_min(1e-12), size=(height, width), mode="nearest")
    jet = (1.5 - (4.0 * heat - torch.tensor([3.0, 2.0, 1.0]).view(1, 3, 1, 1)).abs()).clamp(0.0, 1.0)
    return (1.0 - alpha) * x_a + alpha * jet


def render_mix_grid(
    partners: Tensor,
    canvases: Tensor,
    mixed: Tensor,
    lam: Tensor,
    *,
    partner_labels: Optional[Tensor] = None,
    canvas_labels: Optional[Tensor] = None,
    partner_heatmaps: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    class_names: Optional[Sequence[str]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    max_samples: int = 8,
    alpha: float = 0.5,
    scale: Optional[int] = None,
    outline_color: tuple[int, int, int] = (255, 255, 255),
) -> Tensor:
    """Draw mixes as one ``(3, H', W')`` uint8 image (as ``SummaryWriter.add_image`` takes), a row per sample.

    A row holds ``x_A`` (with its heatmap), ``x_B`` and the mix, captioned with their classes and ``lam`` (the mix's
    label is ``lam * y_A + (1 - lam) * y_B``); the pasted region is outlined on ``x_A`` and on the mix.

    Args:
        partners, canvases, mixed: ``(B, C, H, W)`` images ``x_A`` (pasted), ``x_B`` and the mixes, C in {1, 3}:
            integers, or floats normalised with ``mean``/``std`` (in [0, 1] if ``None``).
        lam: ``(B,)`` share of ``x_A``; mask: ``(B, 1, H, W)`` pasted region (``None`` for Mixup), in ``outline_color``.
        partner_labels, canvas_labels: class indices ``(B,)`` or probabilities ``(B, K)``, named by ``class_names``.
        partner_heatmaps: ``(B, gh, gw)`` attention overlaid on ``x_A`` (min-max scaled, "jet") with opacity ``alpha``.
        max_samples: rows drawn; scale: integer upscaling, by default the smallest that makes panels at least 96 px.

    Example::

        >>> images = torch.rand(4, 3, 32, 32)  # upscaled x3 to 96 px panels
        >>> grid = render_mix_grid(images.roll(1, 0), images, images, torch.zeros(4), max_samples=2)
        >>> tuple(grid.shape)  # 2 rows of (96 + 14 px caption), 3 panels of 96, 2 px padding
        (3, 226, 296)
    """
    check_int(max_samples, "max_samples", minimum=1)
    check_real(alpha, "alpha", low=0.0, high=1.0)
    check_int(scale, "scale", minimum=1, optional=True)
    x_a = _unit_images(partners, "partners", mean, std)
    x_b, x_m = _unit_images(canvases, "canvases", mean, std), _unit_images(mixed, "mixed", mean, std)
    batch, _, height, width = x_a.shape
    check_shape(x_b, "canvases", tuple(x_a.shape))
    check_shape(x_m, "mixed", tuple(x_a.shape))
    check_shape(lam, "lam", (batch,))
    if mask is not None:
        check_shape(mask, "mask", (batch, 1, height, width))
    n = min(max_samples, batch)
    captions = zip(
        _captions("A", partner_labels, "partner_labels", batch, n, class_names),
        _captions("B", canvas_labels, "canvas_labels", batch, n, class_names),
        [f"lam = {value:.3f}" for value in lam[:n].detach().cpu().float().tolist()],
        strict=True,
    )
    x_a, x_b, x_m = x_a[:n], x_b[:n], x_m[:n]
    if partner_heatmaps is not None:
        x_a = _overlay_heatmaps(x_a, partner_heatmaps, batch, alpha)
    scale = scale or max(1, math.ceil(_MIN_PANEL / max(height, width)))
    panels = F.interpolate(torch.cat([x_a, x_b, x_m]), scale_factor=scale, mode="nearest")
    panels = (panels * 255.0).round().to(torch.uint8).view(3, n, 3, height * scale, width * scale)
    panels = F.pad(panels, (0, 0, 0, _CAPTION_HEIGHT), value=_BACKGROUND)
    if mask is not None:  # the outline: pasted pixels within `thick` px of the outside (the border counts)
        big_mask = F.interpolate(mask[:n].detach().cpu().float(), scale_factor=scale, mode="nearest") > 0.5
        thick = max(1, round(scale * max(height, width) / 112))
        eroded = -F.max_pool2d(-F.pad(big_mask.float(), (thick,) * 4), 2 * thick + 1, stride=1)
        edges = F.pad((big_mask & (eroded < 0.5))[:, 0], (0, 0, 0, _CAPTION_HEIGHT))
    caption_box = torch.tensor([[0, height * scale, width * scale - 1, height * scale + _CAPTION_HEIGHT - 1]])
    tiles = []
    for i, row in enumerate(captions):
        for column, caption in enumerate(row):
            tile = panels[column, i]
            if mask is not None and column != 1:
                tile = draw_segmentation_masks(tile, edges[i], alpha=1.0, colors=outline_color)
            # A box of width 0 draws nothing but its label: the caption, in the strip under the panel.
            tiles.append(draw_bounding_boxes(tile, caption_box, labels=[caption], width=0, colors="white"))
    return make_grid(torch.stack(tiles), nrow=3, padding=2, pad_value=_BACKGROUND)


def _render_mix(result: MixResult, *, partner_heatmaps: Optional[Tensor] = None, **options: Any) -> Tensor:
    """:func:`render_mix_grid` of a mixing callback's ``result`` (which has a ``source``; not changed), with
    ``partner_heatmaps`` if it has none of its own."""
    permutation, targets = result.permutation.to(result.source.device), result.source_targets
    labels = None if targets is None else targets[permutation.to(targets.device)]  # the partners'
    heatmaps = result.partner_heatmaps if result.partner_heatmaps is not None else partner_heatmaps
    images = (result.source[permutation], result.source, result.mixed, result.lam)
    return render_mix_grid(
        *images, mask=result.mask, partner_labels=labels, canvas_labels=targets, partner_heatmaps=heatmaps, **options
    )


class _MixReader(Callback):
    """A callback that reads the mixers' batches, one training batch in ``every_n_steps`` (a resumable count)."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = check_int(every_n_steps, "every_n_steps", minimum=1)
        self._batches = 0
        self._mixers: list[MixingCallback] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._mixers = [c for c in trainer.callbacks if isinstance(c, MixingCallback)]  # type: ignore[attr-defined]
        if not self._mixers:
            raise MisconfigurationException(
                f"{type(self).__name__} reads the batches of a mixing callback, but the Trainer has none."
                " Add AttentiveCutMix, CutMix or MixUp to `Trainer(callbacks=[...])`."
            )
        self._setup_fit(trainer)

    def _setup_fit(self, trainer: pl.Trainer) -> None:
        raise NotImplementedError

    def _count_batch(self) -> bool:
        """Count one training batch; whether it is due (the first batch and every ``every_n_steps`` after)."""
        due = self._batches % self.every_n_steps == 0
        self._batches += 1
        return due

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"batches": self._batches}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._batches = state_dict["batches"]


class PastedAttentionMonitor(_MixReader):
    """Log ``{log_prefix}/pasted_attention`` for CutMix (and random cells) with a frozen teacher of its own.

    One teacher forward on the unmixed batch of each measured ``last_mix``; its ``pasted_attention_share`` goes
    into the mixer's epoch mean, and :class:`MixVisualizer` borrows its heatmaps. ``setup`` raises without a mixer.

    Args:
        teacher: a :class:`Teacher` with a model (not ``"random"`` nor ``coldest``) or its ``source``.
        every_n_steps: measure one training batch in ``every_n_steps``.

    Example::

        >>> from lightning_acm.callbacks import CutMix
        >>> tiny = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU())
        >>> monitor = PastedAttentionMonitor(teacher=Teacher(module=tiny, layer="1", input_size=28))
        >>> trainer = pl.Trainer(callbacks=[CutMix(seed=0), monitor], accelerator="cpu", logger=False)
    """

    def __init__(self, *, teacher: Union[str, Teacher] = "efficientnet_lite0", every_n_steps: int = 1) -> None:
        super().__init__(every_n_steps)
        if not isinstance(teacher, (str, Teacher)):
            raise TypeError(f"Expected `teacher` to be a str or a Teacher, but got {type(teacher).__name__}.")
        self.teacher = Teacher(teacher) if isinstance(teacher, str) else teacher
        if self.teacher.is_random or self.teacher.coldest:
            raise ValueError(
                f"Expected `teacher` to name a model whose attention is measured, but got {self.teacher.source!r}"
                f"{' with coldest=True' if self.teacher.coldest else ''}. Pass e.g. teacher='efficientnet_lite0'."
            )
        self._model: Optional[nn.Module] = None
        self._measured: Optional[tuple[MixResult, Tensor]] = None  # the last result measured and its heatmaps

    def _setup_fit(self, trainer: pl.Trainer) -> None:
        self._mixers = [mixer for mixer in self._mixers if not _measures_itself(mixer)]
        if not self._mixers:
            rank_zero_warn(
                f"{type(self).__name__}: the mixing callbacks (Attentive CutMix with a teacher, Mixup) log"
                " `pasted_attention` themselves, so this callback has nothing to measure. Remove it,"
                " or use it with CutMix or random cells."
            )
        elif self._model is None:
            self._model = _build_teacher(self.teacher, trainer, type(self).__name__)

    @torch.no_grad()
    def partner_heatmaps(self, result: MixResult) -> Optional[Tensor]:
        """``(B, gh, gw)`` attention of the partners of ``result`` (not changed): its own, else the teacher's on
        ``result.source`` (run once per result); ``None`` before ``setup`` or without ``source``."""
        if result.partner_heatmaps is not None:
            return result.partner_heatmaps
        if self._model is None or result.source is None:
            return None
        if self._measured is None or self._measured[0] is not result:
            heatmaps = self._model(result.source)
            self._measured = (result, heatmaps[result.permutation.to(heatmaps.device)])
        return self._measured[1]

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._measured = None  # lets the previous batch go

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not self._count_batch():
            return
        for mixer in self._mixers:
            result = mixer.last_mix
            if result is None or not result.has_region or result.partner_heatmaps is not None:
                continue  # not mixed, blended (Mixup), or measured by the mixer itself
            # One epoch mean per mixer: a RandomMixing also counts the batches that measure themselves.
            heatmaps = self.partner_heatmaps(result)  # not None: the teacher is built, and a mix has its source
            mixer.add_pasted_attention(pasted_attention_share(heatmaps, result.mask))  # type: ignore[arg-type]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._measured = None
            if self.teacher.module is None:  # frees a built-in teacher; the next fit builds it again
                self._model = None


def _measures_itself(mixer: MixingCallback) -> bool:
    """Whether ``mixer`` logs ``pasted_attention`` itself: Mixup, Attentive CutMix with a teacher, a mix of these."""
    if isinstance(mixer, RandomMixing):
        return all(map(_measures_itself, mixer.methods))
    return isinstance(mixer, MixUp) or (isinstance(mixer, AttentiveCutMix) and not mixer.teacher.is_random)


class MixVisualizer(_MixReader):
    """Log a picture of the mixed batch every ``every_n_steps`` training batches (rank zero only).

    One :func:`render_mix_grid` image per mixer, tagged ``{log_prefix}/mixes``, to every logger with
    ``experiment.add_image``, else as PNG in ``{trainer.log_dir}/mixes/``; a due picture waits for the next mix.

    Args:
        every_n_steps: training batches between two pictures (the first batch is drawn).
        max_samples: rows per picture; alpha: opacity of the heatmap overlay.
        class_names: names shown with the class indices; ``trainer.datamodule.classes`` when ``None``.
        mean, std: the training images' normalisation, to undo; the datamodule's (else a teacher's) when ``None``.

    Example::

        >>> from lightning_acm.callbacks import CutMix
        >>> visualizer = MixVisualizer(every_n_steps=100, max_samples=4)
        >>> trainer = pl.Trainer(callbacks=[CutMix(seed=0), visualizer], accelerator="cpu", logger=False)
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 200,
        max_samples: int = 8,
        class_names: Optional[list[str]] = None,
        alpha: float = 0.5,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__(every_n_steps)
        self.max_samples = check_int(max_samples, "max_samples", minimum=1)
        self.alpha = check_real(alpha, "alpha", low=0.0, high=1.0)
        if (mean is None) != (std is None):
            raise ValueError("Expected `mean` and `std` to be given together, but got only one of them.")
        self.class_names = list(class_names) if class_names is not None else None
        self.mean, self.std = mean, std
        self._monitors: list[PastedAttentionMonitor] = []
        self._pending: list[bool] = []
        self._png_dir: Optional[str] = None
        self._options: dict[str, Any] = {}  # render_mix_grid's, set in `setup`

    def _setup_fit(self, trainer: pl.Trainer) -> None:
        self._monitors = [cb for cb in trainer.callbacks if isinstance(cb, PastedAttentionMonitor)]  # type: ignore[attr-defined]
        self._pending = [False] * len(self._mixers)
        # `trainer.log_dir` broadcasts, so every rank asks for it here, not in the rank-zero hook.
        self._png_dir = os.path.join(trainer.log_dir or trainer.default_root_dir, "mixes")
        datamodule, names = trainer.datamodule, self.class_names
        classes = getattr(datamodule, "classes", None)
        if names is None and isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
            names = list(classes)
        # The normalisation to undo: the given one, else the datamodule's, else an Attentive CutMix teacher's.
        teachers = [getattr(m, "teacher", None) for mixer in self._mixers for m in getattr(mixer, "methods", [mixer])]
        candidates = [(self.mean, self.std), (getattr(datamodule, "mean", None), getattr(datamodule, "std", None))]
        candidates += [(getattr(t, "input_mean", None), getattr(t, "input_std", None)) for t in teachers]
        mean, std = next(((tuple(m), tuple(s)) for m, s in candidates if m is not None and s is not None), (None, None))
        self._options = dict(class_names=names, max_samples=self.max_samples, alpha=self.alpha, mean=mean, std=std)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not trainer.is_global_zero:
            return
        if self._count_batch():
            self._pending = [True] * len(self._mixers)
        for index, mixer in enumerate(self._mixers):
            if self._pending[index] and (result := mixer.last_mix) is not None:
                heatmaps = next((h for m in self._monitors if (h := m.partner_heatmaps(result)) is not None), None)
                image = _render_mix(result, partner_heatmaps=heatmaps, **self._options)
                self._log_image(trainer, f"{mixer.log_prefix}/mixes", image)
                self._pending[index] = False

    def _log_image(self, trainer: pl.Trainer, tag: str, image: Tensor) -> None:
        adders = [getattr(getattr(logger, "experiment", None), "add_image", None) for logger in trainer.loggers]
        for add_image in filter(callable, adders):
            add_image(tag, image, global_step=trainer.global_step)
        if not any(map(callable, adders)) and self._png_dir is not None:
            os.makedirs(self._png_dir, exist_ok=True)
            path = os.path.join(self._png_dir, f"{tag.replace('/', '_')}_step{trainer.global_step:07d}.png")
            to_pil_image(image).save(path)
