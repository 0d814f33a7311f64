"""Our mixing ops vs torchvision.transforms.v2 CutMix/MixUp on the same batch, measured side by side.

"Attentive CutMix (heatmaps given)" is the whole op once heatmaps exist: top-k cell mask, paste
and soft targets (lightning_acm.functional.attentive_cutmix). "(from cache)" adds the cache
lookup and the warp of 14x14 maps through each sample's crop box and flip
(lightning_acm.cache.HeatmapCache.warp). Neither includes the teacher. Ratios are against
torchvision's CutMix on the same batch (< 1 is faster), the median over rounds of the ratio
within a round. Note that torchvision draws one box and one lam per batch, ours one per sample.
The ops are timed round-robin, --block consecutive calls of each per round in a shuffled order,
so that the machine's drift and noise hit every op alike; a fast batch gets more rounds (at least
--repeats, about --min-seconds in all).

With --device cuda, "syncs" counts the host-device synchronisations of one call
(torch.cuda.set_sync_debug_mode), i.e. the points where the CPU waits for the GPU.

Example::

    python benchmarks/bench_mixing_op.py                      # CPU, 128x3x32x32 and 64x3x224x224
    python benchmarks/bench_mixing_op.py --device cuda --repeats 50
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _common, and lightning_acm without installing it
from _common import base_parser, describe_machine, markdown_table, median_ratio, setup_run, time_rounds  # noqa: E402

from lightning_acm import functional as AF  # noqa: E402
from lightning_acm.cache import HeatmapCache  # noqa: E402


def count_syncs(fn: Callable[[], Any], device: torch.device) -> Any:
    if device.type != "cuda":
        return "n/a"
    fn()
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def mixing_ops(
    b: int, c: int, h: int, w: int, args: argparse.Namespace, device: torch.device
) -> list[tuple[str, Callable[[], Any]]]:
    """The timed ops on one random ``(b, c, h, w)`` batch: ``(name, call)``, torchvision's CutMix first."""
    images = torch.randn(b, c, h, w, device=device)
    labels = torch.randint(0, args.num_classes, (b,), device=device)
    heatmaps = torch.rand(b, args.grid, args.grid, device=device)
    cache = HeatmapCache(4 * b, args.cache_grid, device=device)
    cache.update(torch.arange(4 * b), torch.rand(4 * b, args.cache_grid, args.cache_grid))
    corner = torch.rand(b, 2) * 0.25 - 0.125
    geometry = torch.cat(
        [torch.randperm(4 * b)[:b, None].float(), corner, corner + 1.0, (torch.rand(b, 1) < 0.5).float()], 1
    ).to(device)
    generator = np.random.default_rng(args.seed)
    tv_cutmix = v2.CutMix(num_classes=args.num_classes)
    tv_mixup = v2.MixUp(num_classes=args.num_classes)
    k = args.num_classes

    return [
        ("torchvision v2.CutMix", lambda: tv_cutmix(images, labels)),
        (
            "ours: Attentive CutMix (heatmaps given)",
            lambda: AF.attentive_cutmix(images, labels, heatmaps, top_k=args.top_k, num_classes=k, generator=generator),
        ),
        (
            "ours: Attentive CutMix (from cache: lookup + warp + mix)",
            lambda: AF.attentive_cutmix(
                images, labels, cache.warp(geometry, args.grid), top_k=args.top_k, num_classes=k, generator=generator
            ),
        ),
        ("ours: cache lookup + warp only", lambda: cache.warp(geometry, args.grid)),
        ("ours: cutmix", lambda: AF.cutmix(images, labels, num_classes=k, generator=generator)),
        ("torchvision v2.MixUp", lambda: tv_mixup(images, labels)),
        ("ours: mixup", lambda: AF.mixup(images, labels, num_classes=k, generator=generator)),
    ]


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="128x3x32x32,64x3x224x224", help="comma-separated BxCxHxW batches")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--cache-grid", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=40, help="rounds at least; each times --block calls of every op")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=20.0,
        help="more rounds for a fast batch, until the rounds take about this long",
    )
    parser.add_argument(
        "--block", type=int, default=10, help="consecutive calls of one op per round (its steady state)"
    )
    args = parser.parse_args()
    device = setup_run(args)

    print(f"# Mixing op: lightning_acm vs torchvision.transforms.v2\n\n{describe_machine(device)}\n")
    rows = []
    for shape in args.shapes.split(","):
        b, c, h, w = (int(v) for v in shape.lower().split("x"))
        ops = mixing_ops(b, c, h, w, args, device)
        fns = [fn for _, fn in ops]
        one_round = sum(times[0] for times in time_rounds(fns, device, repeats=1, block=args.block)) * args.block
        repeats = max(args.repeats, math.ceil(args.min_seconds / one_round))
        rounds = time_rounds(fns, device, repeats=repeats, block=args.block)
        for (name, fn), times in zip(ops, rounds, strict=True):
            seconds = statistics.median(times)
            rows.append(
                {
                    "batch": shape,
                    "op": name,
                    "ms / batch": seconds * 1e3,
                    "images/s": b / seconds,
                    "vs tv CutMix": median_ratio(times, rounds[0]),
                    "rounds": repeats,
                    "syncs": count_syncs(fn, device),
                }
            )
    print(markdown_table(rows))
    print("\nvs tv CutMix: time relative to torchvision's v2.CutMix on the same batch (< 1 is faster).")


if __name__ == "__main__":
    main()
