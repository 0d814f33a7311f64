"""Tests for ``lightning_acm.functional``: grids, masks, pairing, Attentive CutMix, CutMix and Mixup.

Expected masks are built by explicit slicing loops (``reference_topk_mask``) and the vectorized
``attentive_cutmix`` is compared with a per-sample loop (``reference_attentive_cutmix``). Images
that are a distinct constant per sample (``constant_images``) tell where every mixed pixel came from.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from lightning_acm.functional import (
    _cell_mask,
    _expand_grid,
    _paste_topk_cells,
    _probabilities,
    attention_grid,
    attentive_cutmix,
    cutmix,
    cutmix_box_mask,
    mix_targets,
    mixup,
    pairing_permutation,
    paste,
    pasted_attention_share,
    sample_beta,
    topk_cell_indices,
    topk_cell_mask,
)

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
TOLERANCES = {
    torch.float16: {"rtol": 1e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1e-2, "atol": 2e-2},
    torch.float32: {"rtol": 1.3e-6, "atol": 1e-5},
    torch.float64: {"rtol": 1e-7, "atol": 1e-7},
}
NAN, INF = float("nan"), float("inf")


def rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator for the ops, seeded like the test's torch generator."""
    return np.random.default_rng(generator.initial_seed())


# --------------------------------------------------------------------------- reference implementation


def cell_bounds(cells: int, pixels: int) -> list[tuple[int, int]]:
    """Pixel range ``[start, stop)`` of each cell: pixel ``r`` lies in cell ``floor(r * cells / pixels)``."""
    return [(-(-j * pixels // cells), -(-(j + 1) * pixels // cells)) for j in range(cells)]


def ranked_cells(heatmap: torch.Tensor) -> list[int]:
    """Row-major cell indices, highest first; ties keep row-major order and NaN ranks last."""
    values = heatmap.flatten().tolist()
    return sorted(range(len(values)), key=lambda i: (1, 0.0, i) if math.isnan(values[i]) else (0, -values[i], i))


def reference_topk_mask(heatmaps: torch.Tensor, top_k: int, image_size: tuple[int, int]) -> torch.Tensor:
    batch, gh, gw = heatmaps.shape
    height, width = image_size
    rows, cols = cell_bounds(gh, height), cell_bounds(gw, width)
    mask = torch.zeros(batch, 1, height, width, dtype=torch.bool)
    for b in range(batch):
        for cell in ranked_cells(heatmaps[b])[:top_k]:
            (r0, r1), (c0, c1) = rows[cell // gw], cols[cell % gw]
            mask[b, 0, r0:r1, c0:c1] = True
    return mask


def reference_attentive_cutmix(
    images: torch.Tensor, probabilities: torch.Tensor, heatmaps: torch.Tensor, top_k: int, permutation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample at a time: paste the ``top_k`` cells of the partner's heatmap onto the canvas."""
    mixed, soft, lam = images.clone(), [], []
    height, width = images.shape[-2:]
    for i, j in enumerate(permutation.tolist()):
        mask = reference_topk_mask(heatmaps[j : j + 1], top_k, (height, width))[0, 0]
        mixed[i][:, mask] = images[j][:, mask]
        fraction = mask.sum().item() / (height * width)
        lam.append(fraction)
        soft.append(fraction * probabilities[j] + (1 - fraction) * probabilities[i])
    return mixed, torch.stack(soft), torch.tensor(lam)


def constant_images(batch: int, height: int, width: int, channels: int = 3, dtype=torch.float32) -> torch.Tensor:
    """Sample ``i`` is the constant ``i + 1``, so every mixed pixel tells which image it came from."""
    values = torch.arange(1, batch + 1, dtype=dtype).view(batch, 1, 1, 1)
    return values.expand(batch, channels, height, width).contiguous()


def is_rectangle(mask: torch.Tensor) -> bool:
    """Whether a 2-D boolean mask is empty or a single axis-aligned rectangle."""
    rows, cols = mask.any(dim=1), mask.any(dim=0)
    if not rows.any():
        return True
    r, c = rows.nonzero().flatten(), cols.nonzero().flatten()
    contiguous = int(r[-1] - r[0]) + 1 == r.numel() and int(c[-1] - c[0]) + 1 == c.numel()
    return contiguous and torch.equal(mask, rows[:, None] & cols[None, :])


def one_hot_heatmap(grid: tuple[int, int], *cells: tuple[int, int]) -> torch.Tensor:
    """A ``(1, gh, gw)`` heatmap whose listed cells are hottest, in decreasing order."""
    heatmap = torch.zeros(1, *grid)
    for rank, (r, c) in enumerate(cells):
        heatmap[0, r, c] = len(cells) - rank
    return heatmap


# --------------------------------------------------------------------------- attention_grid


def test_attention_grid_mean_and_max_reduction():
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[3.0, 0.0], [5.0, -4.0]]]])
    torch.testing.assert_close(attention_grid(features, 2, "mean"), torch.tensor([[[2.0, 1.0], [4.0, 0.0]]]))
    torch.testing.assert_close(attention_grid(features, 2, "max"), torch.tensor([[[3.0, 2.0], [5.0, 4.0]]]))


def test_attention_grid_pools_blocks_to_the_grid():
    features = torch.arange(24.0).view(1, 1, 4, 6)
    expected = torch.tensor([[[3.5, 5.5, 7.5], [15.5, 17.5, 19.5]]])
    torch.testing.assert_close(attention_grid(features, (2, 3)), expected)
    torch.testing.assert_close(attention_grid(features, [2, 3]), expected)
    torch.testing.assert_close(attention_grid(features.expand(3, 5, 4, 6), (2, 3), "max"), expected.expand(3, 2, 3))


def test_attention_grid_identity_when_grid_equals_map(generator):
    features = torch.rand(2, 16, 7, 7, generator=generator)
    torch.testing.assert_close(attention_grid(features, 7), features.mean(1))
    torch.testing.assert_close(attention_grid(features, 7, "max"), features.amax(1))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_attention_grid_keeps_dtype(dtype, generator):
    features = torch.rand(2, 8, 14, 14, generator=generator).to(dtype)
    grid = attention_grid(features, 7)
    assert grid.dtype == dtype and grid.shape == (2, 7, 7)
    expected = F.avg_pool2d(features.double().mean(1, keepdim=True), 2).squeeze(1)
    torch.testing.assert_close(grid.double(), expected, **TOLERANCES[dtype])


# --------------------------------------------------------------------------- topk_cell_mask


def test_topk_mask_is_the_union_of_the_top_cells_224():
    cells = [(0, 0), (1, 5), (3, 3), (6, 6), (2, 0), (5, 4)]
    heatmap = one_hot_heatmap((7, 7), *cells) + 0.5  # the other 43 cells rank below
    heatmap[0, 4, 1] = 0.9  # 7th best: must stay out with top_k=6
    expected = torch.zeros(1, 1, 224, 224, dtype=torch.bool)
    for r, c in cells:
        expected[0, 0, 32 * r : 32 * (r + 1), 32 * c : 32 * (c + 1)] = True
    mask = topk_cell_mask(heatmap, 6, 224)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 224, 224)
    assert torch.equal(mask, expected)
    assert int(mask.sum()) == 6 * 32 * 32


def test_topk_mask_rows_and_columns_are_not_swapped():
    mask = topk_cell_mask(one_hot_heatmap((7, 7), (1, 5)), 1, 224)[0, 0]
    assert mask[32:64, 160:192].all()
    assert int(mask.sum()) == 32 * 32
    assert not mask[160:192, 32:64].any()


def test_topk_mask_non_square_grid():
    heatmap = torch.tensor([[[0.0, 0.0, 3.0], [2.0, 0.0, 0.0]]])
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 1, 1],
            [0, 0, 0, 0, 1, 1],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(topk_cell_mask(heatmap, 2, (4, 6))[0, 0], expected)
    assert torch.equal(topk_cell_mask(heatmap, 2, [4, 6])[0, 0], expected)
    # Non-divisible: 5 rows over 2 cells, 7 columns over 3 cells.
    assert torch.equal(topk_cell_mask(heatmap, 2, (5, 7)), reference_topk_mask(heatmap, 2, (5, 7)))


