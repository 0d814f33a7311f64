"""Shared pieces of the benchmark scripts: teachers, data, timing and Markdown tables.

Not a library module: the scripts in this folder import it as ``_common`` (they put their own
folder on ``sys.path``), so that each script stays a single command.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_acm.attention import PRESETS, AttentionModel, build_attention_model

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

#: Stride-16 layers that give a 7x7 grid at 112 px (a quarter of the 224 px compute).
STRIDE16_LAYERS = {"efficientnet_lite0": "_blocks.10", "resnet": "layer3"}


# --------------------------------------------------------------------------- arguments and output


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help='"cpu" or "cuda" (or "cuda:1")')
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=FASHION_MNIST_DIR, help="folder of the Fashion-MNIST IDX files")
    return parser


def add_teacher_arguments(parser: argparse.ArgumentParser, *, size: int = 224, layer: Optional[str] = None) -> None:
    group = parser.add_argument_group("teacher")
    group.add_argument(
        "--teacher",
        default="efficientnet_lite0",
        help='preset or torchvision name: "efficientnet_lite0" (bundled weights), "resnet50", "resnet152"',
    )
    group.add_argument(
        "--teacher-weights",
        default="default",
        help='"default" (pretrained: bundled for efficientnet_lite0, torchvision cache otherwise) or "none"'
        " (random init, for timing only: heatmaps are meaningless)",
    )
    group.add_argument(
        "--teacher-layer",
        default=layer,
        help='tapped layer; default: the preset\'s stride-32 layer, or "stride16" for the stride-16'
        " layer (_blocks.10 / layer3)",
    )
    group.add_argument("--teacher-size", type=int, default=size, help="teacher input size in px")
    group.add_argument(
        "--teacher-amp", default=None, choices=[None, "bf16", "fp16"], help="autocast dtype of the teacher"
    )
    group.add_argument("--channels-last", action="store_true", help="run the teacher in channels_last")


def setup_run(args: argparse.Namespace) -> torch.device:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore", message=".*(does not have many workers|LeafSpec|val_dataloader|treespec|returned `None`).*"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda was given but CUDA is not available here.")
    return device


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"
    return f"{where}; torch {torch.__version__}, lightning {L.__version__}"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Optional[Sequence[str]] = None) -> str:
    columns = list(columns or rows[0].keys())

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, *, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call of ``fn`` (synchronised on CUDA)."""
    return time_interleaved([fn], device, repeats=repeats, warmup=warmup)[0]


def time_interleaved(
    fns: Sequence[Callable[[], Any]], device: torch.device, *, repeats: int, block: int = 1, warmup: int = 5
) -> list[float]:
    """Median seconds per call of each of ``fns``, timed round-robin (see :func:`time_rounds`)."""
    return [statistics.median(spent) for spent in time_rounds(fns, device, repeats=repeats, block=block, warmup=warmup)]


def time_rounds(
    fns: Sequence[Callable[[], Any]], device: torch.device, *, repeats: int, block: int = 1, warmup: int = 5
) -> list[list[float]]:
    """Seconds per call of each of ``fns`` in each of ``repeats`` rounds, so that drift and noise hit all alike.

    Each round times ``block`` consecutive calls of each function (seconds per call = block time /
    ``block``), in an order shuffled per round (seeded): a function that always ran right after the
    same other one would always pay for the caches that one left behind. Returns one list of
    ``repeats`` times per function; :func:`median_ratio` compares two of them round by round.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    shuffler = random.Random(0)
    for _ in range(repeats):
        shuffler.shuffle(order)
        for index in order:
            start = time.perf_counter()
            for _ in range(block):
                fns[index]()
            synchronize(device)
            times[index].append((time.perf_counter() - start) / block)
    return times


def median_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of ``times[r] / reference[r]``: each ratio compares two ops timed in the same round."""
    return statistics.median(t / r for t, r in zip(times, reference, strict=True))


