"""Pure tensor ops for Attentive CutMix, CutMix and Mixup (no Lightning import).

* images are ``(B, C, H, W)``, heatmaps ``(B, gh, gw)``, masks boolean ``(B, 1, H, W)``.
* ``permutation`` ``p`` pairs sample ``i`` (the canvas) with its *partner* ``images[p[i]]`` (pasted in).
* ``lam[i]`` (float32) is the fraction of ``mixed[i]`` from the partner: a paste is
  ``mask * images[p] + (1 - mask) * images`` (gradients flow to both), a blend uses ``lam`` as the mask,
  and ``soft_targets[i] = lam[i] * y[p[i]] + (1 - lam[i]) * y[i]``.
* targets are class indices ``(B,)`` or ``(B, 1)`` (with ``num_classes``) or float probabilities ``(B, K)``.
* randomness comes from a ``numpy.random.Generator`` (the same mixes on every device); without one, a
  generator is seeded from torch's global RNG.
* the mixing ops take ``num_classes``, ``permutation`` (a :func:`pairing_permutation` when ``None``),
  ``generator`` and ``label_smoothing`` (``eps``: ``y`` becomes ``(1 - eps) * y + eps / K``) and return
  ``(mixed, soft_targets (B, K), lam (B,))``.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_acm import validation as V
from lightning_acm.validation import Size2

__all__ = [
    "attention_grid",
    "attentive_cutmix",
    "cutmix",
    "cutmix_box_mask",
    "mix_targets",
    "mix_with_mask",
    "mixup",
    "pairing_permutation",
    "paste",
    "pasted_attention_share",
    "sample_beta",
    "topk_cell_indices",
    "topk_cell_mask",
]

Rng = np.random.Generator
Generator = Optional[Rng]
Device = Optional[torch.device]
Mixed = tuple[Tensor, Tensor, Tensor]


def _rng(generator: Generator) -> Rng:
    """``generator``, or a new one seeded from torch's global RNG (so ``torch.manual_seed`` controls it)."""
    if generator is None:
        return np.random.default_rng(int(torch.randint(0, 2**62, ())))
    return V.check_generator(generator)


def pairing_permutation(batch_size: int, *, generator: Generator = None, device: Device = None) -> Tensor:
    """Draw a pairing ``p`` of ``range(batch_size)``: a uniform single cycle, so ``p[i] != i`` when ``batch_size > 1``.

    Example::

        >>> sorted(pairing_permutation(5, generator=np.random.default_rng(0)).tolist())
        [0, 1, 2, 3, 4]
    """
    batch_size = V.check_int(batch_size, "batch_size", minimum=1)
    order = _rng(generator).permutation(batch_size)
    permutation = np.roll(order, -1)[np.argsort(order)]  # p[order[i]] = order[i + 1]
    return torch.from_numpy(permutation.astype(np.int64)).to(device)


def sample_beta(alpha: float, size: int, *, generator: Generator = None, device: Device = None) -> Tensor:
    """Draw ``size`` samples of ``Beta(alpha, alpha)`` as float32.

    Example::

        >>> sample_beta(1.0, 3, generator=np.random.default_rng(0)).shape
        torch.Size([3])
    """
    alpha = V.check_beta_alpha(alpha)
    return torch.from_numpy(_rng(generator).beta(alpha, alpha, size)).float().to(device)


def attention_grid(features: Tensor, grid_size: Size2 = 7, reduction: Literal["mean", "max"] = "mean") -> Tensor:
    """Reduce ``(B, C, h, w)`` features over channels (``"mean"``, the paper, or ``"max"``) to ``(B, gh, gw)``,
    averaging the feature cells that each grid cell covers (the grid may not be finer); the dtype is kept.

    Example::

        >>> attention_grid(torch.rand(2, 2048, 14, 14), grid_size=7).shape
        torch.Size([2, 7, 7])
    """
    (gh, gw), (h, w) = V.check_features(features, grid_size), features.shape[-2:]
    V.check_reduction(reduction)
    reduced = features.mean(dim=1, keepdim=True) if reduction == "mean" else features.amax(dim=1, keepdim=True)
    return (reduced if (gh, gw) == (h, w) else F.adaptive_avg_pool2d(reduced, (gh, gw))).squeeze(1)