@pytest.mark.parametrize(
    ("grid", "size"),
    [((7, 7), (30, 45)), ((2, 3), (5, 7)), ((7, 7), (7, 7)), ((3, 5), (11, 13)), ((2, 8), (9, 35)), ((2, 9), (9, 35))],
)
def test_topk_mask_non_divisible_tiling(grid, size):
    gh, gw = grid
    height, width = size
    heatmaps = torch.eye(gh * gw).view(gh * gw, gh, gw)  # map k selects cell k alone
    masks = topk_cell_mask(heatmaps, 1, size)[:, 0]
    assert torch.equal(masks.sum(0), torch.ones(height, width, dtype=torch.long))  # a partition
    assert all(is_rectangle(mask) for mask in masks)
    heights = masks.any(2).sum(1).view(gh, gw)
    widths = masks.any(1).sum(1).view(gh, gw)
    assert (heights == heights[:, :1]).all() and (widths == widths[:1, :]).all()  # cells form a grid
    assert int(heights.max() - heights.min()) <= 1 and int(widths.max() - widths.min()) <= 1
    # Row-major: cell k sits in cell row k // gw and cell column k % gw.
    top = masks.any(2).float().argmax(1).view(gh, gw)
    left = masks.any(1).float().argmax(1).view(gh, gw)
    assert (top.diff(dim=0) > 0).all() and (left.diff(dim=1) > 0).all()
    assert torch.equal(masks.unsqueeze(1), reference_topk_mask(heatmaps, 1, size))


