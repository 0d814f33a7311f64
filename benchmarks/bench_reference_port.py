"""A per-sample Attentive CutMix in the style of the public reference port vs our batched callback.

The public reference implementation mixes inside the Dataset: ``__getitem__`` loads the image,
draws a partner, runs the teacher on the partner alone (a batch of one), takes its top-k cells
and pastes them one by one. ``PerSampleAttentiveCutMix`` below reproduces that shape (it is the
baseline written here, not imported). Ours loads plain batches and mixes them in the
AttentiveCutMix callback inside a real lightning.Trainer, with the teacher run on the whole
batch, or not at all with the heatmap cache (whose one-off fill is reported apart).

Both sides use the same teacher and data, and no student (training_step does nothing), so the
figures are the cost of producing mixed batches.

Example::

    python benchmarks/bench_reference_port.py                    # CPU, 64 images, EfficientNet-Lite0 @ 224
    python benchmarks/bench_reference_port.py --device cuda --teacher resnet50 --teacher-weights none --num-samples 2048
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # _common, and lightning_acm without installing it
from _common import (  # noqa: E402
    FillTimer,
    RandomDataModule,
    ThroughputTimer,
    add_teacher_arguments,
    base_parser,
    describe_machine,
    markdown_table,
    setup_run,
    synchronize,
    teacher_from_args,
)

from lightning_acm.attention import Teacher  # noqa: E402
from lightning_acm.callbacks import AttentiveCutMix  # noqa: E402


class PerSampleAttentiveCutMix(Dataset):
    """The reference port's shape: the teacher on ONE partner image per ``__getitem__``, cells pasted in a loop."""

    def __init__(
        self, base: Dataset, teacher: nn.Module, *, top_k: int, grid: int, num_classes: int, device: torch.device
    ) -> None:
        self.base, self.teacher, self.top_k, self.grid = base, teacher, top_k, grid
        self.num_classes, self.device = num_classes, device

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, target = self.base[index][:2]
        partner_index = int(torch.randint(len(self), ()))
        partner, partner_target = self.base[partner_index][:2]
        with torch.no_grad():
            heatmap = self.teacher(partner.unsqueeze(0).to(self.device))[0].cpu()
        cells = heatmap.flatten().topk(self.top_k).indices.tolist()
        mixed = image.clone()
        _, height, width = image.shape
        for cell in cells:
            row, col = divmod(cell, self.grid)
            y0, y1 = row * height // self.grid, (row + 1) * height // self.grid
            x0, x1 = col * width // self.grid, (col + 1) * width // self.grid
            mixed[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
        lam = self.top_k / self.grid**2
        soft = (1 - lam) * F.one_hot(torch.tensor(target), self.num_classes).float()
        soft += lam * F.one_hot(torch.tensor(partner_target), self.num_classes).float()
        return mixed, soft


class NoStudent(L.LightningModule):
    """Receives the mixed batches and does nothing with them."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 10
        self.dummy = nn.Parameter(torch.zeros(()))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def reference_port(datamodule: RandomDataModule, teacher: nn.Module, args: Any, device: torch.device) -> float:
    dataset = PerSampleAttentiveCutMix(
        datamodule.train_set, teacher, top_k=args.top_k, grid=7, num_classes=10, device=device
    )
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0)
    images, start = 0, None
    for step, (mixed, soft) in enumerate(loader):
        mixed, soft = mixed.to(device), soft.to(device)
        synchronize(device)
        if step == args.warmup - 1:
            start = time.perf_counter()
        elif start is not None:
            images += mixed.shape[0]
    return images / (time.perf_counter() - start) if start is not None and images else float("nan")


def ours(
    datamodule: RandomDataModule, teacher: nn.Module, cached: bool, args: Any, device: torch.device
) -> tuple[float, float]:
    callback = AttentiveCutMix(
        teacher=Teacher(module=teacher), heatmap_cache=cached, top_k=args.top_k, num_classes=10, seed=args.seed
    )
    timer, fill = ThroughputTimer(args.warmup, device), FillTimer()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        callbacks=[fill, timer, callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(NoStudent(), datamodule=datamodule)
    return timer.images_per_second, fill.seconds


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=64, help="images per run (one epoch)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first (>= 1)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=6)
    add_teacher_arguments(parser, size=224)
    args = parser.parse_args()
    device = setup_run(args)
    args.warmup = max(1, args.warmup)

    datamodule = RandomDataModule(args.num_samples, args.image_size, 10, batch_size=args.batch_size, seed=args.seed)
    teacher, label = teacher_from_args(args, datamodule.mean, datamodule.std, device)
    reference = reference_port(datamodule, teacher, args, device)
    batched, _ = ours(datamodule, teacher, False, args, device)
    cached, fill = ours(datamodule, teacher, True, args, device)
    rows = [
        {
            "implementation": "reference-port style: teacher per sample in Dataset.__getitem__",
            "images/s": reference,
            "speed-up": 1.0,
        },
        {
            "implementation": "ours: AttentiveCutMix callback, teacher on the batch",
            "images/s": batched,
            "speed-up": batched / reference,
        },
        {
            "implementation": "ours: AttentiveCutMix callback, heatmap cache (warp only)",
            "images/s": cached,
            "speed-up": cached / reference,
            "one-off fill (s)": fill,
        },
    ]
    print(f"# Reference-port style vs batched callback\n\n{describe_machine(device)}")
    print(
        f"data: random {args.image_size} px images, {args.num_samples} per run, batch {args.batch_size},"
        f" {args.warmup} warm-up batch(es); teacher: {label}; no student\n"
    )
    print(markdown_table(rows, ["implementation", "images/s", "speed-up", "one-off fill (s)"]))
    print(
        "\nspeed-up: images/s relative to the reference-port style. The cache fill runs the teacher once per"
        " training image, before the first step."
    )
    if args.teacher_weights == "none":
        print("The teacher has random weights (--teacher-weights none): timing only.")


if __name__ == "__main__":
    main()
