"""See what the mixing does: render mixed batches, log them while training, measure the pasted attention.

* :func:`render_mix_grid` (pure, no Lightning) draws up to ``max_samples`` mixes as one
  ``(3, H, W)`` uint8 image, one row per sample: the partner ``x_A`` with its heatmap overlaid
  and the pasted region outlined (cell by cell when it is a union of grid cells), the canvas
  ``x_B``, the mixed image, and the mixed label ``lam * y_A + (1 - lam) * y_B``.
  :func:`render_mix` does the same from a :class:`~lightning_acm.callbacks.MixResult`.
* :class:`MixVisualizer` logs that image every ``every_n_steps`` training batches: to
  TensorBoard (``logger.experiment.add_image``) or, for loggers without images (CSVLogger, none),
  as PNG files in ``{trainer.log_dir}/mixes/``.
* :class:`PastedAttentionMonitor` runs its own frozen teacher so that CutMix also logs
  ``{log_prefix}/pasted_attention``, the share of the partner's attention mass inside the pasted
  region (:func:`~lightning_acm.functional.pasted_attention_share`). Attentive CutMix logs it
  without help (its heatmaps exist), and so does Mixup (where it is ``lam``, see
  :meth:`~lightning_acm.callbacks.MixResult.pasted_attention`).

Drawing uses torch and PIL only (PIL comes with torchvision); matplotlib is not needed.

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
import weakref
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
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

__all__ = ["MixVisualizer", "PastedAttentionMonitor", "render_mix", "render_mix_grid"]

_BACKGROUND = 0.12
_TITLES = ("x_A + attention", "x_B", "mixed", "label")
_MIN_PANEL = 96  # small images (CIFAR's 32 px) are upscaled by an integer factor to at least this


# --------------------------------------------------------------------------- rendering


def _stats(values: Optional[Sequence[float]], name: str, channels: int) -> Optional[Tensor]:
    if values is None:
        return None
    flat = [float(v) for v in values]
    if len(flat) not in (1, channels):
        raise ValueError(f"Expected `{name}` to have 1 or {channels} values (one per channel), but got {len(flat)}.")
    return torch.tensor(flat).view(1, -1, 1, 1)


def _unit_images(images: Tensor, name: str, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> Tensor:
    """``(B, C, H, W)`` uint8 or (normalised) float images → float ``(B, 3, H, W)`` in [0, 1] on the CPU."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"Expected `{name}` to be a batch (B, C, H, W), but got {shape}.")
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"Expected `{name}` to have 1 or 3 channels, but got {channels}.")
    x = images.detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = x.float()
        mean_t, std_t = _stats(mean, "mean", channels), _stats(std, "std", channels)
        if std_t is not None:
            x = x * std_t
        if mean_t is not None:
            x = x + mean_t
    return x.clamp(0.0, 1.0).expand(-1, 3, -1, -1)


def _jet(values: Tensor) -> Tensor:
    """The "jet" colormap: ``(B, 1, H, W)`` values in [0, 1] → ``(B, 3, H, W)`` RGB in [0, 1]."""
    centres = torch.tensor([3.0, 2.0, 1.0]).view(1, 3, 1, 1)
    return (1.5 - (4.0 * values - centres).abs()).clamp(0.0, 1.0)


def _labels(labels: Optional[Tensor], name: str, batch: int) -> Optional[list[int]]:
    if labels is None:
        return None
    if not isinstance(labels, Tensor) or labels.ndim not in (1, 2) or labels.shape[0] != batch:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"Expected `{name}` to be class indices ({batch},) or probabilities ({batch}, K), but got {shape}.")
    labels = labels.detach().cpu()
    return (labels.argmax(dim=1) if labels.ndim == 2 else labels).long().tolist()


def _cell_labels(mask: Tensor, grid: Optional[tuple[int, int]]) -> Tensor:
    """Label each masked pixel with its cell (1-based) when the mask is a union of cells, else with 1."""
    inside = mask.float()
    if grid is None:
        return inside
    batch, _, height, width = mask.shape
    rows, cols = AF.cell_index_maps(grid, (height, width), mask.device)
    cell_ids = rows[:, None] * grid[1] + cols[None, :]
    flat_ids = cell_ids.flatten().expand(batch, -1)
    full = torch.ones(batch, grid[0] * grid[1]).scatter_reduce(1, flat_ids, inside.flatten(1), "amin")
    is_union = (full.gather(1, flat_ids) == inside.flatten(1)).all(dim=1).view(batch, 1, 1, 1)
    return torch.where(is_union, inside * (cell_ids + 1).float(), inside)