def test_expanded_grid_cells_are_exact_when_divisible():
    cells = _expand_grid(torch.arange(28).view(1, 7, 4), (224, 64))[0, 0]
    assert torch.equal(cells, (torch.arange(224) // 32).view(-1, 1) * 4 + torch.arange(64) // 16)


def test_topk_mask_ties_go_to_the_first_cell_in_row_major_order():
    heatmap = torch.zeros(1, 7, 7)
    heatmap[0, 6, 6] = 9.0
    for r, c in [(4, 4), (0, 3), (5, 0), (2, 1)]:
        heatmap[0, r, c] = 5.0
    expected = torch.zeros(1, 7, 7, dtype=torch.bool)
    for r, c in [(6, 6), (0, 3), (2, 1)]:
        expected[0, r, c] = True
    mask = topk_cell_mask(heatmap, 3, 7)
    assert torch.equal(mask[:, 0], expected)
    assert torch.equal(mask, topk_cell_mask(heatmap.clone(), 3, 7))


@pytest.mark.parametrize("value", [0.0, -3.5, NAN])
def test_topk_mask_constant_heatmap_selects_the_first_cells(value):
    mask = topk_cell_mask(torch.full((2, 7, 7), value), 6, 7)
    expected = torch.zeros(2, 1, 7, 7, dtype=torch.bool)
    expected[:, 0, 0, :6] = True
    assert torch.equal(mask, expected)


def test_topk_mask_nan_ranks_below_every_number():
    heatmap = torch.full((1, 3, 3), NAN)
    heatmap[0, 2, 2] = -INF
    heatmap[0, 2, 0] = -1e30
    expected = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    expected[0, 0, 2, 0] = True
    assert torch.equal(topk_cell_mask(heatmap, 1, 3), expected)
    expected[0, 0, 2, 2] = True
    assert torch.equal(topk_cell_mask(heatmap, 2, 3), expected)
    expected[0, 0, 0, 0] = True  # then the first NaN cell
    assert torch.equal(topk_cell_mask(heatmap, 3, 3), expected)


def test_topk_mask_float64_scores_keep_their_precision():
    heatmap = torch.tensor([[[0.1, 0.1 + 1e-9]]], dtype=torch.float64)
    assert torch.equal(topk_cell_mask(heatmap, 1, (1, 2)).flatten(), torch.tensor([False, True]))


def test_topk_mask_infinite_scores_rank_at_the_ends():
    largest = torch.finfo(torch.float32).max
    assert torch.equal(
        topk_cell_mask(torch.tensor([[[largest, INF]]]), 1, (1, 2)).flatten(), torch.tensor([False, True])
    )
    assert torch.equal(
        topk_cell_mask(torch.tensor([[[-INF, -largest]]]), 1, (1, 2)).flatten(), torch.tensor([False, True])
    )
    assert torch.equal(topk_cell_mask(torch.tensor([[[NAN, -INF]]]), 1, (1, 2)).flatten(), torch.tensor([False, True]))
    big = torch.tensor([[[2**24, 2**24 + 1]]], dtype=torch.int64)
    assert torch.equal(topk_cell_mask(big, 1, (1, 2)).flatten(), torch.tensor([False, True]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_topk_mask_accepts_heatmaps_of_any_dtype(dtype, generator):
    heatmaps = torch.randperm(49, generator=generator).view(1, 7, 7).expand(3, 7, 7)
    expected = topk_cell_mask(heatmaps.float(), 6, 28)
    assert torch.equal(topk_cell_mask(heatmaps.to(dtype), 6, 28), expected)
    assert torch.equal(expected, reference_topk_mask(heatmaps.float(), 6, (28, 28)))


def test_topk_mask_matches_thresholding_the_expanded_heatmap(generator):
    heatmaps = torch.rand(5, 4, 6, generator=generator)
    kth = heatmaps.flatten(1).topk(7, dim=1).values[:, -1].view(5, 1, 1, 1)
    assert torch.equal(topk_cell_mask(heatmaps, 7, (17, 23)), _expand_grid(heatmaps, (17, 23)) >= kth)


@given(
    data=st.data(),
    batch=st.integers(1, 4),
    gh=st.integers(1, 7),
    gw=st.integers(1, 12),  # up to 8 columns masks come from a row-pattern table, wider grids from a gather
    seed=st.integers(0, 2**16),
)
def test_topk_mask_equals_reference(data, batch, gh, gw, seed):
    height = data.draw(st.integers(gh, 40), label="height")
    width = data.draw(st.integers(gw, 40), label="width")
    top_k = data.draw(st.integers(1, gh * gw), label="top_k")
    generator = torch.Generator().manual_seed(seed)
    heatmaps = torch.randint(0, 4, (batch, gh, gw), generator=generator).float()  # many ties
    heatmaps[torch.rand(batch, gh, gw, generator=generator) < 0.1] = NAN
    mask = topk_cell_mask(heatmaps, top_k, (height, width))
    assert torch.equal(mask, reference_topk_mask(heatmaps, top_k, (height, width)))
    cells_chosen = mask[:, 0][:, [start for start, _ in cell_bounds(gh, height)]][
        :, :, [start for start, _ in cell_bounds(gw, width)]
    ]
    assert (cells_chosen.flatten(1).sum(1) == top_k).all()


# --------------------------------------------------------------------------- cell indices and cell pasting


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64])
@given(batch=st.integers(1, 4), cells=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_topk_cell_indices_are_the_ranked_cells_in_order(dtype, batch, cells, seed):
    generator = torch.Generator().manual_seed(seed)
    top_k = int(torch.randint(1, cells + 1, (), generator=generator))
    # Few distinct values (many ties), with signed zeros, infinities and NaN among them.
    palette = torch.tensor([-INF, -2.0, -0.0, 0.0, 0.5, 3.0, INF, NAN])
    if not dtype.is_floating_point:
        palette = torch.tensor([-7.0, -1.0, 0.0, 2.0, 9.0])
    heatmaps = palette[torch.randint(0, palette.numel(), (batch, 1, cells), generator=generator)].to(dtype)
    indices = topk_cell_indices(heatmaps, top_k)
    assert indices.dtype == torch.int64 and indices.shape == (batch, top_k)
    for b in range(batch):
        assert indices[b].tolist() == ranked_cells(heatmaps[b].double())[:top_k]


@given(batch=st.integers(1, 8), cells=st.integers(1, 49), seed=st.integers(0, 2**16), tie=st.booleans())
def test_topk_cell_indices_of_distinct_scores_and_of_one_late_tie(batch, cells, seed, tie):
    # Distinct scores take the one-top-k path on the CPU; one tie anywhere in the batch the ranking-key path.
    generator = torch.Generator().manual_seed(seed)
    heatmaps = torch.randn(batch, 1, cells, generator=generator)
    top_k = int(torch.randint(1, cells + 1, (), generator=generator))
    if tie and cells > 1:
        row = int(torch.randint(0, batch, (), generator=generator))
        order = heatmaps[row, 0].argsort(descending=True)
        heatmaps[row, 0, order[min(top_k, cells - 1)]] = heatmaps[row, 0, order[top_k - 1]]
    indices = topk_cell_indices(heatmaps, top_k)
    for b in range(batch):
        assert indices[b].tolist() == ranked_cells(heatmaps[b])[:top_k]


def test_topk_cell_indices_signed_zeros_tie_and_keep_row_major_order():
    heatmaps = torch.tensor([[[0.0, -0.0, 0.0]], [[-0.0, 0.0, -0.0]]])
    assert topk_cell_indices(heatmaps, 2).tolist() == [[0, 1], [0, 1]]


def test_topk_cell_indices_separate_neighbouring_float32_values():
    low = torch.tensor(1.0)
    high = torch.nextafter(low, torch.tensor(2.0))
    heatmaps = torch.stack([low, high, low]).view(1, 1, 3)
    assert topk_cell_indices(heatmaps, 1).tolist() == [[1]]
    assert topk_cell_indices(-heatmaps, 2).tolist() == [[0, 2]]


@pytest.mark.parametrize("size", [(3, 5), (4, 8)])  # uneven and exact tiling of a 1x4 grid
def test_paste_copies_infinities_nan_and_signed_zeros_bit_for_bit(size):
    values = torch.tensor([INF, -INF, NAN, -0.0])
    images = values.view(4, 1, 1, 1).expand(4, 2, *size).contiguous()
    cells, permutation = torch.tensor([[0], [1], [2], [3]]), torch.tensor([1, 2, 3, 0])
    mask = _cell_mask(cells, (1, 4), size)
    expected = torch.where(mask, images[permutation], images)
    assert torch.equal(paste(images, mask, permutation).view(torch.int32), expected.view(torch.int32))


def test_paste_topk_cells_returns_the_cells_of_attentive_cutmix(generator):
    images = torch.rand(5, 3, 28, 28, generator=generator)
    heatmaps = torch.rand(5, 7, 7, generator=generator)
    permutation = torch.tensor([2, 0, 4, 1, 3])
    mixed, lam, cells, _ = _paste_topk_cells(images, heatmaps[permutation], 6, permutation)
    expected, _, expected_lam = attentive_cutmix(
        images, torch.arange(5), heatmaps, top_k=6, num_classes=5, permutation=permutation
    )
    assert torch.equal(mixed, expected) and torch.equal(lam, expected_lam)
    assert torch.equal(cells, topk_cell_indices(heatmaps[permutation], 6))


@pytest.mark.parametrize(("grid", "size"), [((7, 7), (32, 32)), ((7, 7), (28, 28)), ((3, 5), (11, 13))])
def test_pasted_attention_share_of_cells_matches_a_per_cell_reference(grid, size, generator):
    heatmaps = torch.randn(6, *grid, generator=generator)
    heatmaps[0] = 2.0  # no mass: the share is the pasted area
    cells = topk_cell_indices(heatmaps, 4)
    rows, cols = cell_bounds(grid[0], size[0]), cell_bounds(grid[1], size[1])
    expected = []
    for heat, chosen in zip(heatmaps.double(), cells.tolist(), strict=True):
        heat = heat - heat.min()
        area = {
            r * grid[1] + c: (r1 - r0) * (c1 - c0) for r, (r0, r1) in enumerate(rows) for c, (c0, c1) in enumerate(cols)
        }
        total = sum(float(heat.flatten()[i]) * a for i, a in area.items())
        pasted = sum(area[i] for i in chosen)
        inside = sum(float(heat.flatten()[i]) * area[i] for i in chosen)
        expected.append(inside / total if total > 0 else pasted / (size[0] * size[1]))
    share = pasted_attention_share(heatmaps, _cell_mask(cells, grid, size))
    torch.testing.assert_close(share, torch.tensor(expected, dtype=torch.float32))


# --------------------------------------------------------------------------- Attentive CutMix


def test_attentive_cutmix_pastes_the_hottest_cells_of_the_pasted_image():
    heatmaps = torch.cat(
        [one_hot_heatmap((7, 7), (0, 0)), one_hot_heatmap((7, 7), (6, 6)), one_hot_heatmap((7, 7), (1, 5))]
    )
    images = constant_images(3, 224, 224)
    permutation = torch.tensor([1, 2, 0])  # a 3-cycle tells p from its inverse
    mixed, soft, lam = attentive_cutmix(
        images, torch.tensor([0, 1, 2]), heatmaps, top_k=1, num_classes=3, permutation=permutation
    )
    blocks = {
        0: (slice(0, 32), slice(0, 32)),
        1: (slice(192, 224), slice(192, 224)),
        2: (slice(32, 64), slice(160, 192)),
    }
    for i, j in enumerate(permutation.tolist()):
        expected = images[i].clone()
        expected[(slice(None), *blocks[j])] = j + 1
        assert torch.equal(mixed[i], expected), f"sample {i} should show image {j}'s cell"
    torch.testing.assert_close(lam, torch.full((3,), 1 / 49))


def test_attentive_cutmix_lam_is_six_of_49_cells(generator):
    images = torch.rand(4, 3, 224, 224, generator=generator)
    heatmaps = torch.rand(4, 7, 7, generator=generator)
    permutation = torch.tensor([2, 0, 3, 1])
    mixed, soft, lam = attentive_cutmix(
        images, torch.tensor([0, 1, 2, 3]), heatmaps, num_classes=4, permutation=permutation
    )
    assert lam.dtype == torch.float32
    assert torch.equal(lam, torch.full((4,), 6 / 49))
    mask = topk_cell_mask(heatmaps[permutation], 6, 224)
    assert torch.equal(lam, mask.float().mean(dim=(1, 2, 3)))
    assert torch.equal(mixed, torch.where(mask, images[permutation], images))


def test_attentive_cutmix_soft_targets_are_exact():
    images = torch.zeros(4, 3, 28, 28)
    heatmaps = torch.rand(4, 7, 7, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 0, 4, 0])
    _, soft, lam = attentive_cutmix(
        images, labels, heatmaps, top_k=6, num_classes=5, permutation=torch.tensor([1, 2, 3, 0])
    )
    w = 6 / 49
    expected = torch.tensor(
        [
            [w, 0, 0, 1 - w, 0],  # canvas label 3, pasted label 0
            [1 - w, 0, 0, 0, w],  # canvas 0, pasted 4
            [w, 0, 0, 0, 1 - w],  # canvas 4, pasted 0
            [1 - w, 0, 0, w, 0],  # canvas 0, pasted 3
        ]
    )
    torch.testing.assert_close(soft, expected)
    assert soft.dtype == torch.float32


def test_attentive_cutmix_probability_targets(generator):
    targets = torch.distributions.Dirichlet(torch.ones(6)).sample((5,)).double()
    permutation = torch.tensor([4, 3, 0, 1, 2])
    _, soft, lam = attentive_cutmix(
        torch.rand(5, 1, 14, 14, generator=generator),
        targets,
        torch.rand(5, 7, 7, generator=generator),
        top_k=10,
        permutation=permutation,
    )
    assert soft.dtype == torch.float64
    expected = (10 / 49) * targets[permutation] + (39 / 49) * targets
    torch.testing.assert_close(soft, expected)
    torch.testing.assert_close(soft.sum(1), torch.ones(5, dtype=torch.float64))


def test_attentive_cutmix_folds_label_smoothing():
    eps, k = 0.1, 4
    labels = torch.tensor([0, 1, 2])
    permutation = torch.tensor([2, 0, 1])
    _, soft, lam = attentive_cutmix(
        torch.rand(3, 3, 14, 14),
        labels,
        torch.rand(3, 7, 7),
        top_k=6,
        num_classes=k,
        permutation=permutation,
        label_smoothing=eps,
    )
    smooth = F.one_hot(labels, k).float() * (1 - eps) + eps / k
    torch.testing.assert_close(soft, lam[:, None] * smooth[permutation] + (1 - lam[:, None]) * smooth)
    assert (soft >= eps / k - 1e-7).all()
    assert torch.allclose(soft[:, 3], torch.full((3,), eps / k))
    torch.testing.assert_close(soft.sum(1), torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_attentive_cutmix_keeps_image_dtype(dtype, generator):
    images = torch.randn(4, 3, 21, 21, generator=generator).to(dtype)
    heatmaps = torch.rand(4, 7, 7, generator=generator).to(dtype)
    permutation = torch.tensor([1, 0, 3, 2])
    mixed, soft, lam = attentive_cutmix(
        images, torch.tensor([0, 1, 2, 3]), heatmaps, num_classes=4, permutation=permutation
    )
    assert mixed.dtype == dtype and mixed.device == images.device
    assert soft.dtype == torch.float32 and lam.dtype == torch.float32
    # Pasting moves pixels, it never rounds them.
    mask = topk_cell_mask(heatmaps[permutation].float(), 6, 21)
    assert torch.equal(mixed, torch.where(mask, images[permutation], images))


@pytest.mark.parametrize("seed", range(4))
def test_attentive_cutmix_matches_the_per_sample_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    batch, grid, size, top_k = 6, (4, 5), (26, 33), 1 + seed * 4
    images = torch.randn(batch, 2, *size, generator=generator)
    heatmaps = torch.randint(0, 3, (batch, *grid), generator=generator).float()
    heatmaps[0, 1, 2] = NAN
    labels = torch.randint(0, 5, (batch,), generator=generator)
    permutation = torch.randperm(batch, generator=generator)
    mixed, soft, lam = attentive_cutmix(images, labels, heatmaps, top_k=top_k, num_classes=5, permutation=permutation)
    expected = reference_attentive_cutmix(images, F.one_hot(labels, 5).double(), heatmaps, top_k, permutation)
    assert torch.equal(mixed, expected[0])
    torch.testing.assert_close(soft, expected[1].float())
    torch.testing.assert_close(lam, expected[2].float())


def test_attentive_cutmix_single_sample_is_paired_with_itself(generator):
    images = torch.rand(1, 3, 14, 14, generator=generator)
    mixed, soft, lam = attentive_cutmix(
        images, torch.tensor([2]), torch.rand(1, 7, 7), num_classes=3, generator=rng(generator)
    )
    assert torch.equal(mixed, images)
    assert torch.equal(soft, torch.tensor([[0.0, 0.0, 1.0]]))


@given(
    data=st.data(),
    batch=st.integers(1, 8),
    gh=st.integers(1, 7),
    gw=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    drawn=st.booleans(),
)
def test_attentive_cutmix_invariants(data, batch, gh, gw, seed, drawn):
    height = data.draw(st.integers(gh, 32), label="height")
    width = data.draw(st.integers(gw, 32), label="width")
    top_k = data.draw(st.integers(1, gh * gw), label="top_k")
    generator = torch.Generator().manual_seed(seed)
    images = constant_images(batch, height, width)
    heatmaps = torch.rand(batch, gh, gw, generator=generator)
    labels = torch.arange(batch)  # distinct labels: soft[i] names the partner
    permutation = None if drawn else torch.randperm(batch, generator=generator)
    mixed, soft, lam = attentive_cutmix(
        images, labels, heatmaps, top_k=top_k, num_classes=batch, permutation=permutation, generator=rng(generator)
    )
    torch.testing.assert_close(soft.sum(1), torch.ones(batch))
    assert ((lam > 0) & (lam <= 1)).all()
    if permutation is None:
        permutation = torch.arange(batch) if batch == 1 else soft.clone().fill_diagonal_(0).argmax(1)
        assert torch.equal(permutation.sort().values, torch.arange(batch))
        if batch > 1:
            assert (permutation != torch.arange(batch)).all()
    expected_soft = lam[:, None] * F.one_hot(permutation, batch) + (1 - lam[:, None]) * torch.eye(batch)
    torch.testing.assert_close(soft, expected_soft)
    mask = topk_cell_mask(heatmaps[permutation], top_k, (height, width))
    assert torch.equal(mask, reference_topk_mask(heatmaps[permutation], top_k, (height, width)))
    assert torch.equal(mixed, torch.where(mask, images[permutation], images))
    torch.testing.assert_close(lam, mask.float().mean((1, 2, 3)))
    for i in range(batch):
        j = int(permutation[i])
        if j != i:
            pasted = mixed[i] == j + 1
            assert (pasted | (mixed[i] == i + 1)).all()
            assert lam[i].item() == pytest.approx(pasted.float().mean().item(), abs=1e-6)
            if lam[i] < 1:
                assert int((soft[i] > 0).sum()) == 2


# --------------------------------------------------------------------------- pairing and sampling


@given(batch=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_pairing_permutation_is_a_single_cycle_without_fixed_points(batch, seed):
    p = pairing_permutation(batch, generator=np.random.default_rng(seed))
    assert p.dtype == torch.long and p.shape == (batch,)
    assert torch.equal(p.sort().values, torch.arange(batch))
    if batch > 1:
        assert (p != torch.arange(batch)).all()
    i, length = 0, 0
    while True:
        i, length = int(p[i]), length + 1
        if i == 0:
            break
    assert length == batch


def test_pairing_permutation_single_sample_and_seeding():
    assert torch.equal(pairing_permutation(1), torch.tensor([0]))
    first = pairing_permutation(16, generator=np.random.default_rng(3))
    assert torch.equal(first, pairing_permutation(16, generator=np.random.default_rng(3)))
    assert not torch.equal(first, pairing_permutation(16, generator=np.random.default_rng(4)))


def test_sample_beta_shape_dtype_range_and_seeding():
    lam = sample_beta(0.4, 100, generator=np.random.default_rng(0))
    assert lam.shape == (100,) and lam.dtype == torch.float32
    assert ((lam >= 0) & (lam <= 1)).all()
    assert torch.equal(lam, sample_beta(0.4, 100, generator=np.random.default_rng(0)))
    assert not torch.equal(lam, sample_beta(0.4, 100, generator=np.random.default_rng(1)))
    tiny = sample_beta(1e-3, 1000, generator=np.random.default_rng(0))
    assert torch.isfinite(tiny).all() and ((tiny >= 0) & (tiny <= 1)).all()


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0, 8.0])
def test_sample_beta_moments(alpha):
    lam = sample_beta(alpha, 40_000, generator=np.random.default_rng(0)).double()
    # Standard errors are below 0.003 (mean) and 0.001 (variance): these bounds are over 5 sigma.
    assert lam.mean().item() == pytest.approx(0.5, abs=0.015)
    assert lam.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), abs=0.005)
    torch.testing.assert_close(lam.mean(), 1 - lam.mean(), atol=0.03, rtol=0)  # symmetric