def _expand_grid(grids: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Nearest-cell upsampling of ``(B, gh, gw)`` to ``(B, 1, H, W)``: pixel row ``r`` in cell row ``r * gh // H``."""
    (gh, gw), (height, width) = grids.shape[1:], image_size
    rows = torch.arange(height, device=grids.device) * gh // height
    cols = torch.arange(width, device=grids.device) * gw // width
    return grids.index_select(1, rows).index_select(2, cols).unsqueeze(1)


def topk_cell_indices(heatmaps: Tensor, top_k: int) -> Tensor:
    """Row-major indices ``r * gw + c`` ``(B, top_k)`` of the ``top_k`` highest cells of each heatmap, hottest first.

    Ties go to the cell first in row-major order and NaN ranks below every number.

    Example::

        >>> topk_cell_indices(torch.tensor([[[0.1, 0.9], [0.5, 0.5]]]), top_k=3)
        tensor([[1, 2, 3]])
    """
    V.check_heatmaps(heatmaps)
    top_k = V.check_top_k(top_k, heatmaps.shape[1:])
    scores = heatmaps.flatten(1).double()
    is_nan = scores.isnan()
    order = torch.sort(scores.masked_fill(is_nan, -math.inf), dim=1, descending=True, stable=True).indices
    nan_last = torch.sort(is_nan.gather(1, order).byte(), dim=1, stable=True).indices
    return order.gather(1, nan_last)[:, :top_k]


def _cell_mask(cell_indices: Tensor, grid: tuple[int, int], image_size: Size2) -> Tensor:
    """``(B, 1, H, W)`` bool union of the ``(B, k)`` row-major cells; raises if the image is smaller than the grid."""
    chosen = torch.zeros(cell_indices.shape[0], grid[0] * grid[1], dtype=torch.bool, device=cell_indices.device)
    chosen.scatter_(1, cell_indices.long(), True)
    return _expand_grid(chosen.view(-1, *grid), V.check_image_size(image_size, grid))


def topk_cell_mask(heatmaps: Tensor, top_k: int, image_size: Size2) -> Tensor:
    """``(B, 1, H, W)`` bool union of the ``top_k`` hottest cells (:func:`topk_cell_indices`) of each heatmap; the
    grid tiles the image as evenly as it can, pixel row ``r`` in cell row ``r * gh // H`` (columns alike).

    Example::

        >>> topk_cell_mask(torch.tensor([[[0.0, 0.0], [1.0, 0.0]]]), top_k=1, image_size=(2, 4))[0, 0].int().tolist()
        [[0, 0, 0, 0], [1, 1, 0, 0]]
    """
    return _cell_mask(topk_cell_indices(heatmaps, top_k), heatmaps.shape[1:], image_size)


def _mask_share(mask: Tensor) -> Tensor:
    """``(B,)`` float32 share of each mask that is set; a float64 quotient rounds alike on every device."""
    flat = mask.flatten(1)
    return (flat.sum(1, dtype=torch.float64) / flat.shape[1]).float()


def _box_mask(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``(B, 1, H, W)`` bool mask inside ``(B, 4)`` boxes ``(top, bottom, left, right)``, bottom/right exclusive."""
    top, bottom, left, right = boxes.unsqueeze(2).unbind(1)
    rows, cols = (torch.arange(n, device=boxes.device) for n in image_size)
    in_rows, in_cols = (rows >= top) & (rows < bottom), (cols >= left) & (cols < right)
    return (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).unsqueeze(1)


def _cutmix_boxes(area: np.ndarray, image_size: tuple[int, int], generator: Rng) -> Tensor:
    """``(B, 4)`` int64 boxes of the image's aspect ratio and ``area``, centred uniformly, clipped to the border."""
    (height, width), side = image_size, np.sqrt(np.clip(area, 0.0, 1.0)) / 2
    centre_y, centre_x = generator.uniform(0, height, area.shape[0]), generator.uniform(0, width, area.shape[0])
    bounds = [centre_y - side * height, centre_y + side * height, centre_x - side * width, centre_x + side * width]
    boxes = np.clip(np.round(np.stack(bounds, axis=1)), 0, [height, height, width, width])
    return torch.from_numpy(boxes.astype(np.int64))


def cutmix_box_mask(
    batch_size: int, image_size: Size2, area: Tensor, *, generator: Generator = None, device: Device = None
) -> Tensor:
    """One box per sample, ``(B, 1, H, W)`` bool, of the image's aspect ratio and ``area[i]`` of its size,
    centred uniformly over the image and clipped at the border (``lam`` is the mask's mean).

    Example::

        >>> cutmix_box_mask(2, 8, torch.tensor([0.0, 0.5]), generator=np.random.default_rng(0)).shape
        torch.Size([2, 1, 8, 8])
    """
    size = V.check_size2(image_size, "image_size")
    V.check_shape(area, "area", (batch_size,))
    return _box_mask(_cutmix_boxes(area.detach().cpu().double().numpy(), size, _rng(generator)).to(device), size)


def paste(images: Tensor, mask: Tensor, permutation: Tensor) -> Tensor:
    """``mixed[i] = where(mask[i], images[p[i]], images[i])``, ``mask`` boolean and broadcastable to ``images``.

    Example::

        >>> images = torch.stack([torch.zeros(1, 1, 2), torch.ones(1, 1, 2)])
        >>> paste(images, torch.tensor([True, False]).view(1, 1, 1, 2), torch.tensor([1, 0]))[:, 0, 0].tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    V.check_images(images)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError("Expected `mask` to be a boolean tensor broadcastable to `images`, e.g. (B, 1, H, W).")
    return torch.where(mask, images.index_select(0, V.check_permutation(permutation, images.shape[0])), images)


def _probabilities(targets: Tensor, num_classes: Optional[int], label_smoothing: float) -> Tensor:
    """Targets checked by ``check_targets`` as float probabilities ``(B, K)``, smoothed by ``label_smoothing``."""
    if targets.ndim == 1:
        probabilities = F.one_hot(targets.long(), int(num_classes)).float()  # type: ignore[arg-type]
    else:
        probabilities = targets.to(torch.promote_types(targets.dtype, torch.float32))
    if label_smoothing > 0:
        probabilities = probabilities * (1.0 - label_smoothing) + label_smoothing / probabilities.shape[1]
    return probabilities


def _mix_targets(
    targets: Tensor, lam: Tensor, permutation: Tensor, num_classes: Optional[int], label_smoothing: float
) -> Tensor:
    """:func:`mix_targets` for targets checked by ``check_targets``."""
    probabilities = _probabilities(targets, num_classes, label_smoothing)
    weight = lam.to(probabilities.device, probabilities.dtype).unsqueeze(1)
    return weight * probabilities.index_select(0, permutation) + (1.0 - weight) * probabilities


def mix_targets(
    targets: Tensor, lam: Tensor, permutation: Tensor, num_classes: Optional[int] = None, label_smoothing: float = 0.0
) -> Tensor:
    """``soft[i] = lam[i] * y[p[i]] + (1 - lam[i]) * y[i]``, ``y`` the targets as float probabilities ``(B, K)``.

    Targets are class indices ``(B,)`` or ``(B, 1)`` in ``[0, num_classes)``, or probabilities ``(B, K)`` whose
    rows sum to 1 within ``max(0.01, 4 * eps)`` of their dtype.

    Example::

        >>> mix_targets(torch.tensor([0, 2]), torch.tensor([0.25, 0.5]), torch.tensor([1, 0]), 3).tolist()
        [[0.75, 0.0, 0.25], [0.5, 0.0, 0.5]]
    """
    targets = V.check_labels(targets, num_classes, lam.shape[0], label_smoothing)
    permutation = V.check_permutation(permutation, lam.shape[0])
    return _mix_targets(targets, lam, permutation.to(targets.device), num_classes, label_smoothing)


def mix_with_mask(
    images: Tensor,
    targets: Tensor,
    mask: Tensor,
    permutation: Tensor,
    num_classes: Optional[int] = None,
    label_smoothing: float = 0.0,
) -> Mixed:
    """:func:`paste` ``images[p]`` inside ``mask``, ``lam`` the mask's mean: ``(mixed, soft_targets, lam)``.

    Example::

        >>> mask = torch.arange(16).view(1, 1, 4, 4) < 4  # the top row, for both images
        >>> mix_with_mask(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), mask, torch.tensor([1, 0]), 2)[2]
        tensor([0.2500, 0.2500])
    """
    mixed, lam = paste(images, mask, permutation), _mask_share(mask.expand(images.shape[0], 1, *images.shape[-2:]))
    return mixed, mix_targets(targets, lam, permutation, num_classes, label_smoothing=label_smoothing), lam


def _prepare(
    images: Tensor,
    targets: Tensor,
    num_classes: Optional[int],
    permutation: Optional[Tensor],
    generator: Generator,
    eps: float,
) -> tuple[Tensor, Tensor, Rng]:
    """The mixing ops' checks and pairing: ``(targets, permutation, generator)``."""
    V.check_images(images)
    targets, generator = V.check_labels(targets, num_classes, images.shape[0], eps), _rng(generator)
    if permutation is None:
        return targets, pairing_permutation(images.shape[0], generator=generator, device=images.device), generator
    return targets, V.check_permutation(permutation, images.shape[0]).to(images.device), generator


def _paste_topk_cells(images: Tensor, partner_heatmaps: Tensor, top_k: int, permutation: Tensor) -> tuple[Tensor, ...]:
    """Paste the ``top_k`` hottest cells of ``partner_heatmaps[i]``: ``(mixed, lam, cells, mask (B, 1, H, W))``."""
    cells = topk_cell_indices(partner_heatmaps.to(images.device), top_k)
    mask = _cell_mask(cells, partner_heatmaps.shape[1:], images.shape[2:])
    return torch.where(mask, images.index_select(0, permutation), images), _mask_share(mask), cells, mask


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
) -> Mixed:
    """Attentive CutMix (Walawalkar et al., 2020): ``mixed[i]`` is ``images[p[i]]`` inside the ``top_k`` hottest
    cells of ``heatmaps[p[i]]`` (the attention of the pasted image) and ``images[i]`` outside.

    Example::

        >>> images, heatmaps = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)]), torch.eye(2).expand(2, 2, 2)
        >>> mixed, soft, lam = attentive_cutmix(
        ...     images, torch.tensor([0, 1]), heatmaps, top_k=1, num_classes=2, permutation=torch.tensor([1, 0]))
        >>> mixed[0, 0].tolist(), lam.tolist(), soft[0].tolist()  # image 1's top-left cell (first of a tie) on image 0
        ([[1.0, 0.0], [0.0, 0.0]], [0.25, 0.25], [0.75, 0.25])
    """
    targets, permutation, _ = _prepare(images, targets, num_classes, permutation, generator, label_smoothing)
    V.check_heatmaps(heatmaps, images.shape[0])
    mixed, lam, _, _ = _paste_topk_cells(images, heatmaps.to(images.device)[permutation], top_k, permutation)
    return mixed, _mix_targets(targets, lam, permutation, num_classes, label_smoothing), lam


