"""What a pass over the batch costs the small ops of Attentive CutMix that follow it (CPU).

Besides its passes over the pixels, ``attentive_cutmix`` makes a few dozen small ops on tensors
of a few hundred values: the pairing, the per-sample top-k, ``lam``, the soft targets. Each round
here makes one pass over a batch of images (a gather of the partners and a bitwise xor: the shape
of the paste), then runs those small ops (``pairing_permutation``, ``topk_cell_indices``,
``mix_targets``, always on 128 samples) twice in a row, timing each run: "after the pass" and
"again" (right after the first run, their code and data in cache). The batch sizes of the pass
are visited in an order shuffled per round. When the pass touches more memory than a core's L2
cache holds, the small ops after it run slower: what they cost inside the op, and inside a
training step, is the first column, not the second.

Example::

    python benchmarks/bench_cold_ops.py
    python benchmarks/bench_cold_ops.py --pass-batches 32,128 --rounds 100
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _common, and lightning_acm without installing it
from _common import base_parser, describe_machine, markdown_table, setup_run  # noqa: E402

from lightning_acm import functional as AF  # noqa: E402


def l2_cache_size() -> str:
    """The L2 cache size of CPU 0 as Linux reports it (e.g. "2048K"), or "unknown"."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                return (index / "size").read_text().strip()
        except OSError:
            break
    return "unknown"


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--pass-batches", default="16,32,64,128,256", help="comma-separated batch sizes of the pass")
    parser.add_argument("--image-size", type=int, default=32, help="side of the 3-channel images of the pass")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20, help="rounds run before timing")
    args = parser.parse_args()
    device = setup_run(args)
    if device.type != "cpu":
        sys.exit("bench_cold_ops.py measures the CPU's caches; run it without --device.")

    batch, grid, top_k, num_classes = 128, 7, 6, 10
    generator = torch.Generator().manual_seed(args.seed)
    heatmaps = torch.rand(batch, grid, grid, generator=generator)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    lam = torch.full((batch,), top_k / grid**2)

    def small_ops() -> None:
        permutation = AF.pairing_permutation(batch, generator=generator)
        AF.topk_cell_indices(heatmaps.index_select(0, permutation), top_k)
        AF.mix_targets(labels, lam, permutation, num_classes)

    sizes = [int(v) for v in args.pass_batches.split(",")]
    images = {n: torch.randn(n, 3, args.image_size, args.image_size, generator=generator) for n in sizes}
    pairings = {n: torch.randperm(n, generator=generator) for n in sizes}

    def one_pass(n: int) -> None:
        partners = images[n].index_select(0, pairings[n])
        partners.view(torch.int32).bitwise_xor_(images[n].view(torch.int32))

    after: dict[int, list[float]] = {n: [] for n in sizes}
    again: dict[int, list[float]] = {n: [] for n in sizes}
    shuffler = random.Random(args.seed)
    for round_index in range(args.warmup + args.rounds):
        shuffler.shuffle(sizes)
        for n in sizes:
            one_pass(n)
            start = time.perf_counter()
            small_ops()
            middle = time.perf_counter()
            small_ops()
            end = time.perf_counter()
            if round_index >= args.warmup:
                after[n].append(middle - start)
                again[n].append(end - middle)

    print(f"# Small ops after a pass over the batch\n\n{describe_machine(device)}; L2 cache per core: {l2_cache_size()}\n")
    rows = []
    for n in sorted(sizes):
        footprint = 2 * images[n].numel() * images[n].element_size() / 2**20  # the batch and the gathered copy
        first, second = statistics.median(after[n]), statistics.median(again[n])
        rows.append({
            "pass over": f"{n}x3x{args.image_size}x{args.image_size}", "memory touched (MiB)": footprint,
            "small ops after the pass (us)": first * 1e6, "again (us)": second * 1e6, "after / again": first / second,
            "rounds": args.rounds,
        })
    print(markdown_table(rows))
    print("\nsmall ops: pairing_permutation(128), topk_cell_indices of 128 7x7 maps (k=6), mix_targets of 128 labels;"
          " medians over rounds.")


if __name__ == "__main__":
    main()