def test_sample_beta_alpha_one_is_uniform():
    n = 20_000
    lam = sample_beta(1.0, n, generator=np.random.default_rng(0)).double().sort().values
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((grid - lam).abs(), (grid - 1 / n - lam).abs()).max().item()
    assert ks < 1.63 / math.sqrt(n) * 1.5  # well above the 1% critical value; seeded, so never flaky


# --------------------------------------------------------------------------- common checks per augmentation


def _heatmaps_for(images: torch.Tensor) -> torch.Tensor:
    return torch.rand(images.shape[0], 4, 4, generator=torch.Generator().manual_seed(7))


AUGMENTATIONS: dict[str, Callable] = {
    "attentive_cutmix": lambda images, targets, **kw: attentive_cutmix(
        images, targets, _heatmaps_for(images), top_k=3, **kw
    ),
    "cutmix": cutmix,
    "mixup": mixup,
}


@pytest.fixture(params=sorted(AUGMENTATIONS))
def augment(request) -> Callable:
    return AUGMENTATIONS[request.param]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_common_shapes_and_dtypes(augment, dtype, generator):
    images = torch.rand(6, 3, 16, 20, generator=generator).to(dtype)
    mixed, soft, lam = augment(images, torch.arange(6) % 4, num_classes=4, generator=rng(generator))
    assert mixed.shape == images.shape and mixed.dtype == dtype and mixed.device == images.device
    assert soft.shape == (6, 4) and soft.dtype == torch.float32
    assert lam.shape == (6,) and lam.dtype == torch.float32
    assert ((lam >= 0) & (lam <= 1)).all()
    assert (mixed >= images.amin()).all() and (mixed <= images.amax()).all()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("kind", ["index", "probabilities"])