def _cutmix_paste(images: Tensor, permutation: Tensor, alpha: float, generator: Rng) -> tuple[Tensor, ...]:
    """Draw CutMix's boxes (areas, then centres) and paste them: ``(mixed, lam, boxes (B, 4), mask (B, 1, H, W))``."""
    size = (images.shape[2], images.shape[3])
    boxes = _cutmix_boxes(generator.beta(alpha, alpha, images.shape[0]), size, generator).to(images.device)
    mask = _box_mask(boxes, size)
    return torch.where(mask, images.index_select(0, permutation), images), _mask_share(mask), boxes, mask


def cutmix(
    images: Tensor,
    targets: Tensor,
    *,
    alpha: float = 1.0,
    num_classes: Optional[int] = None,
    permutation: Optional[Tensor] = None,
    generator: Generator = None,
    label_smoothing: float = 0.0,
) -> Mixed:
    """CutMix (Yun et al., 2019): paste one box of each partner, of area ``~ Beta(alpha, alpha)`` and
    uniform centre; ``lam`` is the pasted fraction after clipping at the border.

    Example::

        >>> mixed, soft, lam = cutmix(torch.rand(8, 3, 32, 32), torch.arange(8), num_classes=8)
        >>> torch.allclose(soft.sum(1), torch.ones(8))
        True
    """
    alpha = V.check_beta_alpha(alpha)
    targets, permutation, rng = _prepare(images, targets, num_classes, permutation, generator, label_smoothing)
    mixed, lam, _, _ = _cutmix_paste(images, permutation, alpha, rng)
    return mixed, _mix_targets(targets, lam, permutation, num_classes, label_smoothing), lam