def _outline(labels: Tensor, width: int) -> Tensor:
    """Pixels of a labelled region within ``width`` of another label or of the image border."""
    padded = F.pad(labels, (width, width, width, width), value=0.0)
    size = 2 * width + 1
    high = F.max_pool2d(padded, size, stride=1)
    low = -F.max_pool2d(-padded, size, stride=1)
    return (labels > 0) & ((high != labels) | (low != labels))


def _upscale(x: Tensor, scale: int) -> Tensor:
    return x if scale == 1 else x.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def _name(index: int, class_names: Optional[Sequence[str]]) -> str:
    if class_names is not None and 0 <= index < len(class_names):
        name = str(class_names[index])
        return f"{index} {name[:22] + '…' if len(name) > 23 else name}"
    return str(index)


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
    """Draw mixes as one image, a row per sample: ``x_A`` + heatmap + outline, ``x_B``, mixed, label.

    Args:
        partners: ``(B, C, H, W)`` pasted images ``x_A`` (``images[p]``), C in {1, 3}; uint8, or
            float normalised with ``mean``/``std`` (or in [0, 1] when they are ``None``).
        canvases: ``(B, C, H, W)`` images ``x_B`` the partners were pasted onto.
        mixed: ``(B, C, H, W)`` mixed images.
        lam: ``(B,)`` fraction of each mixed image taken from the partner.
        partner_labels: ``y_A`` as class indices ``(B,)`` or probabilities ``(B, K)`` (argmax shown).
        canvas_labels: ``y_B``, as ``partner_labels``.
        partner_heatmaps: ``(B, gh, gw)`` attention of each partner, overlaid on ``x_A`` (min-max
            scaled per sample, "jet" colormap).
        mask: ``(B, 1, H, W)`` boolean pasted region, outlined on ``x_A`` (``None`` for Mixup).
        class_names: names shown next to the class indices.
        mean: the per-channel mean the float images were normalised with.
        std: the per-channel std the float images were normalised with.
        max_samples: rows drawn (the first ``max_samples`` samples).
        alpha: opacity of the heatmap overlay, in [0, 1].
        scale: integer upscaling of the images; by default the smallest one that makes them at
            least 96 px (1 for 224 px images).
        outline_color: RGB colour of the outline.

    Returns:
        ``(3, H', W')`` uint8 image (CHW, as ``SummaryWriter.add_image`` and ``write_png`` take).

    Raises:
        ValueError: for shapes that do not match or arguments out of range.

    Example::

        >>> images = torch.rand(4, 3, 32, 32)  # upscaled x3 to 96 px panels
        >>> grid = render_mix_grid(images.roll(1, 0), images, images, torch.zeros(4), max_samples=2)
        >>> grid.dtype, grid.shape[0], grid.shape[1] > 2 * 96
        (torch.uint8, 3, True)
    """
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"Expected `max_samples` to be a positive int, but got {max_samples!r}.")
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
        shape = tuple(lam.shape) if isinstance(lam, Tensor) else type(lam).__name__
        raise ValueError(f"Expected `lam` to have shape ({batch},), but got {shape}.")
    if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != (batch, 1, height, width)):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"Expected `mask` to have shape ({batch}, 1, {height}, {width}), but got {shape}.")
    if partner_heatmaps is not None:
        AF._check_heatmaps(partner_heatmaps, batch)
    y_a = _labels(partner_labels, "partner_labels", batch)
    y_b = _labels(canvas_labels, "canvas_labels", batch)

    n = min(max_samples, batch)
    x_a, x_b, x_m = x_a[:n], x_b[:n], x_m[:n]
    scale = scale if scale is not None else max(1, math.ceil(_MIN_PANEL / max(height, width)))
    panel_h, panel_w = height * scale, width * scale
    grid: Optional[tuple[int, int]] = None
    if partner_heatmaps is not None:
        heat = partner_heatmaps[:n].detach().cpu().float().nan_to_num(0.0)
        grid = (heat.shape[1], heat.shape[2])
        low = heat.flatten(1).amin(dim=1).view(n, 1, 1)
        high = heat.flatten(1).amax(dim=1).view(n, 1, 1)
        heat = (heat - low) / (high - low).clamp_min(1e-12)
        x_a = (1.0 - alpha) * x_a + alpha * _jet(AF.expand_grid(heat, (height, width)))
    x_a, x_b, x_m = (_upscale(x, scale) for x in (x_a, x_b, x_m))
    if mask is not None:
        labels = _upscale(_cell_labels(mask[:n].detach().cpu().bool(), grid), scale)
        edge = _outline(labels, width=max(1, round(max(panel_h, panel_w) / 112)))
        color = torch.tensor(outline_color, dtype=torch.float32).view(1, 3, 1, 1) / 255.0
        x_a = torch.where(edge, color, x_a)

    from PIL import ImageDraw, ImageFont
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(to_pil_image(torch.zeros(3, 1, 1)))
    line_h = measure.textbbox((0, 0), "Ag", font=font)[3] + 3
    lam_list = lam[:n].detach().cpu().float().tolist()
    texts = []
    for i, weight in enumerate(lam_list):
        lines = [f"lam = {weight:.3f}"]
        if y_a is not None:
            lines.append(f"{weight:.2f} x A: {_name(y_a[i], class_names)}")
        if y_b is not None:
            lines.append(f"{1 - weight:.2f} x B: {_name(y_b[i], class_names)}")
        texts.append(lines)
    pad = 2
    text_w = max([panel_w] + [int(measure.textlength(line, font=font)) + 2 * pad for lines in texts for line in lines])
    header_h = line_h + pad

    def strip(w: int) -> Tensor:
        return torch.full((n, 3, panel_h, w), _BACKGROUND)

    rows = torch.cat([strip(pad), x_a, strip(pad), x_b, strip(pad), x_m, strip(pad), strip(text_w + pad)], dim=3)
    rows = F.pad(rows, (0, 0, 0, pad), value=_BACKGROUND)
    body = rows.permute(1, 0, 2, 3).reshape(3, n * (panel_h + pad), rows.shape[-1])
    canvas = torch.cat([torch.full((3, header_h, body.shape[-1]), _BACKGROUND), body], dim=1)

    image = to_pil_image((canvas * 255.0).round().to(torch.uint8))
    draw = ImageDraw.Draw(image)
    starts = [pad + column * (panel_w + pad) for column in range(4)]
    for start, title in zip(starts, _TITLES, strict=True):
        draw.text((start, 1), title, fill=(230, 230, 230), font=font)
    for i, lines in enumerate(texts):
        top = header_h + i * (panel_h + pad)
        for j, line in enumerate(lines):
            draw.text((starts[3] + pad, top + pad + j * line_h), line, fill=(255, 255, 255), font=font)
    return pil_to_tensor(image)