def test_common_soft_targets_follow_lam(augment, kind, label_smoothing, generator):
    permutation = torch.tensor([3, 2, 4, 0, 1])
    labels = torch.tensor([0, 1, 2, 3, 1])
    targets = labels if kind == "index" else torch.distributions.Dirichlet(torch.ones(5)).sample((5,))
    mixed, soft, lam = augment(
        torch.rand(5, 3, 16, 16, generator=generator),
        targets,
        num_classes=5,
        permutation=permutation,
        generator=rng(generator),
        label_smoothing=label_smoothing,
    )
    y = _probabilities(targets, 5, 0.0) * (1 - label_smoothing) + label_smoothing / 5
    torch.testing.assert_close(soft, lam[:, None] * y[permutation] + (1 - lam[:, None]) * y)
    torch.testing.assert_close(soft.sum(1), torch.ones(5))
    torch.testing.assert_close(soft, mix_targets(targets, lam, permutation, 5, label_smoothing=label_smoothing))


@given(batch=st.integers(1, 16), classes=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_mix_targets_of_class_indices_equals_mixing_one_hot_rows_bit_for_bit(batch, classes, seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (batch,), generator=generator)  # partners often share a label
    lam = torch.rand(batch, generator=generator)
    lam[torch.rand(batch, generator=generator) < 0.2] = 0.0
    lam[torch.rand(batch, generator=generator) < 0.2] = 1.0
    permutation = torch.randperm(batch, generator=generator)
    one_hot = F.one_hot(labels, classes).float()
    expected = lam[:, None] * one_hot[permutation] + (1.0 - lam[:, None]) * one_hot
    assert torch.equal(mix_targets(labels, lam, permutation, classes), expected)
    assert torch.equal(mix_targets(labels.int(), lam.double(), permutation, classes), expected)
    assert torch.equal(mix_targets(one_hot, lam, permutation, classes), expected)  # the soft-target path


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_common_identity_pairing_is_a_no_op(augment, dtype, generator):
    images = torch.randn(4, 3, 16, 16, generator=generator).to(dtype)
    labels = torch.tensor([2, 0, 1, 2])
    mixed, soft, _ = augment(images, labels, num_classes=3, permutation=torch.arange(4), generator=rng(generator))
    assert torch.equal(mixed, images)
    assert torch.equal(soft, F.one_hot(labels, 3).float())


def test_common_same_seed_same_batch_other_seed_other_batch(augment):
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8)

    def run(seed):
        return augment(images, labels, num_classes=8, generator=np.random.default_rng(seed))

    first, again, other = run(11), run(11), run(12)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


def test_common_drawn_pairing_never_pairs_a_sample_with_itself(augment):
    labels = torch.arange(8)
    for seed in range(5):
        _, soft, lam = augment(torch.rand(8, 3, 16, 16), labels, num_classes=8, generator=np.random.default_rng(seed))
        mixed_rows = (lam > 0) & (lam < 1)
        assert mixed_rows.sum() >= 4
        partners = soft.clone().fill_diagonal_(0)
        assert ((partners > 0).sum(1)[mixed_rows] == 1).all()  # exactly two nonzero classes
        torch.testing.assert_close(partners.sum(1)[mixed_rows], lam[mixed_rows])


def test_common_int32_permutation_is_accepted(augment, generator):
    images = torch.rand(3, 3, 16, 16, generator=generator)
    permutation = torch.tensor([1, 2, 0], dtype=torch.int32)
    outputs = [
        augment(images, torch.arange(3), num_classes=3, permutation=p, generator=np.random.default_rng(5))
        for p in (permutation, permutation.long())
    ]
    for got, want in zip(*outputs, strict=True):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- CutMix


@given(
    batch=st.integers(1, 8),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    alpha=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**16),
)
def test_cutmix_invariants(batch, height, width, alpha, seed):
    generator = torch.Generator().manual_seed(seed)
    images = constant_images(batch, height, width)
    permutation = pairing_permutation(batch, generator=rng(generator))
    mixed, soft, lam = cutmix(
        images, torch.arange(batch), alpha=alpha, num_classes=batch, permutation=permutation, generator=rng(generator)
    )
    torch.testing.assert_close(soft.sum(1), torch.ones(batch))
    expected_soft = lam[:, None] * F.one_hot(permutation, batch) + (1 - lam[:, None]) * torch.eye(batch)
    torch.testing.assert_close(soft, expected_soft)
    for i in range(batch):
        j = int(permutation[i])
        if j == i:
            continue
        pasted = mixed[i] == j + 1
        assert (pasted | (mixed[i] == i + 1)).all()
        assert (pasted == pasted[:1]).all()  # same box on every channel
        assert is_rectangle(pasted[0])
        assert lam[i].item() == pytest.approx(pasted.float().mean().item(), abs=1e-6)
        if 0 < lam[i] < 1:
            assert int((soft[i] > 0).sum()) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.uint8])