class ThroughputTimer(L.Callback):
    """Images per second of the training loop after ``warmup`` batches: loading, mixing and the step included.

    The clock starts at the end of batch ``warmup`` and stops at the end of the last batch.
    """

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup = warmup
        self.device = device
        self.start: Optional[float] = None
        self.end: Optional[float] = None
        self.images = 0
        self.batches = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # No sync per batch: the CPU may run ahead of the GPU, as in real training.
        self.batches += 1
        if self.batches == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()
        elif self.start is not None:
            self.images += batch[0].shape[0] if isinstance(batch, (list, tuple)) else batch["image"].shape[0]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(self.device)
        self.end = time.perf_counter()

    @property
    def images_per_second(self) -> float:
        if self.start is None or self.end is None or self.end <= self.start:
            return float("nan")
        return self.images / (self.end - self.start)


class FillTimer(L.Callback):
    """Seconds between on_fit_start (before the mixing callbacks' hooks) and on_train_start: the cache fill."""

    def __init__(self) -> None:
        self.start: Optional[float] = None
        self.seconds = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start is not None:
            self.seconds = time.perf_counter() - self.start


# --------------------------------------------------------------------------- teachers


def resolve_layer(name: str, layer: Optional[str]) -> Optional[str]:
    if layer != "stride16":
        return layer
    if name == "efficientnet_lite0":
        return STRIDE16_LAYERS["efficientnet_lite0"]
    if "resnet" in name or name == "paper":
        return STRIDE16_LAYERS["resnet"]
    raise SystemExit(f"--teacher-layer stride16 is known for efficientnet_lite0 and ResNets only, not {name!r}.")


def build_teacher(
    name: str,
    *,
    weights: str = "default",
    layer: Optional[str] = None,
    input_size: int = 224,
    grid_size: int = 7,
    amp: Optional[str] = None,
    channels_last: bool = False,
    input_mean: Sequence[float] = (0.0, 0.0, 0.0),
    input_std: Sequence[float] = (1.0, 1.0, 1.0),
    device: Optional[torch.device] = None,
) -> tuple[AttentionModel, str]:
    """An attention model and a label for the tables (``random init`` when ``weights == "none"``)."""
    layer = resolve_layer(name, layer)
    common: dict[str, Any] = dict(
        input_mean=input_mean,
        input_std=input_std,
        input_size=input_size,
        grid_size=grid_size,
        amp_dtype=amp,
        channels_last=channels_last,
    )
    if weights == "none":
        preset = PRESETS.get(name)
        arch = preset.arch if preset is not None else name
        layer = layer or (preset.layer if preset is not None else None)
        if layer is None:
            raise SystemExit(f"--teacher-layer is needed for {name!r}.")
        if arch == "efficientnet_lite0":
            from efficientnet_lite_pytorch import EfficientNet

            backbone: nn.Module = EfficientNet.from_name("efficientnet-lite0", image_size=input_size)
        else:
            import torchvision

            backbone = torchvision.models.get_model(arch, weights=None)
        mean = preset.teacher_mean if preset is not None else (0.485, 0.456, 0.406)
        std = preset.teacher_std if preset is not None else (0.229, 0.224, 0.225)
        model = AttentionModel(
            backbone,
            layer,
            teacher_mean=mean,
            teacher_std=std,
            relu=bool(preset and preset.relu and layer == preset.layer),
            **common,
        )
        kind = "random init"
    else:
        model = build_attention_model(name, weights=None if weights == "default" else weights, layer=layer, **common)
        kind = "pretrained"
    if device is not None:
        model = model.to(device)
    amp_label = f", {amp} autocast" if amp else ""
    cl_label = ", channels_last" if channels_last else ""
    return model, f"{name} {model.layer} @ {input_size} px ({kind}{amp_label}{cl_label})"


