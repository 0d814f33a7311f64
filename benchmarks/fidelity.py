"""Measurement helpers of the benchmarks that the library itself never calls: rendering a recorded augmentation
and comparing the top-k cells of two heatmaps."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_acm.cache import _check_geometry
from lightning_acm.functional import topk_cell_indices
from lightning_acm.validation import Size2, check_heatmaps, check_images, check_size2, check_top_k


def apply_geometry(
    images: Tensor, geometry: Tensor, output_size: Optional[Size2] = None, *, padding_value: float = 0.0
) -> Tensor:
    """The augmented views ``(B, C, h, w)`` of ``(B, C, H, W)`` ``images`` that ``geometry`` describes.

    Args:
        images, geometry: as in :func:`lightning_acm.cache.warp_heatmaps`, ``(B, 6)`` or ``(B, 5)``.
        output_size: ``(h, w)`` or ``h`` (``None``: the images' size); padding_value: the value outside the image
            (``-mean / std`` for images normalised after zero padding).

    Raises:
        ValueError: if the shapes do not match.
    """
    check_images(images)
    y0, x0, y1, x1, flipped = _check_geometry(geometry, images.shape[0]).to(images.device).unbind(1)
    height, width = images.shape[-2:] if output_size is None else check_size2(output_size, "output_size")
    sign, zero, h, w = 1.0 - 2.0 * (flipped > 0.5).float(), torch.zeros_like(y0), y1 - y0, x1 - x0
    theta = torch.stack([sign * w, zero, 2 * x0 + w - 1, zero, h, 2 * y0 + h - 1], 1).view(-1, 2, 3)
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], height, width], align_corners=False)
    out = F.grid_sample(images.float() - padding_value, grid, align_corners=False)  # bilinear, zero padding
    return (out + padding_value).to(images.dtype)


def topk_overlap(heatmaps: Tensor, reference: Tensor, top_k: int) -> Tensor:
    """Intersection over union ``(B,)`` of the ``top_k`` cells (as ``topk_cell_indices`` picks them) of two heatmaps.

    Raises:
        ValueError: if the shapes differ or ``top_k`` is out of range.
    """
    check_heatmaps(heatmaps)
    check_heatmaps(reference, heatmaps.shape[0])
    if heatmaps.shape != reference.shape:
        shapes = f"{tuple(heatmaps.shape)} and {tuple(reference.shape)}"
        raise ValueError(f"Expected `heatmaps` and `reference` to have the same shape, but got {shapes}.")
    check_top_k(top_k, tuple(heatmaps.shape[1:]))
    first, second = (
        torch.zeros_like(maps.flatten(1), dtype=torch.bool).scatter_(1, topk_cell_indices(maps, top_k), True)
        for maps in (heatmaps, reference.to(heatmaps.device))
    )
    return (first & second).sum(1).float() / (first | second).sum(1).float()
