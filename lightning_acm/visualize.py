"""See what the mixing does: render mixed batches, log them while training, measure the pasted attention.

* :func:`render_mix_grid` (pure, no Lightning) draws up to ``max_samples`` mixes as one
  ``(3, H, W)`` uint8 image with torchvision's drawing utilities, one row per sample: the partner
  ``x_A`` with its heatmap overlaid, the canvas ``x_B`` and the mixed image; the pasted region is
  outlined on ``x_A`` and on the mix, and captions give the classes of ``x_A`` and ``x_B`` and ``lam``.
  :func:`render_mix` does the same from a :class:`~lightning_acm.callbacks.MixResult`.
* :class:`MixVisualizer` logs that image every ``every_n_steps`` training batches: to
  TensorBoard (``logger.experiment.add_image``) or, for loggers without images (CSVLogger, none),
  as PNG files in ``{trainer.log_dir}/mixes/``.
* :class:`PastedAttentionMonitor` runs its own frozen teacher so that CutMix also logs
  ``{log_prefix}/pasted_attention``, the share of the partner's attention mass inside the pasted
  region (:func:`~lightning_acm.functional.pasted_attention_share`). Attentive CutMix logs it
  without help (its heatmaps exist), and so does Mixup (where it is ``lam``, see
  :meth:`~lightning_acm.callbacks.MixResult.pasted_attention`).

Both callbacks read the mixing callbacks' :attr:`~lightning_acm.callbacks.MixingCallback.last_mix`
and change nothing in them.

Example::

    >>> import torch
    >>> from lightning_acm.functional import topk_cell_mask
    >>> images, heat = torch.rand(2, 3, 28, 28), torch.rand(2, 7, 7)
    >>> mask = topk_cell_mask(heat, 6, 28)
    >>> grid = render_mix_grid(images.flip(0), images, torch.where(mask, images.flip(0), images),
    ...                        mask.float().mean((1, 2, 3)), partner_heatmaps=heat, mask=mask)
    >>> grid.dtype, grid.shape[0]
    (torch.uint8, 3)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

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

from lightning_acm import functional as AF
from lightning_acm.callbacks import (
    AttentiveCutMix,
    MixingCallback,
    MixResult,
    MixUp,
    frozen_attention_model,
    run_attention,
)
from lightning_acm.validation import check_size2

__all__ = ["MixVisualizer", "PastedAttentionMonitor", "render_mix", "render_mix_grid"]

_BACKGROUND = 30  # dark grey between the panels and behind the captions
_CAPTION_HEIGHT = 14  # one line of PIL's default font
_MIN_PANEL = 96  # small images (CIFAR's 32 px) are upscaled by an integer factor to at least this


# --------------------------------------------------------------------------- rendering


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def _check_positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int, but got {value!r}.")


def _channel_stats(values: Optional[Sequence[float]], name: str, channels: int) -> Optional[Tensor]:
    if values is None:
        return None
    flat = [float(v) for v in values]
    if len(flat) not in (1, channels):
        raise ValueError(f"Expected `{name}` to have 1 or {channels} values (one per channel), but got {len(flat)}.")
    return torch.tensor(flat).view(1, -1, 1, 1)


def _unit_images(images: Tensor, name: str, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> Tensor:
    """``(B, C, H, W)`` images → float ``(B, 3, H, W)`` in [0, 1] on the CPU.

    Integer images are scaled by their dtype's maximum (1/255 for uint8), as torchvision's
    ``ToDtype(scale=True)``; float images are un-normalised with ``mean``/``std``.
    """
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"Expected `{name}` to be a batch (B, C, H, W), but got {_shape(images)}.")
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"Expected `{name}` to have 1 or 3 channels, but got {channels}.")
    x = images.detach().cpu()
    if x.is_floating_point():
        x = x.float()
        mean_t, std_t = _channel_stats(mean, "mean", channels), _channel_stats(std, "std", channels)
        x = x * std_t if std_t is not None else x
        x = x + mean_t if mean_t is not None else x
    else:
        x = to_dtype(x, torch.float32, scale=True)
    return x.clamp(0.0, 1.0).expand(-1, 3, -1, -1)


def _jet(values: Tensor) -> Tensor:
    """The "jet" colormap: ``(B, 1, H, W)`` values in [0, 1] → ``(B, 3, H, W)`` RGB in [0, 1]."""
    centres = torch.tensor([3.0, 2.0, 1.0]).view(1, 3, 1, 1)
    return (1.5 - (4.0 * values - centres).abs()).clamp(0.0, 1.0)


def _class_indices(labels: Optional[Tensor], name: str, batch: int) -> Optional[list[int]]:
    if labels is None:
        return None
    if not isinstance(labels, Tensor) or labels.ndim not in (1, 2) or labels.shape[0] != batch:
        raise ValueError(
            f"Expected `{name}` to be class indices ({batch},) or probabilities ({batch}, K), but got {_shape(labels)}."
        )
    labels = labels.detach().cpu()
    return (labels.argmax(dim=1) if labels.ndim == 2 else labels).long().tolist()


def _caption(side: str, labels: Optional[list[int]], i: int, class_names: Optional[Sequence[str]]) -> str:
    if labels is None:
        return side
    index = labels[i]
    name = f" {class_names[index]}" if class_names is not None and 0 <= index < len(class_names) else ""
    return f"{side}: {index}{name}"


def _outline(mask: Tensor, width: int) -> Tensor:
    """``(B, 1, H, W)`` bool region → ``(B, H, W)`` its pixels within ``width`` of the outside (the image border counts as outside)."""
    padded = F.pad(mask.float(), (width, width, width, width))
    eroded = -F.max_pool2d(-padded, 2 * width + 1, stride=1)
    return (mask & (eroded < 0.5))[:, 0]


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
    """Draw mixes as one image, a row per sample: ``x_A`` with its heatmap, ``x_B``, the mix.

    The pasted region is outlined on ``x_A`` and on the mix. Under each panel a caption names
    it: ``A: <class of x_A>``, ``B: <class of x_B>`` (just ``A`` and ``B`` without labels) and
    ``lam = <lam>`` under the mix, whose label is ``lam * y_A + (1 - lam) * y_B``. The layout is
    :func:`torchvision.utils.make_grid` with 3 panels per row and 2 px of padding.

    Args:
        partners: ``(B, C, H, W)`` pasted images ``x_A`` (``images[p]``), C in {1, 3}; integer
            (uint8: scaled by 1/255, as torchvision's ``ToDtype(scale=True)``), or float
            normalised with ``mean``/``std`` (or in [0, 1] when they are ``None``).
        canvases: ``(B, C, H, W)`` images ``x_B`` the partners were pasted onto.
        mixed: ``(B, C, H, W)`` mixed images.
        lam: ``(B,)`` fraction of each mixed image taken from the partner.
        partner_labels: ``y_A`` as class indices ``(B,)`` or probabilities ``(B, K)`` (argmax shown).
        canvas_labels: ``y_B``, as ``partner_labels``.
        partner_heatmaps: ``(B, gh, gw)`` attention of each partner, overlaid on ``x_A`` (min-max
            scaled per sample, "jet" colormap).
        mask: ``(B, 1, H, W)`` boolean pasted region (``None`` for Mixup).
        class_names: names shown after the class indices.
        mean: the per-channel mean the float images were normalised with.
        std: the per-channel std the float images were normalised with.
        max_samples: rows drawn (the first ``max_samples`` samples).
        alpha: opacity of the heatmap overlay, in [0, 1].
        scale: integer upscaling of the images; by default the smallest one that makes them at
            least 96 px (1 for 224 px images).
        outline_color: RGB colour of the outline.

    Returns:
        ``(3, H', W')`` uint8 image (CHW, as ``SummaryWriter.add_image`` takes).

    Raises:
        ValueError: for shapes that do not match or arguments out of range.

    Example::

        >>> images = torch.rand(4, 3, 32, 32)  # upscaled x3 to 96 px panels
        >>> grid = render_mix_grid(images.roll(1, 0), images, images, torch.zeros(4), max_samples=2)
        >>> tuple(grid.shape)  # 2 rows of (96 + 14 px caption), 3 panels of 96, 2 px padding
        (3, 226, 296)
    """
    _check_positive(max_samples, "max_samples")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Expected `alpha` to be in [0, 1], but got {alpha!r}.")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or scale < 1):
        raise ValueError(f"Expected `scale` to be None or a positive int, but got {scale!r}.")
    x_a = _unit_images(partners, "partners", mean, std)
    batch, _, height, width = x_a.shape
    x_b = _unit_images(canvases, "canvases", mean, std)
    x_m = _unit_images(mixed, "mixed", mean, std)
    for name, other in (("canvases", x_b), ("mixed", x_m)):
        if other.shape != x_a.shape:
            raise ValueError(
                f"Expected `{name}` to have the shape of `partners`, but the shapes do not match:"
                f" {tuple(other.shape)} != {tuple(x_a.shape)}."
            )
    if not isinstance(lam, Tensor) or tuple(lam.shape) != (batch,):
        raise ValueError(f"Expected `lam` to have shape ({batch},), but got {_shape(lam)}.")
    if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != (batch, 1, height, width)):
        raise ValueError(f"Expected `mask` to have shape ({batch}, 1, {height}, {width}), but got {_shape(mask)}.")
    if partner_heatmaps is not None and (
        not isinstance(partner_heatmaps, Tensor) or partner_heatmaps.ndim != 3 or partner_heatmaps.shape[0] != batch
    ):
        raise ValueError(
            f"Expected `partner_heatmaps` to have shape ({batch}, gh, gw), one map per image, but got {_shape(partner_heatmaps)}."
        )
    y_a = _class_indices(partner_labels, "partner_labels", batch)
    y_b = _class_indices(canvas_labels, "canvas_labels", batch)

    n = min(max_samples, batch)
    x_a, x_b, x_m = x_a[:n], x_b[:n], x_m[:n]
    if partner_heatmaps is not None:
        heat = partner_heatmaps[:n, None].detach().cpu().float().nan_to_num(0.0)
        low, high = heat.amin(dim=(2, 3), keepdim=True), heat.amax(dim=(2, 3), keepdim=True)
        heat = F.interpolate((heat - low) / (high - low).clamp_min(1e-12), size=(height, width), mode="nearest")
        x_a = (1.0 - alpha) * x_a + alpha * _jet(heat)
    scale = scale if scale is not None else max(1, math.ceil(_MIN_PANEL / max(height, width)))
    panels = F.interpolate(torch.cat([x_a, x_b, x_m]), scale_factor=scale, mode="nearest")
    panels = (panels * 255.0).round().to(torch.uint8).view(3, n, 3, height * scale, width * scale)
    panels = F.pad(panels, (0, 0, 0, _CAPTION_HEIGHT), value=_BACKGROUND)
    edges = None
    if mask is not None:
        big_mask = F.interpolate(mask[:n].detach().cpu().float(), scale_factor=scale, mode="nearest") > 0.5
        edges = F.pad(_outline(big_mask, max(1, round(scale * max(height, width) / 112))), (0, 0, 0, _CAPTION_HEIGHT))
    caption_box = torch.tensor([[0, height * scale, width * scale - 1, height * scale + _CAPTION_HEIGHT - 1]])
    lam_list = lam[:n].detach().cpu().float().tolist()
    tiles = []
    for i in range(n):
        captions = (_caption("A", y_a, i, class_names), _caption("B", y_b, i, class_names), f"lam = {lam_list[i]:.3f}")
        for column, caption in enumerate(captions):
            tile = panels[column, i]
            if edges is not None and column != 1:
                tile = draw_segmentation_masks(tile, edges[i], alpha=1.0, colors=outline_color)
            # A box of width 0 draws nothing but its label: the caption, in the strip under the panel.
            tiles.append(draw_bounding_boxes(tile, caption_box, labels=[caption], width=0, colors="white"))
    return make_grid(torch.stack(tiles), nrow=3, padding=2, pad_value=_BACKGROUND)


def render_mix(
    result: MixResult,
    *,
    partner_heatmaps: Optional[Tensor] = None,
    class_names: Optional[Sequence[str]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    max_samples: int = 8,
    alpha: float = 0.5,
    scale: Optional[int] = None,
) -> Tensor:
    """:func:`render_mix_grid` of a :class:`~lightning_acm.callbacks.MixResult`.

    ``x_B`` is ``result.source`` and ``x_A`` is ``result.source[result.permutation]``; labels come
    from ``result.source_targets``. The mixing callbacks fill ``source`` on every mixed batch.
    ``partner_heatmaps`` (e.g. from :meth:`PastedAttentionMonitor.partner_heatmaps`) are drawn
    when the result has none of its own.

    Raises:
        ValueError: if ``result.source`` is ``None``, or as :func:`render_mix_grid`.
    """
    if result.source is None:
        raise ValueError(
            "Expected `result.source` (the batch before mixing) to render the partners, but got None."
            " Build the MixResult with `source=` (the mixing callbacks do)."
        )
    _check_positive(max_samples, "max_samples")
    n = min(max_samples, result.source.shape[0])
    permutation = result.permutation[:n].to(result.source.device)
    targets = result.source_targets
    heatmaps = result.partner_heatmaps if result.partner_heatmaps is not None else partner_heatmaps
    return render_mix_grid(
        result.source[permutation],
        result.source[:n],
        result.mixed[:n],
        result.lam[:n],
        partner_labels=targets[permutation.to(targets.device)] if targets is not None else None,
        canvas_labels=targets[:n] if targets is not None else None,
        partner_heatmaps=heatmaps[:n] if heatmaps is not None else None,
        mask=result.mask[:n] if result.mask is not None else None,
        class_names=class_names,
        mean=mean,
        std=std,
        max_samples=max_samples,
        alpha=alpha,
        scale=scale,
    )


# --------------------------------------------------------------------------- callbacks


def _mixing_callbacks(trainer: pl.Trainer, owner: str) -> list[MixingCallback]:
    mixers = [callback for callback in trainer.callbacks if isinstance(callback, MixingCallback)]  # type: ignore[attr-defined]
    if not mixers:
        raise MisconfigurationException(
            f"{owner} reads the batches of a mixing callback, but the Trainer has none."
            " Add AttentiveCutMix, CutMix or MixUp to `Trainer(callbacks=[...])`."
        )
    return mixers


def _datamodule_normalization(trainer: pl.Trainer) -> tuple[Optional[tuple[float, ...]], Optional[tuple[float, ...]]]:
    datamodule = getattr(trainer, "datamodule", None)
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if mean is None or std is None:
        return None, None
    return tuple(mean), tuple(std)


class _EveryNSteps(Callback):
    """Counts training batches for the callbacks that act on one in ``every_n_steps``; the count is resumable.

    Subclasses set ``every_n_steps`` and ``_batches = 0`` in their ``__init__``.
    """

    every_n_steps: int
    _batches: int

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


class PastedAttentionMonitor(_EveryNSteps):
    """Log ``{log_prefix}/pasted_attention`` for CutMix with a frozen teacher of its own.

    The metric is the share of the partner's attention mass that lies inside the pasted region
    (:func:`~lightning_acm.functional.pasted_attention_share`), averaged over the epoch. It shows
    whether a method pastes the object: Attentive CutMix pastes a small area holding much of the
    mass, a random CutMix box holds about its area's share. Attentive CutMix and Mixup log it
    themselves at no cost; this callback fills in the mixing callbacks that paste a region but
    have no heatmaps (CutMix), by running the teacher on the unmixed batch that the mixing
    callback exposes in ``last_mix.source``. That is one extra teacher forward per measured
    batch, so it is opt-in and ``every_n_steps`` thins it out. :class:`MixVisualizer` borrows
    the heatmaps (:meth:`partner_heatmaps`), so its CutMix rows show the partner's attention.

    Args:
        attention: teacher preset or torchvision model name (see
            :func:`~lightning_acm.attention.build_attention_model`); ``"efficientnet_lite0"``
            needs no download.
        attention_weights: weights name or local file (see ``build_attention_model``).
        attention_layer: layer to tap; the preset's when ``None``.
        attention_input_size: teacher input size; the preset's (224) when ``None``.
        grid_size: cells per side of the heatmap grid.
        reduction: channel reduction of the tapped features.
        attention_model: a ready ``nn.Module`` (Python use): an
            :class:`~lightning_acm.attention.AttentionModel` is used as it is, any other module
            is tapped at ``attention_layer``.
        input_mean: the normalisation of the training images; ``trainer.datamodule.mean`` when ``None``.
        input_std: as ``input_mean``.
        every_n_steps: measure one training batch in ``every_n_steps``.

    Raises:
        ValueError: for an argument out of range.
        MisconfigurationException: from ``setup`` when the Trainer has no mixing callback.

    Example::

        >>> import lightning as L, torch
        >>> from lightning_acm.callbacks import CutMix
        >>> tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.ReLU())
        >>> monitor = PastedAttentionMonitor(attention_model=tiny, attention_layer="1", attention_input_size=28)
        >>> trainer = L.Trainer(callbacks=[CutMix(seed=0), monitor], accelerator="cpu", logger=False)
    """

    def __init__(
        self,
        *,
        attention: str = "efficientnet_lite0",
        attention_weights: Optional[str] = None,
        attention_layer: Optional[str] = None,
        attention_input_size: Optional[int] = None,
        grid_size: Union[int, tuple[int, int]] = 7,
        reduction: Literal["mean", "max"] = "mean",
        attention_model: Optional[nn.Module] = None,
        input_mean: Optional[Sequence[float]] = None,
        input_std: Optional[Sequence[float]] = None,
        every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        self.grid_size = check_size2(grid_size, "grid_size")
        if reduction not in ("mean", "max"):
            raise ValueError(f"Expected `reduction` to be one of 'mean', 'max', but got {reduction!r}.")
        if attention_input_size is not None:
            _check_positive(attention_input_size, "attention_input_size")
        if (input_mean is None) != (input_std is None):
            raise ValueError("Expected `input_mean` and `input_std` to be given together, but got only one of them.")
        if attention_model is not None and not isinstance(attention_model, nn.Module):
            raise TypeError(f"Expected `attention_model` to be an nn.Module, but got {type(attention_model).__name__}.")
        _check_positive(every_n_steps, "every_n_steps")
        self.attention = attention
        self.attention_weights = attention_weights
        self.attention_layer = attention_layer
        self.attention_input_size = attention_input_size
        self.reduction = reduction
        self.input_mean = tuple(input_mean) if input_mean is not None else None
        self.input_std = tuple(input_std) if input_std is not None else None
        self.every_n_steps = every_n_steps
        self._given_model = attention_model
        self._attention: Optional[nn.Module] = None
        self._mixers: list[MixingCallback] = []
        self._batches = 0
        # The last result the teacher ran on and its partners' heatmaps, until the next batch.
        self._measured: Optional[tuple[MixResult, Tensor]] = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        mixers = _mixing_callbacks(trainer, type(self).__name__)
        self._mixers = [mixer for mixer in mixers if not isinstance(mixer, (AttentiveCutMix, MixUp))]
        if not self._mixers:
            rank_zero_warn(
                f"{type(self).__name__}: the mixing callbacks (Attentive CutMix, Mixup) log `pasted_attention`"
                " themselves, so this callback has nothing to measure. Remove it, or use it with CutMix."
            )
            return
        if self._attention is None:
            self._attention = frozen_attention_model(
                trainer,
                owner=type(self).__name__,
                attention=self.attention,
                attention_weights=self.attention_weights,
                attention_layer=self.attention_layer,
                attention_input_size=self.attention_input_size,
                grid_size=self.grid_size,
                reduction=self.reduction,
                attention_model=self._given_model,
                input_mean=self.input_mean,
                input_std=self.input_std,
            )

    def partner_heatmaps(self, result: MixResult) -> Optional[Tensor]:
        """``(B, gh, gw)`` attention of the partners of ``result``, which is not changed.

        The result's own ``partner_heatmaps`` when it has them, else the teacher's on
        ``result.source`` (run once per result); ``None`` before ``setup`` or without ``source``.
        """
        if result.partner_heatmaps is not None:
            return result.partner_heatmaps
        if self._attention is None or result.source is None:
            return None
        if self._measured is None or self._measured[0] is not result:
            heatmaps = run_attention(self._attention, result.source)
            self._measured = (result, heatmaps[result.permutation.to(heatmaps.device)])
        return self._measured[1]

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._measured = None  # lets the previous batch go

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._count_batch():
            return
        for mixer in self._mixers:
            result = mixer.last_mix
            if result is None or not result.has_region or result.partner_heatmaps is not None:
                continue  # not mixed, blended (Mixup), or measured by the mixer itself
            heatmaps = self.partner_heatmaps(result)
            if heatmaps is None:
                continue
            share = AF.pasted_attention_share(heatmaps, result.mask)
            pl_module.log(
                f"{mixer.log_prefix}/pasted_attention",
                share.mean(),
                on_step=False,
                on_epoch=True,
                batch_size=share.shape[0],
                sync_dist=True,
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._measured = None
            if self._given_model is None:
                self._attention = None


class MixVisualizer(_EveryNSteps):
    """Log a picture of the mixed batch every ``every_n_steps`` training batches (rank zero only).

    One image per mixing callback in the Trainer (see :func:`render_mix_grid` for what it
    shows), tagged ``{log_prefix}/mixes``: written with ``experiment.add_image`` to every logger
    that has it (TensorBoard), otherwise saved as ``{trainer.log_dir}/mixes/{log_prefix}_step{N}.png``
    (CSVLogger, or ``default_root_dir`` without a logger). A due picture waits for the next batch
    that is mixed (``p < 1``). It draws the mixing callback's ``last_mix``, which holds the
    unmixed batch for ``x_A`` and ``x_B``. CutMix rows show the partner's attention when a
    :class:`PastedAttentionMonitor` is also used.

    Args:
        every_n_steps: training batches between two pictures (the first batch is drawn).
        max_samples: rows per picture.
        class_names: names shown with the class indices; ``trainer.datamodule.classes`` (a list of
            str) when ``None``.
        alpha: opacity of the heatmap overlay.
        mean: the per-channel mean of the training images' normalisation, to undo it; from
            ``trainer.datamodule.mean`` (or the Attentive CutMix callback's ``input_mean``) when ``None``.
        std: as ``mean``.

    Raises:
        ValueError: for an argument out of range.
        MisconfigurationException: from ``setup`` when the Trainer has no mixing callback.

    Example::

        >>> import lightning as L
        >>> from lightning_acm.callbacks import CutMix
        >>> visualizer = MixVisualizer(every_n_steps=100, max_samples=4)
        >>> trainer = L.Trainer(callbacks=[CutMix(seed=0), visualizer], accelerator="cpu", logger=False)
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
        super().__init__()
        _check_positive(every_n_steps, "every_n_steps")
        _check_positive(max_samples, "max_samples")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Expected `alpha` to be in [0, 1], but got {alpha!r}.")
        if (mean is None) != (std is None):
            raise ValueError("Expected `mean` and `std` to be given together, but got only one of them.")
        self.every_n_steps = every_n_steps
        self.max_samples = max_samples
        self.class_names = list(class_names) if class_names is not None else None
        self.alpha = float(alpha)
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self._mixers: list[MixingCallback] = []
        self._monitors: list[PastedAttentionMonitor] = []
        self._pending: list[bool] = []
        self._batches = 0
        self._png_dir: Optional[str] = None
        self._normalization: tuple[Optional[tuple[float, ...]], Optional[tuple[float, ...]]] = (None, None)
        self._names: Optional[list[str]] = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._mixers = _mixing_callbacks(trainer, type(self).__name__)
        self._monitors = [cb for cb in trainer.callbacks if isinstance(cb, PastedAttentionMonitor)]  # type: ignore[attr-defined]
        self._pending = [False] * len(self._mixers)
        # `trainer.log_dir` broadcasts, so every rank asks for it here, not in the rank-zero hook.
        self._png_dir = os.path.join(trainer.log_dir or trainer.default_root_dir, "mixes")
        self._normalization = self._resolve_normalization(trainer)
        self._names = self.class_names if self.class_names is not None else self._datamodule_classes(trainer)

    def _resolve_normalization(self, trainer: pl.Trainer) -> tuple[Optional[tuple[float, ...]], Optional[tuple[float, ...]]]:
        if self.mean is not None:
            return self.mean, self.std
        mean, std = _datamodule_normalization(trainer)
        if mean is not None:
            return mean, std
        for mixer in self._mixers:
            if isinstance(mixer, AttentiveCutMix) and mixer.input_mean is not None:
                return mixer.input_mean, mixer.input_std
        return None, None

    @staticmethod
    def _datamodule_classes(trainer: pl.Trainer) -> Optional[list[str]]:
        classes = getattr(getattr(trainer, "datamodule", None), "classes", None)
        if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
            return list(classes)
        return None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        due = self._count_batch()
        for index, mixer in enumerate(self._mixers):
            self._pending[index] = self._pending[index] or due
            result = mixer.last_mix
            if not self._pending[index] or result is None:
                continue
            heatmaps = result.partner_heatmaps
            for monitor in self._monitors:
                heatmaps = heatmaps if heatmaps is not None else monitor.partner_heatmaps(result)
            mean, std = self._normalization
            image = render_mix(
                result,
                partner_heatmaps=heatmaps,
                class_names=self._names,
                mean=mean,
                std=std,
                max_samples=self.max_samples,
                alpha=self.alpha,
            )
            self._log_image(trainer, f"{mixer.log_prefix}/mixes", image)
            self._pending[index] = False

    def _log_image(self, trainer: pl.Trainer, tag: str, image: Tensor) -> None:
        written = False
        for logger in trainer.loggers:
            add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
            if callable(add_image):
                add_image(tag, image, global_step=trainer.global_step)
                written = True
        if written or self._png_dir is None:
            return
        os.makedirs(self._png_dir, exist_ok=True)
        name = f"{tag.replace('/', '_')}_step{trainer.global_step:07d}.png"
        to_pil_image(image).save(os.path.join(self._png_dir, name))