def teacher_from_args(
    args: argparse.Namespace,
    input_mean: Sequence[float],
    input_std: Sequence[float],
    device: Optional[torch.device] = None,
) -> tuple[AttentionModel, str]:
    """:func:`build_teacher` from the options of :func:`add_teacher_arguments`."""
    return build_teacher(
        args.teacher,
        weights=args.teacher_weights,
        layer=args.teacher_layer,
        input_size=args.teacher_size,
        amp=args.teacher_amp,
        channels_last=args.channels_last,
        input_mean=input_mean,
        input_std=input_std,
        device=device,
    )


# --------------------------------------------------------------------------- data


class _CropFlipSet(Dataset):
    """Tensor images, ``RandomCrop(size, padding)`` + horizontal flip by slicing; records the geometry."""

    def __init__(self, padded: Tensor, targets: Tensor, padding: int, record: bool) -> None:
        self.padded, self.targets, self.padding, self.record = padded, targets, padding, record

    def __len__(self) -> int:
        return self.padded.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        size = self.padded.shape[-1] - 2 * self.padding
        top, left = (int(v) for v in torch.randint(0, 2 * self.padding + 1, (2,)))
        image = self.padded[index, :, top : top + size, left : left + size]
        flipped = bool(torch.rand(()) < 0.5)
        if flipped:
            image = image.flip(-1)
        target = int(self.targets[index])
        if not self.record:
            return image, target
        y0, x0 = (top - self.padding) / size, (left - self.padding) / size
        return image, target, torch.tensor([index, y0, x0, y0 + 1.0, x0 + 1.0, float(flipped)])


class _ReferenceSet(Dataset):
    def __init__(self, images: Tensor, targets: Tensor) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        return self.images[index], int(self.targets[index]), index


class RandomDataModule(L.LightningDataModule):
    """Random normalised images with the lightning_acm datamodule contract (crop+flip geometry, reference set).

    Augmentation is ``RandomCrop(size, padding=4)`` + flip done by tensor slicing, cheap enough
    not to starve a GPU with a few workers. The padding is 0 (the mean of the normalised images).
    """

    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def __init__(
        self,
        num_samples: int = 1024,
        size: int = 32,
        num_classes: int = 10,
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        record_augmentation: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        # Smooth blobs rather than white noise, so that heatmaps have some structure.
        low = torch.randn(num_samples, 3, max(2, size // 8), max(2, size // 8), generator=generator)
        self.images = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        self.targets = torch.randint(0, num_classes, (num_samples,), generator=generator)
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.record_augmentation = record_augmentation
        self.train_indices = torch.arange(num_samples)
        padded = torch.nn.functional.pad(self.images, (4, 4, 4, 4))
        self.train_set = _CropFlipSet(padded, self.targets, 4, record_augmentation)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_reference_dataset(self) -> Dataset:
        return _ReferenceSet(self.images, self.targets)


def make_datamodule(
    kind: str,
    *,
    num_samples: int,
    batch_size: int,
    num_workers: int,
    seed: int,
    record_augmentation: bool = True,
    data_dir: str = FASHION_MNIST_DIR,
) -> tuple[L.LightningDataModule, str]:
    """``("fashion-mnist" | "random" | "auto")`` -> a datamodule recording the crop/flip geometry, and a label."""
    if kind == "auto":
        kind = "fashion-mnist" if os.path.isdir(data_dir) else "random"
    if kind == "fashion-mnist":
        from lightning_acm.data import FashionMNISTDataModule

        datamodule = FashionMNISTDataModule(
            data_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            val_split=0,
            train_subset=num_samples,
            record_augmentation=record_augmentation,
            persistent_workers=num_workers > 0,
            seed=seed,
        )
        return datamodule, f"Fashion-MNIST ({num_samples} training images, padded to 32 px, 3 channels)"
    datamodule = RandomDataModule(
        num_samples,
        32,
        10,
        batch_size=batch_size,
        num_workers=num_workers,
        record_augmentation=record_augmentation,
        seed=seed,
    )
    return datamodule, f"random tensors ({num_samples} images, 3x32x32)"