def _mixup_blend(images: Tensor, permutation: Tensor, alpha: float, generator: Rng) -> tuple[Tensor, Tensor]:
    """Draw Mixup's ``lam`` and blend: ``(lam * images[p] + (1 - lam) * images, lam)``."""
    if not images.is_floating_point():
        raise TypeError(
            f"Expected floating-point `images` for mixup, but got dtype {images.dtype}."
            " Convert the batch first, e.g. `images.float() / 255`."
        )
    lam = torch.from_numpy(generator.beta(alpha, alpha, images.shape[0])).float().to(images.device)
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
) -> Mixed:
    """Mixup (Zhang et al., 2018): ``mixed[i] = lam[i] * images[p[i]] + (1 - lam[i]) * images[i]``,
    ``lam ~ Beta(alpha, alpha)`` per sample; the images must be floating-point.

    Example::

        >>> mixed, soft, lam = mixup(torch.rand(8, 3, 32, 32), torch.arange(8), num_classes=8)
        >>> mixed.shape, lam.shape
        (torch.Size([8, 3, 32, 32]), torch.Size([8]))
    """
    alpha = V.check_beta_alpha(alpha)
    targets, permutation, rng = _prepare(images, targets, num_classes, permutation, generator, label_smoothing)
    mixed, lam = _mixup_blend(images, permutation, alpha, rng)
    return mixed, _mix_targets(targets, lam, permutation, num_classes, label_smoothing), lam


def pasted_attention_share(partner_heatmaps: Tensor, mask: Tensor) -> Tensor:
    """Share ``(B,)`` of each partner's attention inside the pasted ``mask`` ``(B, 1, H, W)``, the heatmaps shifted to a
    minimum of 0 and spread over their cells' pixels (a constant heatmap gives the pasted area).

    Example::

        >>> heat = torch.tensor([[[3.0, 1.0], [1.0, 1.0]]])
        >>> pasted_attention_share(heat, topk_cell_mask(heat, 1, 2))
        tensor([1.])
    """
    V.check_heatmaps(partner_heatmaps, mask.shape[0])
    size = V.check_image_size(mask.shape[-2:], partner_heatmaps.shape[1:])
    dense = _expand_grid(partner_heatmaps.float().nan_to_num(0.0), size).flatten(1)
    dense, inside = dense - dense.amin(dim=1, keepdim=True), mask.flatten(1)
    total = dense.sum(dim=1)
    share = (dense * inside).sum(dim=1) / total.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(total > 0, share, _mask_share(inside))
