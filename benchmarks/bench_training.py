"""Training throughput of one student with no mixing, CutMix, Attentive CutMix and cached Attentive CutMix.

All four runs share the student (lightning_acm.model.ImageClassifier, ResNet-18 with the CIFAR
stem, same initial weights), the data (the same datamodule, recording the crop/flip geometry in
every run so that loading costs the same) and a real lightning.Trainer. Throughput is images/s of
the whole loop (loading, mixing, teacher, forward, backward, step) after --warmup batches.

"teacher every step" runs the frozen teacher on every mixed batch; "cached" runs it once per
training sample in on_fit_start (reported separately as the cache fill), at --cache-grid cells
per side, then warps the cached maps through each batch's crop and flip.

Examples::

    python benchmarks/bench_training.py                       # CPU, Fashion-MNIST if installed, small
    # GPU, the paper's teacher (ResNet-152 layer4 @ 224 px), random weights for timing; batch 256, 30 steps:
    python benchmarks/bench_training.py --device cuda --teacher resnet152 --teacher-weights none \\
        --teacher-layer layer4 --teacher-size 224
    # add --teacher-amp bf16 --channels-last for the faster teacher
    # Where a method's time goes: CPU-side profile of 5 steps of CutMix and Mixup, after the table:
    python benchmarks/bench_training.py --device cuda --only baseline,cutmix,mixup --profile cutmix,mixup
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Any, Optional

import lightning as L
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _common, and lightning_acm without installing it
from _common import (  # noqa: E402
    FillTimer,
    ThroughputTimer,
    add_teacher_arguments,
    base_parser,
    describe_machine,
    make_datamodule,
    markdown_table,
    setup_run,
    synchronize,
    teacher_from_args,
)

from lightning_acm.attention import Teacher  # noqa: E402
from lightning_acm.cache import HeatmapCacheConfig  # noqa: E402
from lightning_acm.callbacks import AttentiveCutMix, CutMix, MixUp  # noqa: E402
from lightning_acm.model import ImageClassifier  # noqa: E402


class ProfileWindow(L.Callback):
    """``torch.profiler`` over batches ``[start, start + length)`` (CPU ops, and CUDA kernels on a GPU)."""

    def __init__(self, start: int, length: int, device: torch.device) -> None:
        self.start, self.length, self.device = start, length, device
        self.profiler: Optional[torch.profiler.profile] = None
        self.seconds = float("nan")  # set when the window closes
        self._began = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            synchronize(self.device)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self._began = time.perf_counter()
        elif batch_idx == self.start + self.length and self.profiler is not None:
            self.stop()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stop()

    def stop(self) -> None:
        if self.profiler is not None and math.isnan(self.seconds):  # opened and not yet closed
            synchronize(self.device)
            self.seconds = time.perf_counter() - self._began
            self.profiler.__exit__(None, None, None)

    def report(self, name: str, rows: int = 12) -> str:
        assert self.profiler is not None, "the run ended before the profiled batches"
        events = self.profiler.key_averages()
        table = events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)
        waits = [
            f"{e.key} x{e.count}: {e.self_cpu_time_total / 1000:.2f} ms"
            for e in events
            if "Synchronize" in e.key or e.key in ("aten::item", "cudaMemcpyAsync")
        ]
        return (
            f"## Profile: {name}, {self.length} steps, {1000 * self.seconds / self.length:.2f} ms per step"
            f" (under the profiler)\n\n```\n{table}```\nhost waits: {'; '.join(waits) or 'none'}\n"
        )


def run(
    name: str,
    mixing: Optional[L.Callback],
    datamodule: L.LightningDataModule,
    args: Any,
    device: torch.device,
    profile: Optional[ProfileWindow] = None,
) -> dict[str, Any]:
    L.seed_everything(args.seed, verbose=False)
    student = ImageClassifier(arch="resnet18", num_classes=10, small_input=True, lr=0.05, lr_scheduler="none")
    if args.channels_last_student:
        student = student.to(memory_format=torch.channels_last)
    timer, fill = ThroughputTimer(args.warmup, device), FillTimer()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        callbacks=[fill, timer] + ([mixing] if mixing is not None else []) + ([profile] if profile else []),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(student, datamodule=datamodule)
    cached = isinstance(mixing, AttentiveCutMix) and mixing.heatmap_cache
    return {"method": name, "images/s": timer.images_per_second, "cache fill (s)": fill.seconds if cached else None}


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        default="auto",
        choices=["auto", "fashion-mnist", "random"],
        help="auto: Fashion-MNIST from /usr/share/datasets/fashion-mnist when present, else random tensors",
    )
    parser.add_argument(
        "--num-samples", type=int, default=None, help="training images (default: one pass of warmup + steps batches)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 on CPU, 256 on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="timed batches (default 4 on CPU, 30 on CUDA)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (>= 1)")
    parser.add_argument(
        "--num-workers", type=int, default=None, help="DataLoader workers (default 0 on CPU, 8 on CUDA)"
    )
    parser.add_argument("--precision", default="32-true", help='Trainer precision, e.g. "bf16-mixed" on CUDA')
    parser.add_argument("--channels-last-student", action="store_true")
    parser.add_argument(
        "--cache-grid",
        type=int,
        default=7,
        help="cells per side of the cached heatmaps (7: the teacher's grid at its input size)",
    )
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1, help="run every method this many times, round-robin")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated subset of: baseline,cutmix,mixup,acm,cached (default: all but mixup)",
    )
    parser.add_argument(
        "--profile", default=None, help="comma-separated methods (as in --only) to profile for 5 steps after the table"
    )
    add_teacher_arguments(parser, size=112, layer="stride16")
    args = parser.parse_args()
    device = setup_run(args)
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.steps = args.steps or (30 if cuda else 4)
    args.warmup = max(1, args.warmup)
    args.num_workers = args.num_workers if args.num_workers is not None else (8 if cuda else 0)
    num_samples = args.num_samples or args.batch_size * (args.warmup + args.steps)
    if num_samples < args.batch_size * (args.warmup + args.steps):
        print(f"note: {num_samples} samples give fewer batches than warmup + steps: the runs span epochs.\n")

    datamodule, data_label = make_datamodule(
        args.data,
        data_dir=args.data_dir,
        num_samples=num_samples,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        seed=args.seed,
    )
    mean, std = datamodule.mean, datamodule.std  # type: ignore[attr-defined]
    teacher, teacher_label = teacher_from_args(args, mean, std)

    def acm(cached: bool) -> AttentiveCutMix:
        cache = HeatmapCacheConfig(grid_size=args.cache_grid) if cached else False
        return AttentiveCutMix(
            teacher=Teacher(module=teacher), heatmap_cache=cache, top_k=args.top_k, num_classes=10, seed=args.seed
        )

    variants = {
        "baseline": ("no mixing", lambda: None),
        "cutmix": ("CutMix", lambda: CutMix(alpha=1.0, num_classes=10, seed=args.seed)),
        "mixup": ("Mixup", lambda: MixUp(alpha=1.0, num_classes=10, seed=args.seed)),
        "acm": ("Attentive CutMix (teacher every step)", lambda: acm(False)),
        "cached": (f"Attentive CutMix (cached {args.cache_grid}x{args.cache_grid}, warped)", lambda: acm(True)),
    }
    chosen = args.only.split(",") if args.only else [key for key in variants if key != "mixup"]
    profiled = args.profile.split(",") if args.profile else []
    for key in chosen + profiled:
        if key not in variants:
            sys.exit(
                f"bench_training.py: unknown method {key!r} in --only/--profile; expected some of {', '.join(variants)}."
            )
    if profiled and args.steps < 6:
        sys.exit(f"bench_training.py: --profile needs --steps >= 6 (5 profiled steps after one), but got {args.steps}.")
    # An untimed run first, so that the first measured method does not pay for lazy initialisation.
    run("warm-up", None, datamodule, argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1}), device)
    # Round-robin over the methods, so that the machine's drift and noise hit every method alike.
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in chosen}
    for _ in range(args.rounds):
        for key in chosen:
            runs[key].append(run(variants[key][0], variants[key][1](), datamodule, args, device))
    rows = []
    for key in chosen:
        speeds = [r["images/s"] for r in runs[key]]
        fills = [r["cache fill (s)"] for r in runs[key] if r["cache fill (s)"] is not None]
        rows.append(
            {
                "method": variants[key][0],
                "images/s": statistics.median(speeds),
                "range over rounds": f"{min(speeds):.1f}–{max(speeds):.1f}" if args.rounds > 1 else None,
                "cache fill (s)": statistics.median(fills) if fills else None,
            }
        )
    cutmix_speed = next((r["images/s"] for r in rows if r["method"] == "CutMix"), None)
    base_speed = next((r["images/s"] for r in rows if r["method"] == "no mixing"), None)
    for row in rows:
        row["time vs CutMix"] = cutmix_speed / row["images/s"] if cutmix_speed else None
        row["time vs no mixing"] = base_speed / row["images/s"] if base_speed else None

    print(f"# Training throughput: ResNet-18 (CIFAR stem) student\n\n{describe_machine(device)}")
    print(
        f"data: {data_label}; batch {args.batch_size}; {args.steps} timed batches after {args.warmup};"
        f" precision {args.precision}"
    )
    scaled = "the teacher's own grid and input size" if args.cache_grid == 7 else f"teacher input x {args.cache_grid}/7"
    print(
        f"teacher: {teacher_label}; top_k {args.top_k} of 7x7; cache at {args.cache_grid}x{args.cache_grid} ({scaled})\n"
    )
    print(f"rounds: {args.rounds} (images/s is the median over rounds)\n")
    print(
        markdown_table(
            rows, ["method", "images/s", "range over rounds", "time vs CutMix", "time vs no mixing", "cache fill (s)"]
        )
    )
    print(
        "\ntime vs X: seconds per image relative to X (1.05 = 5% slower). The cache fill runs once per dataset,"
        " before the first step, and is not in images/s."
    )
    if args.teacher_weights == "none":
        print("The teacher has random weights (--teacher-weights none): timing only, its heatmaps are meaningless.")
    for key in profiled:
        window = ProfileWindow(args.warmup + 1, 5, device)
        run(variants[key][0], variants[key][1](), datamodule, args, device, profile=window)
        print("\n" + window.report(variants[key][0]))


if __name__ == "__main__":
    main()