@given(batch=st.integers(1, 8), height=st.integers(1, 40), width=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_cutmix_pastes_its_box_mask_and_lam_is_the_mask_mean_bit_for_bit(dtype, batch, height, width, seed):
    images = (torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 200).to(dtype)
    drawn = np.random.default_rng(seed)
    permutation = pairing_permutation(batch, generator=drawn)
    mask = cutmix_box_mask(batch, (height, width), sample_beta(0.7, batch, generator=drawn), generator=drawn)
    mixed, soft, lam = cutmix(
        images, torch.arange(batch), alpha=0.7, num_classes=batch, generator=np.random.default_rng(seed)
    )
    assert torch.equal(mixed, torch.where(mask, images[permutation], images))
    assert torch.equal(lam, mask.float().mean((1, 2, 3)))


def test_cutmix_box_mask_boxes_are_clipped_at_the_border():
    height, width, batch = 40, 60, 300
    mask = cutmix_box_mask(batch, (height, width), torch.full((batch,), 0.25), generator=np.random.default_rng(0))
    assert mask.shape == (batch, 1, height, width) and mask.dtype == torch.bool
    lam = mask.float().mean((1, 2, 3))
    clipped = unclipped = 0
    for m, fraction in zip(mask[:, 0], lam.tolist(), strict=True):
        assert is_rectangle(m)
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        h, w = rows.numel(), cols.numel()
        touches = rows[0] == 0 or rows[-1] == height - 1 or cols[0] == 0 or cols[-1] == width - 1
        if h < 19 or w < 29:  # box is 20 x 30 before clipping; rounding moves a side by one at most
            assert touches and fraction < 0.25
            clipped += 1
        else:
            assert abs(h - 20) <= 1 and abs(w - 30) <= 1
            unclipped += 1
    assert clipped > 50 and unclipped > 50
    assert lam.mean() < 0.25


def test_cutmix_box_mask_empty_and_full_areas(generator):
    empty = cutmix_box_mask(4, 16, torch.zeros(4), generator=rng(generator))
    assert not empty.any()
    full = cutmix_box_mask(64, (16, 24), torch.ones(64), generator=rng(generator))
    lam = full.float().mean((1, 2, 3))
    assert (lam <= 1).all() and (lam > 0.2).all() and (lam < 1).sum() > 50
    assert all(is_rectangle(m) for m in full[:, 0])


def test_cutmix_lam_is_the_clipped_box_fraction(generator):
    images = constant_images(16, 32, 32)
    permutation = pairing_permutation(16, generator=rng(generator))
    mixed, soft, lam = cutmix(
        images, torch.arange(16), num_classes=16, permutation=permutation, generator=rng(generator)
    )
    pasted = mixed[:, :1] == (permutation + 1).view(16, 1, 1, 1).float()
    assert torch.equal(lam, pasted.float().mean((1, 2, 3)))
    torch.testing.assert_close(soft[torch.arange(16), permutation], lam)


# --------------------------------------------------------------------------- Mixup


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mixup_is_a_convex_combination(dtype, generator):
    images = torch.randn(6, 3, 8, 8, generator=generator).to(dtype)
    permutation = torch.tensor([5, 0, 1, 2, 3, 4])
    mixed, soft, lam = mixup(images, torch.arange(6), num_classes=6, permutation=permutation, generator=rng(generator))
    assert mixed.dtype == dtype
    w = lam.double().view(6, 1, 1, 1)
    expected = w * images[permutation].double() + (1 - w) * images.double()
    torch.testing.assert_close(mixed.double(), expected, **TOLERANCES[dtype])
    torch.testing.assert_close(soft[torch.arange(6), permutation], lam)


@given(batch=st.integers(1, 8), alpha=st.floats(0.05, 10.0), seed=st.integers(0, 2**16))
def test_mixup_invariants(batch, alpha, seed):
    generator = torch.Generator().manual_seed(seed)
    images = constant_images(batch, 4, 5)
    mixed, soft, lam = mixup(images, torch.arange(batch), alpha=alpha, num_classes=batch, generator=rng(generator))
    torch.testing.assert_close(soft.sum(1), torch.ones(batch))
    assert ((lam >= 0) & (lam <= 1)).all()
    # The partner's label carries weight lam, and the pixels say which image it was.
    partner_value = (soft * torch.arange(1, batch + 1)).sum(1) - (1 - lam) * torch.arange(1, batch + 1)
    expected = (1 - lam) * torch.arange(1, batch + 1) + partner_value
    torch.testing.assert_close(mixed[:, 0, 0, 0], expected)
    assert (mixed == mixed[:, :1, :1, :1]).all()


def test_mixup_lam_follows_beta():
    batch = 4000
    _, _, lam = mixup(torch.rand(batch, 1, 1, 1), torch.full((batch, 2), 0.5), generator=np.random.default_rng(0))
    # Beta(1, 1): mean 1/2 and variance 1/12; the standard errors are about 0.005 and 0.0015.
    assert lam.mean().item() == pytest.approx(0.5, abs=0.025)
    assert lam.var().item() == pytest.approx(1 / 12, abs=0.008)


def test_cutmix_lam_follows_the_clipped_beta_area():
    """A box of area ``a`` (side ``s = sqrt(a)``) with a uniform centre keeps ``(s - s**2 / 4) ** 2`` on
    average after clipping; with ``a ~ U(0, 1)`` (alpha = 1) that is ``1/2 - 1/5 + 1/48``."""
    batch = 4000
    _, _, lam = cutmix(torch.rand(batch, 1, 64, 64), torch.full((batch, 2), 0.5), generator=np.random.default_rng(0))
    assert lam.mean().item() == pytest.approx(0.5 - 0.2 + 1 / 48, abs=0.02)  # standard error about 0.004


# --------------------------------------------------------------------------- pasted_attention_share


def test_pasted_attention_share_by_hand():
    heat = torch.tensor([[[4.0, 2.0], [1.0, 1.0]]])  # shifted: [[3, 1], [0, 0]]
    torch.testing.assert_close(pasted_attention_share(heat, topk_cell_mask(heat, 1, 4)), torch.tensor([0.75]))
    torch.testing.assert_close(pasted_attention_share(heat, topk_cell_mask(heat, 2, 4)), torch.tensor([1.0]))
    bottom = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    bottom[..., 2:, :] = True
    torch.testing.assert_close(pasted_attention_share(heat, bottom), torch.tensor([0.0]))
    left = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    left[..., :, :1] = True  # half of cells (0, 0) and (1, 0)
    torch.testing.assert_close(pasted_attention_share(heat, left), torch.tensor([0.375]))


def test_pasted_attention_share_of_a_constant_heatmap_is_the_area():
    mask = topk_cell_mask(torch.rand(3, 7, 7), 6, 28)
    share = pasted_attention_share(torch.full((3, 7, 7), 2.0), mask)
    assert share.dtype == torch.float32
    torch.testing.assert_close(share, torch.full((3,), 6 / 49))


def test_attentive_mask_holds_more_attention_than_a_random_box(generator):
    batch = 64
    peaks = torch.randint(0, 49, (batch, 3), generator=generator)
    heatmaps = 0.05 * torch.rand(batch, 49, generator=generator)
    heatmaps.scatter_(1, peaks, 1.0)
    heatmaps = heatmaps.view(batch, 7, 7)
    attentive = pasted_attention_share(heatmaps, topk_cell_mask(heatmaps, 6, 224))
    boxes = cutmix_box_mask(batch, 224, torch.full((batch,), 6 / 49), generator=rng(generator))
    random = pasted_attention_share(heatmaps, boxes)
    no_larger = boxes.float().mean((1, 2, 3)) <= 6 / 49
    assert (attentive[no_larger] >= random[no_larger] - 1e-6).all()
    assert attentive.mean() > 0.7 and attentive.mean() > 2 * random.mean()


# --------------------------------------------------------------------------- errors


def _acm(images=None, targets=None, heatmaps=None, **kw):
    images = torch.rand(4, 3, 14, 14) if images is None else images
    targets = torch.tensor([0, 1, 2, 0]) if targets is None else targets
    heatmaps = torch.rand(images.shape[0] if images.ndim else 4, 7, 7) if heatmaps is None else heatmaps
    kw.setdefault("num_classes", 3)
    return attentive_cutmix(images, targets, heatmaps, **kw)


@pytest.mark.parametrize("top_k", [0, 50, -1, True, 2.0])
def test_error_top_k_out_of_range(top_k):
    with pytest.raises(ValueError, match=rf"Expected `top_k` to be in \[1, 49\] for a 7x7 grid, but got {top_k!r}\."):
        topk_cell_mask(torch.rand(2, 7, 7), top_k, 224)
    with pytest.raises(ValueError, match=r"`top_k` to be in \[1, 49\]"):
        _acm(top_k=top_k)


def test_error_top_k_non_square_grid():
    with pytest.raises(ValueError, match=r"in \[1, 6\] for a 2x3 grid, but got 7"):
        topk_cell_mask(torch.rand(1, 2, 3), 7, 12)


def test_error_grid_finer_than_features():
    with pytest.raises(ValueError, match=r"at most the feature map size 5x5 .*but got 7x7"):
        attention_grid(torch.rand(1, 4, 5, 5), 7)
    with pytest.raises(ValueError, match=r"at most the feature map size 8x4 .*but got 2x5"):
        attention_grid(torch.rand(1, 4, 8, 4), (2, 5))


@pytest.mark.parametrize("features", [torch.rand(4, 7, 7), torch.rand(1, 1, 4, 7, 7), [[1.0]]])
def test_error_features_not_4d(features):
    with pytest.raises(ValueError, match=r"Expected `features` to be a 4-D feature map"):
        attention_grid(features)


def test_error_bad_reduction():
    with pytest.raises(ValueError, match=r"`reduction` to be one of 'mean', 'max', but got 'sum'"):
        attention_grid(torch.rand(1, 4, 7, 7), reduction="sum")


@pytest.mark.parametrize(
    ("grid_size", "error", "match"),
    [
        (True, TypeError, r"`grid_size` to be an int or a pair of ints \(h, w\), but got True"),
        ((7, 7, 7), TypeError, r"`grid_size` to be an int or a pair of ints \(h, w\)"),
        (7.0, TypeError, r"`grid_size` to be an int or a pair of ints \(h, w\)"),
        (0, ValueError, r"`grid_size` to be positive, but got 0"),
        ((3, -1), ValueError, r"`grid_size` to be positive"),
    ],
)
def test_error_bad_grid_size(grid_size, error, match):
    with pytest.raises(error, match=match):
        attention_grid(torch.rand(1, 4, 7, 7), grid_size)


def test_error_image_smaller_than_grid():
    with pytest.raises(ValueError, match=r"`image_size` to be at least the grid size 7x7, but got 5x9"):
        topk_cell_mask(torch.rand(1, 7, 7), 1, (5, 9))
    with pytest.raises(ValueError, match=r"at least the grid size 7x7, but got 6x6"):
        _acm(images=torch.rand(4, 3, 6, 6))
    with pytest.raises(ValueError, match=r"at least the grid size 2x2, but got 1x4"):
        pasted_attention_share(torch.rand(1, 2, 2), torch.ones(1, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"`image_size` to be positive"):
        topk_cell_mask(torch.rand(1, 7, 7), 1, (0, 9))


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
@pytest.mark.parametrize("images", [torch.rand(3, 14, 14), torch.rand(1, 4, 3, 14, 14)])
def test_error_images_not_4d(name, images):
    with pytest.raises(ValueError, match=r"Expected `images` to be a 4-D batch \(B, C, H, W\), but got shape"):
        AUGMENTATIONS[name](images, torch.tensor([0]), num_classes=2)


def test_error_images_not_a_tensor_or_empty():
    with pytest.raises(TypeError, match=r"Expected `images` to be a torch.Tensor, but got list"):
        cutmix([[0.0]], torch.tensor([0]), num_classes=2)
    with pytest.raises(ValueError, match=r"at least one sample, but got an empty batch"):
        mixup(torch.rand(0, 3, 8, 8), torch.tensor([], dtype=torch.long), num_classes=2)


def test_error_heatmaps():
    with pytest.raises(ValueError, match=r"one map per image, but the batch sizes do not match: 3 != 4\."):
        _acm(heatmaps=torch.rand(3, 7, 7))
    with pytest.raises(ValueError, match=r"`heatmaps` to have shape \(B, gh, gw\), but got shape \(4, 49\)"):
        _acm(heatmaps=torch.rand(4, 49))
    with pytest.raises(TypeError, match=r"`heatmaps` to be a torch.Tensor, but got ndarray"):
        _acm(heatmaps=torch.rand(4, 7, 7).numpy())
    with pytest.raises(ValueError, match=r"batch sizes do not match: 2 != 3"):
        pasted_attention_share(torch.rand(2, 7, 7), torch.ones(3, 1, 7, 7, dtype=torch.bool))


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_error_targets(name):
    augment, images = AUGMENTATIONS[name], torch.rand(4, 3, 16, 16)
    with pytest.raises(
        ValueError, match=r"Expected `num_classes` for class-index targets of shape \(B,\), but got None"
    ):
        augment(images, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"class-index `targets` in \[0, 3\), but got values in \[0, 3\]"):
        augment(images, torch.tensor([0, 1, 3, 0]), num_classes=3)
    with pytest.raises(ValueError, match=r"class-index `targets` in \[0, 3\), but got values in \[-1, 2\]"):
        augment(images, torch.tensor([0, -1, 2, 0]), num_classes=3)
    with pytest.raises(ValueError, match=r"soft `targets` of width `num_classes`.*widths do not match: 4 != 3\."):
        augment(images, torch.full((4, 4), 0.25), num_classes=3)
    with pytest.raises(ValueError, match=r"one entry per image, but the batch sizes do not match: 3 != 4\."):
        augment(images, torch.tensor([0, 1, 2]), num_classes=3)
    with pytest.raises(
        ValueError,
        match=r"class indices \(B,\) or float probabilities \(B, K\), but got a floating-point tensor of shape \(4,\)\. Pass",
    ):
        augment(images, torch.rand(4), num_classes=3)
    with pytest.raises(ValueError, match=r"`num_classes` to be None or a positive int, but got 0\."):
        augment(images, torch.tensor([0, 0, 0, 0]), num_classes=0)
    with pytest.raises(ValueError, match=r"`num_classes` to be None or a positive int, but got True\."):
        augment(images, torch.tensor([0, 0, 0, 0]), num_classes=True)
    with pytest.raises(TypeError, match=r"`targets` to be a torch.Tensor, but got list"):
        augment(images, [0, 1, 2, 0], num_classes=3)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
@pytest.mark.parametrize("label_smoothing", [-0.1, 1.0, 1.5, NAN, "0.1"])
def test_error_label_smoothing(name, label_smoothing):
    with pytest.raises(ValueError, match=r"Expected `label_smoothing` to be in \[0, 1\), but got"):
        AUGMENTATIONS[name](
            torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), num_classes=2, label_smoothing=label_smoothing
        )


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_error_permutation(name):
    augment, images, labels = AUGMENTATIONS[name], torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"`permutation` to have shape \(4,\), but got shape \(3,\)"):
        augment(images, labels, num_classes=3, permutation=torch.tensor([1, 2, 0]))
    with pytest.raises(
        ValueError, match=r"permutation of range\(B\) \(each index exactly once\), but got \[1, 1, 2, 3\]"
    ):
        augment(images, labels, num_classes=3, permutation=torch.tensor([1, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"permutation of range\(B\)"):
        augment(images, labels, num_classes=3, permutation=torch.tensor([1, 2, 3, 4]))
    with pytest.raises(TypeError, match=r"`permutation` to be an integer tensor of shape \(B,\)"):
        augment(images, labels, num_classes=3, permutation=torch.tensor([1.0, 0.0, 3.0, 2.0]))
    with pytest.raises(TypeError, match=r"`permutation` to be an integer tensor"):
        augment(images, labels, num_classes=3, permutation=[1, 0, 3, 2])


@pytest.mark.parametrize("fn", [cutmix, mixup])
@pytest.mark.parametrize("alpha", [0.0, -1.0, NAN, INF, True, "1"])
def test_error_alpha(fn, alpha):
    with pytest.raises(
        ValueError, match=r"Expected `alpha` \(the Beta\(alpha, alpha\) parameter\) to be a finite number > 0, but got"
    ):
        fn(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), alpha=alpha, num_classes=2)
    with pytest.raises(ValueError, match=r"Expected `alpha` \(the Beta\(alpha, alpha\) parameter\) to be a finite"):
        sample_beta(alpha, 4)


def test_error_mixup_integer_images():
    with pytest.raises(TypeError, match=r"floating-point `images` for mixup, but got dtype torch.uint8"):
        mixup(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]), num_classes=2)