def render_mix(
    result: MixResult,
    *,
    class_names: Optional[Sequence[str]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    max_samples: int = 8,
    alpha: float = 0.5,
    scale: Optional[int] = None,
) -> Tensor:
    """:func:`render_mix_grid` of a :class:`~lightning_acm.callbacks.MixResult` that kept its ``source``.

    ``x_B`` is ``result.source`` and ``x_A`` is ``result.source[result.permutation]``; labels come
    from ``result.source_targets``. A mixing callback fills ``source`` only when its ``keep_source``
    is set (:class:`MixVisualizer` sets it).

    Raises:
        ValueError: if ``result.source`` is ``None``.
    """
    if result.source is None:
        raise ValueError(
            "Expected `result.source` (the batch before mixing) to render the partners, but got None."
            " Set `keep_source = True` on the mixing callback (MixVisualizer does it in `setup`)."
        )
    _check_positive(max_samples, "max_samples")
    n = min(max_samples, result.source.shape[0])
    permutation = result.permutation[:n].to(result.source.device)
    targets = result.source_targets
    return render_mix_grid(
        result.source[permutation],
        result.source[:n],
        result.mixed[:n],
        result.lam[:n],
        partner_labels=targets[permutation] if targets is not None else None,
        canvas_labels=targets[:n] if targets is not None else None,
        partner_heatmaps=result.partner_heatmaps[:n] if result.partner_heatmaps is not None else None,
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


def _check_positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive int, but got {value!r}.")


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
    have no heatmaps (CutMix), by running the teacher on the unmixed batch (the mixing callback
    keeps it: this sets its ``keep_source``). That is one extra teacher forward per measured
    batch, so it is opt-in and ``every_n_steps`` thins it out. It also lends the heatmaps to
    :class:`MixVisualizer`, whose CutMix rows then show the partner's attention.

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
        self.grid_size = AF._pair(grid_size, "grid_size")
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
        # The results whose heatmaps this monitor computed (the mixer did not measure them itself).
        self._annotated: weakref.WeakValueDictionary[int, MixResult] = weakref.WeakValueDictionary()

    @staticmethod
    def _needs_teacher(mixer: MixingCallback) -> bool:
        return not isinstance(mixer, (AttentiveCutMix, MixUp))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._mixers = [mixer for mixer in _mixing_callbacks(trainer, type(self).__name__) if self._needs_teacher(mixer)]
        if not self._mixers:
            rank_zero_warn(
                f"{type(self).__name__}: the mixing callbacks (Attentive CutMix, Mixup) log `pasted_attention`"
                " themselves, so this callback has nothing to measure. Remove it, or use it with CutMix."
            )
            return
        for mixer in self._mixers:
            mixer.keep_source = True
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

    def annotate(self, result: MixResult) -> Optional[Tensor]:
        """Fill ``result.partner_heatmaps`` from the teacher if it is missing; return them (or ``None``).

        Needs ``result.source`` (set by mixing callbacks whose ``keep_source`` is on).
        """
        if result.partner_heatmaps is not None or result.source is None or self._attention is None:
            return result.partner_heatmaps
        heatmaps = run_attention(self._attention, result.source)
        result.partner_heatmaps = heatmaps[result.permutation.to(heatmaps.device)]
        self._annotated[id(result)] = result
        return result.partner_heatmaps

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        due = self._count_batch()
        if not due:
            return
        for mixer in self._mixers:
            result = mixer.last_mix
            if result is None or not result.has_region:
                continue
            measured_by_mixer = result.partner_heatmaps is not None and self._annotated.get(id(result)) is not result
            if measured_by_mixer:
                continue
            if self.annotate(result) is None:
                continue
            share = result.pasted_attention()
            if share is not None:
                mixer.record_pasted_attention(share)  # logged by the mixer at the end of the epoch

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._given_model is None:
            self._attention = None


class MixVisualizer(_EveryNSteps):
    """Log a picture of the mixed batch every ``every_n_steps`` training batches (rank zero only).

    One image per mixing callback in the Trainer (see :func:`render_mix_grid` for what it
    shows), tagged ``{log_prefix}/mixes``: written with ``experiment.add_image`` to every logger
    that has it (TensorBoard), otherwise saved as ``{trainer.log_dir}/mixes/{log_prefix}_step{N}.png``
    (CSVLogger, or ``default_root_dir`` without a logger). A due picture waits for the next batch
    that is mixed (``p < 1``). The mixing callback must keep the unmixed batch for ``x_A`` and
    ``x_B``: this sets its ``keep_source`` on rank zero (one batch of images held until the next).
    CutMix rows show the partner's attention when a :class:`PastedAttentionMonitor` is also used.

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
        if trainer.is_global_zero:
            for mixer in self._mixers:
                mixer.keep_source = True

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
            if not self._pending[index] or result is None or result.source is None:
                continue
            for monitor in self._monitors:
                monitor.annotate(result)
            mean, std = self._normalization
            image = render_mix(
                result, class_names=self._names, mean=mean, std=std, max_samples=self.max_samples, alpha=self.alpha
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
        from torchvision.transforms.functional import to_pil_image

        os.makedirs(self._png_dir, exist_ok=True)
        name = f"{tag.replace('/', '_')}_step{trainer.global_step:07d}.png"
        to_pil_image(image).save(os.path.join(self._png_dir, name))
