"""Fidelity and cost of the heatmap cache: cached + warped heatmaps vs heatmaps of the augmented images.

For each training image a crop box and flip are drawn as the datamodules draw them
(``RandomCropFlip(32, padding=4)``, Fashion-MNIST/CIFAR style, and ``RandomResizedCropFlip``
with scale 0.25-1, ImageNet style); the augmented view is rendered with
``fidelity.apply_geometry``. "direct" heatmaps come from the 7x7 teacher on that
view, as without the cache. Rows compare other heatmaps with them by the top-k cells they pick:
mean IoU and mean shared fraction (|A and B| / k). "chance" is a random heatmap.

Example::

    python benchmarks/bench_cache.py                            # CPU, Fashion-MNIST if installed
    python benchmarks/bench_cache.py --device cuda --num-samples 2048
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _common, and lightning_acm without installing it
from _common import (  # noqa: E402
    add_teacher_arguments,
    base_parser,
    build_teacher,
    describe_machine,
    make_datamodule,
    markdown_table,
    setup_run,
    synchronize,
    teacher_from_args,
)
from fidelity import apply_geometry, topk_overlap  # noqa: E402

from lightning_acm.cache import HeatmapCache, regrid_attention_model  # noqa: E402
from lightning_acm.data import RandomCropFlip, RandomResizedCropFlip  # noqa: E402


def draw_geometry(kind: str, n: int, size: int) -> torch.Tensor:
    transform = RandomCropFlip(size, padding=4) if kind == "crop" else RandomResizedCropFlip(size, scale=(0.25, 1.0))
    blank = torch.zeros(1, size, size)
    boxes = torch.stack([transform(blank)[1] for _ in range(n)])
    return torch.cat([torch.arange(n)[:, None].float(), boxes], 1)


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="auto", choices=["auto", "fashion-mnist", "random"])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--cache-grid", type=int, default=14)
    add_teacher_arguments(parser, size=224)
    args = parser.parse_args()
    device = setup_run(args)
    n = args.num_samples

    datamodule, data_label = make_datamodule(
        args.data, data_dir=args.data_dir, num_samples=n, batch_size=args.batch_size, num_workers=0, seed=args.seed
    )
    reference = datamodule.train_reference_dataset()  # type: ignore[attr-defined]
    order = getattr(datamodule, "train_indices", torch.arange(n))[:n]
    images = torch.stack([reference[int(i)][0] for i in order])
    mean, std = datamodule.mean, datamodule.std  # type: ignore[attr-defined]
    black = -mean[0] / std[0]  # the datamodules pad with black before normalising
    teacher, label = teacher_from_args(args, mean, std, device)
    scale = args.cache_grid / 7
    fine_size = round(args.teacher_size * scale)

    def run(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(chunk.to(device)) for chunk in batch.split(args.batch_size)])

    def fill(model: torch.nn.Module, grid: int) -> tuple[HeatmapCache, float]:
        synchronize(device)
        start = time.perf_counter()
        cache = HeatmapCache(n, grid, device=device)
        cache.update(torch.arange(n), run(model, images))
        synchronize(device)
        return cache, time.perf_counter() - start

    caches = {
        f"cache 7x7 @ {args.teacher_size} px (same teacher), warped": fill(teacher, 7),
        f"cache {args.cache_grid}x{args.cache_grid} @ {fine_size} px (same layer), warped": fill(
            regrid_attention_model(teacher, args.cache_grid, fine_size), args.cache_grid
        ),
    }
    try:
        stride16, _ = build_teacher(
            args.teacher,
            weights=args.teacher_weights,
            layer="stride16",
            input_size=args.teacher_size,
            grid_size=14,
            amp=args.teacher_amp,
            channels_last=args.channels_last,
            input_mean=mean,
            input_std=std,
            device=device,
        )
        if stride16.layer != teacher.layer:
            caches[f"cache 14x14 @ {args.teacher_size} px (stride-16 layer {stride16.layer}), warped"] = fill(
                stride16, 14
            )
    except (SystemExit, ValueError):
        pass
    fine_cache = caches[f"cache {args.cache_grid}x{args.cache_grid} @ {fine_size} px (same layer), warped"][0]

    rows = []
    size = images.shape[-1]
    generator = torch.Generator().manual_seed(args.seed)
    for kind in ("crop", "resized-crop"):
        torch.manual_seed(args.seed)
        geometry = draw_geometry(kind, n, size).to(device)
        augmented = apply_geometry(images.to(device), geometry, padding_value=black)
        direct = run(teacher, augmented)
        candidates = {name: (cache.warp(geometry, 7), seconds) for name, (cache, seconds) in caches.items()}
        candidates[f"cache {args.cache_grid}x{args.cache_grid}, NOT warped (geometry ignored)"] = (
            F.adaptive_avg_pool2d(fine_cache.lookup(geometry[:, 0]), 7),
            None,
        )
        candidates["chance (random heatmaps)"] = (torch.rand(n, 7, 7, generator=generator).to(device), None)
        for name, (heat, seconds) in candidates.items():
            iou = topk_overlap(heat, direct, args.top_k)
            shared = iou * 2 * args.top_k / (1 + iou) / args.top_k  # |A & B| / k from IoU with |A| = |B| = k
            rows.append(
                {
                    "augmentation": kind,
                    "heatmaps vs direct": name,
                    "mean IoU": float(iou.mean()),
                    "mean shared fraction": float(shared.mean()),
                    "fill images/s": n / seconds if seconds else None,
                }
            )

    print(f"# Heatmap cache fidelity\n\n{describe_machine(device)}")
    print(
        f"data: {data_label}, {n} images; teacher: {label}; cache teacher at"
        f" {round(args.teacher_size * scale)} px for {args.cache_grid}x{args.cache_grid};"
        f" top-{args.top_k} of 7x7\n"
    )
    print(markdown_table(rows))
    print("\nfill images/s: teacher throughput while filling that cache (once per dataset).")
    if args.teacher_weights == "none":
        print("The teacher has random weights (--teacher-weights none): the overlaps say little about a real teacher.")


if __name__ == "__main__":
    main()