@pytest.mark.parametrize("batch_size", [0, -2, 2.0])
def test_error_pairing_batch_size(batch_size):
    with pytest.raises(ValueError, match=r"`batch_size` to be a positive int, but got"):
        pairing_permutation(batch_size)


def test_error_cutmix_box_area_shape():
    with pytest.raises(ValueError, match=r"`area` to have shape \(4,\), but got shape \(3,\)"):
        cutmix_box_mask(4, 16, torch.rand(3))


# --------------------------------------------------------------------------- gradients, randomness and targets


def _layout(images: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return images.contiguous(memory_format=torch.channels_last)
    if layout == "non_contiguous":
        return images.transpose(2, 3).contiguous().transpose(2, 3)
    return images


def _mask_of(op: str, images: torch.Tensor, heatmaps: torch.Tensor, permutation: torch.Tensor, lam: torch.Tensor):
    """The mixing weight of each pixel, built in the test: a per-sample loop for the pasting ops."""
    if op == "mixup":
        return lam.view(-1, 1, 1, 1)
    batch, _, height, width = images.shape
    mask = torch.zeros(batch, 1, height, width)
    for i, j in enumerate(permutation.tolist()):
        if op == "cutmix":  # the box is where the partner's pixels landed
            continue
        mask[i] = reference_topk_mask(heatmaps[j : j + 1], 6, (height, width))[0].float()
    return mask


@pytest.mark.parametrize("op", ["attentive_cutmix", "cutmix", "mixup", "paste"])
@pytest.mark.parametrize("size", [28, 30])  # a 7x7 grid divides 28 px, not 30
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
def test_input_gradient_is_that_of_the_mask_blend(op, size, layout):
    base = constant_images(4, size, size) + torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    images = _layout(base.clone(), layout).requires_grad_(True)
    heatmaps = torch.rand(4, 7, 7, generator=torch.Generator().manual_seed(1))
    permutation, labels = torch.tensor([1, 2, 3, 0]), torch.arange(4)
    if op == "paste":
        mask = _cell_mask(torch.tensor([[0, 8], [3, 4], [48, 10], [20, 21]]), (7, 7), (size, size))
        mixed, lam = paste(images, mask, permutation), None
        weight = mask.float()
    else:
        kwargs = {"num_classes": 4, "permutation": permutation, "generator": np.random.default_rng(2)}
        if op == "attentive_cutmix":
            mixed, _, lam = attentive_cutmix(images, labels, heatmaps, **kwargs)
        else:
            mixed, _, lam = {"cutmix": cutmix, "mixup": mixup}[op](images, labels, **kwargs)
        weight = _mask_of(op, base, heatmaps, permutation, lam)
        if op == "cutmix":
            weight = (mixed.detach()[:, :1].floor() == base[permutation][:, :1].floor()).float()
    upstream = torch.randn(mixed.shape, generator=torch.Generator().manual_seed(3))
    (mixed * upstream).sum().backward()
    reference = base.clone().requires_grad_(True)
    expected_mixed = weight * reference[permutation] + (1 - weight) * reference
    (expected_mixed * upstream).sum().backward()
    torch.testing.assert_close(mixed.detach(), expected_mixed.detach())
    torch.testing.assert_close(images.grad, reference.grad)


@pytest.mark.parametrize("seed", range(3))
def test_cutmix_and_mixup_match_per_sample_references(seed):
    images = torch.rand(6, 3, 20, 24, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    # CutMix: the same draws, in the same order, then one box pasted per sample by slicing.
    drawn = np.random.default_rng(seed)
    order = drawn.permutation(6)
    area = drawn.beta(1.0, 1.0, 6)
    centre_y, centre_x = drawn.uniform(0, 20, 6), drawn.uniform(0, 24, 6)
    mixed, soft, lam = cutmix(images, labels, num_classes=5, generator=np.random.default_rng(seed))
    partner = {int(a): int(b) for a, b in zip(order, np.roll(order, -1), strict=True)}
    for i in range(6):
        j, side = partner[i], math.sqrt(area[i]) / 2
        top, bottom = (min(max(round(float(centre_y[i] + s * side * 20)), 0), 20) for s in (-1, 1))
        left, right = (min(max(round(float(centre_x[i] + s * side * 24)), 0), 24) for s in (-1, 1))
        expected = images[i].clone()
        expected[:, top:bottom, left:right] = images[j][:, top:bottom, left:right]
        assert torch.equal(mixed[i], expected)
        fraction = (bottom - top) * (right - left) / (20 * 24)
        assert lam[i].item() == pytest.approx(fraction, abs=1e-7)
        torch.testing.assert_close(
            soft[i], fraction * F.one_hot(labels[j], 5) + (1 - fraction) * F.one_hot(labels[i], 5)
        )
    # Mixup: each sample blended with its partner.
    mixed, soft, lam = mixup(images, labels, alpha=0.4, num_classes=5, generator=np.random.default_rng(seed))
    drawn = np.random.default_rng(seed)
    order, weights = drawn.permutation(6), drawn.beta(0.4, 0.4, 6)
    partner = {int(a): int(b) for a, b in zip(order, np.roll(order, -1), strict=True)}
    for i in range(6):
        j, w = partner[i], float(np.float32(weights[i]))
        assert lam[i].item() == w
        torch.testing.assert_close(mixed[i], w * images[j] + (1 - w) * images[i])
        torch.testing.assert_close(soft[i], w * F.one_hot(labels[j], 5) + (1 - w) * F.one_hot(labels[i], 5))


def test_generator_none_follows_torch_manual_seed_and_a_torch_generator_is_refused():
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8)
    torch.manual_seed(5)
    first = cutmix(images, labels, num_classes=8)
    torch.manual_seed(5)
    again = cutmix(images, labels, num_classes=8)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match=r"`generator` to be a numpy.random.Generator .* but got Generator"):
        mixup(images, labels, num_classes=8, generator=torch.Generator())


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_class_indices_of_shape_b_1_are_squeezed(name):
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 2, 1, 2])
    kwargs = {"num_classes": 3, "generator": np.random.default_rng(0)}
    flat = AUGMENTATIONS[name](images, labels, **kwargs)
    column = AUGMENTATIONS[name](images, labels.unsqueeze(1), **{**kwargs, "generator": np.random.default_rng(0)})
    for a, b in zip(flat, column, strict=True):
        assert torch.equal(a, b)
    no_mix = mix_targets(labels.unsqueeze(1), torch.zeros(4), torch.tensor([1, 2, 3, 0]), 3)
    assert torch.equal(no_mix, F.one_hot(labels, 3).float())
    with pytest.raises(ValueError, match=r"`num_classes` for class-index targets"):
        AUGMENTATIONS[name](images, labels.unsqueeze(1))  # never one-class "probabilities"


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_error_integer_targets_wider_than_one(name):
    one_hot = F.one_hot(torch.tensor([0, 2, 1, 2]), 3)
    with pytest.raises(
        ValueError,
        match=r"`targets` to be class indices \(B,\) or float probabilities \(B, K\), but got an"
        r" integer tensor of shape \(4, 3\)\. Pass class indices",
    ):
        AUGMENTATIONS[name](torch.rand(4, 3, 16, 16), one_hot, num_classes=3)
    with pytest.raises(ValueError, match=r"integer tensor of shape \(4, 3\)"):
        mix_targets(one_hot, torch.zeros(4), torch.arange(4))


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
@pytest.mark.parametrize(
    "targets",
    [
        torch.tensor([[0.5, 0.6], [0.5, 0.5]]),  # a row sums to 1.1
        torch.tensor([[1.5, -0.5], [0.5, 0.5]]),  # sums to 1 but negative
        torch.tensor([[0.5, NAN], [0.5, 0.5]]),
        torch.tensor([[0.0, 0.0], [0.5, 0.5]], dtype=torch.float64),
    ],
)
def test_error_soft_targets_that_are_not_probabilities(name, targets):
    with pytest.raises(ValueError, match=r"soft `targets` to be probabilities \(non-negative rows that sum to 1\)"):
        AUGMENTATIONS[name](torch.rand(2, 3, 16, 16), targets, num_classes=2)
    with pytest.raises(ValueError, match=r"soft `targets` to be probabilities"):
        mix_targets(targets, torch.tensor([0.5, 0.5]), torch.tensor([1, 0]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_soft_targets_within_the_rounding_of_their_dtype_are_accepted(dtype):
    targets = torch.softmax(torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)), 1).to(dtype)
    smoothed = _probabilities(torch.arange(4), 1000, 0.1).to(dtype)
    for probabilities in (targets, smoothed):
        soft = mix_targets(probabilities, torch.full((4,), 0.3), torch.tensor([1, 2, 3, 0]), 1000, label_smoothing=0.1)
        mix_targets(soft, torch.full((4,), 0.6), torch.tensor([3, 0, 1, 2]))  # mixed targets mix again
