"""LightningDataModules: CIFAR-10/100, ImageNet folders and Fashion-MNIST (the offline default).

With ``record_augmentation=True`` a training sample is ``(image, target, geometry)``: float32 ``[index, y0, x0,
y1, x1, flipped]``, the index into the full training set, the crop box in normalised coordinates of sample
``index`` of :meth:`VisionDataModule.train_reference_dataset` (outside ``[0, 1]`` over padding) and the flip.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.datasets.folder import default_loader, find_classes
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from typing_extensions import override

from lightning_acm.validation import check_choice, check_class_indices, check_int, check_real, check_size2

__all__ = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "FASHION_MNIST_SYSTEM_DIR",
    "FashionMNISTDataModule",
    "ImageNetDataModule",
    "RandomCropFlip",
    "RandomResizedCropFlip",
    "VisionDataModule",
]

#: Where ``apt-get install dataset-fashion-mnist`` puts the four IDX files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

GeometryTransform = Callable[[Any], tuple[Any, Tensor]]


def _box(top: float, left: float, height: float, width: float, image: Any, flipped: bool = False) -> Tensor:
    """``[y0, x0, y1, x1, flipped]`` of a crop, in normalised coordinates of ``image``."""
    _, ih, iw = TF.get_dimensions(image)
    box = [top / ih, left / iw, (top + height) / ih, (left + width) / iw, float(flipped)]
    return torch.tensor(box, dtype=torch.float32)


def _maybe_flip(image: Any, flip_p: float) -> tuple[Any, bool]:
    flipped = bool(torch.rand(()) < flip_p)
    return (TF.hflip(image) if flipped else image), flipped


def _check_range(value: Sequence[float], name: str, high: float = math.inf) -> tuple[float, float]:
    if len(value) != 2 or not 0.0 < value[0] <= value[1] <= high:
        bound = f" <= {high:g}" if math.isfinite(high) else ""
        raise ValueError(f"Expected `{name}` to satisfy 0 < min <= max{bound}, but got {value!r}.")
    return float(value[0]), float(value[1])


@dataclass
class RandomCropFlip:
    """``RandomCrop(size, padding)`` then a horizontal flip with probability ``flip_p``; returns ``(image, box)``.

    ``box`` is float32 ``[y0, x0, y1, x1, flipped]`` in normalised coordinates of the input (PIL or
    ``(..., H, W)``), drawn from torch's global generator (seeded per worker by the ``DataLoader``).

    Example::

        >>> _ = torch.manual_seed(0)
        >>> image, box = RandomCropFlip(32, padding=4)(torch.rand(3, 32, 32))
        >>> image.shape, box.shape, bool((box[2:4] - box[0:2] == 1).all())
        (torch.Size([3, 32, 32]), torch.Size([5]), True)
    """

    size: Union[int, tuple[int, int]]
    _: KW_ONLY
    padding: int = 0
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        self.size = check_size2(self.size, "size")
        self.padding = check_int(self.padding, "padding", minimum=0)
        self.flip_p = check_real(self.flip_p, "flip_p", low=0.0, high=1.0)

    def __call__(self, image: Any) -> tuple[Any, Tensor]:
        padded = TF.pad(image, self.padding) if self.padding else image
        top, left, height, width = T.RandomCrop.get_params(padded, self.size)
        crop, flipped = _maybe_flip(TF.crop(padded, top, left, height, width), self.flip_p)
        return crop, _box(top - self.padding, left - self.padding, height, width, image, flipped)


@dataclass
class RandomResizedCropFlip:
    """``RandomResizedCrop`` then a horizontal flip with probability ``flip_p``; ``box`` as for :class:`RandomCropFlip`.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> image, box = RandomResizedCropFlip(16)(torch.rand(3, 40, 60))
        >>> image.shape, bool(((box[:4] >= 0) & (box[:4] <= 1)).all())
        (torch.Size([3, 16, 16]), True)
    """

    size: Union[int, tuple[int, int]]
    _: KW_ONLY
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    def __post_init__(self) -> None:
        self.size = check_size2(self.size, "size")
        self.scale = _check_range(self.scale, "scale", high=1.0)
        self.ratio = _check_range(self.ratio, "ratio")
        self.flip_p = check_real(self.flip_p, "flip_p", low=0.0, high=1.0)

    def __call__(self, image: Any) -> tuple[Any, Tensor]:
        top, left, height, width = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        crop = TF.resized_crop(image, top, left, height, width, list(self.size), self.interpolation, antialias=True)
        crop, flipped = _maybe_flip(crop, self.flip_p)
        return crop, _box(top, left, height, width, image, flipped)


@dataclass
class _ResizeCenterCrop:
    """Resize the shorter side to ``resize_size``, then center-crop ``crop_size``; returns ``(image, box)``."""

    resize_size: int
    crop_size: int

    def __call__(self, image: Any) -> tuple[Any, Tensor]:
        resized = TF.resize(image, [self.resize_size], antialias=True)
        _, height, width = TF.get_dimensions(resized)
        # torchvision's center_crop rounds the offsets this way.
        top, left = int(round((height - self.crop_size) / 2.0)), int(round((width - self.crop_size) / 2.0))
        image = TF.crop(resized, top, left, self.crop_size, self.crop_size)
        return image, _box(top, left, self.crop_size, self.crop_size, resized)


@dataclass
class _WholeImage:
    """The whole image, resized to ``size`` when given (aspect ratio not kept); the box is [0, 0, 1, 1]."""

    size: Optional[tuple[int, int]] = None

    def __call__(self, image: Any) -> tuple[Any, Tensor]:
        image = image if self.size is None else TF.resize(image, list(self.size), antialias=True)
        return image, torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])


class _TransformedSet(Dataset):
    """``base[indices[i]]`` through ``transform``, ``to_tensor``, ``normalize``; ``output``: pair, geometry or index."""

    def __init__(self, base: Dataset, indices: Tensor, transform: Any, normalize: Any, output: str) -> None:
        # A tensor, not a list: forked workers would otherwise copy a list of Python ints page by page.
        self.base, self.indices, self.transform, self.normalize = base, indices, transform, normalize
        self.output = output

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[Any, ...]:
        index = int(self.indices[item])  # IndexError out of range ends iteration; negative items count from the end
        image, target = self.base[index]
        image, box = self.transform(image)
        image = self.normalize(TF.to_tensor(image))
        if self.output == "geometry":
            return image, target, torch.cat((torch.tensor([index], dtype=torch.float32), box))
        return (image, target, index) if self.output == "index" else (image, target)


class _TensorImages(Dataset):
    """``(N, H, W)`` uint8 images and ``(N,)`` labels, zero-padded to ``pad_to``, served as (PIL ``mode``, int)."""

    def __init__(self, images: Tensor, targets: Tensor, pad_to: int, mode: str) -> None:
        self.images = TF.center_crop(images, [pad_to])  # a crop larger than the image pads it with zeros
        self.targets, self.mode = targets.long(), mode

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index].numpy()).convert(self.mode), int(self.targets[index])


def _load_image(path: str) -> Image.Image:
    try:
        return default_loader(path)
    except (OSError, ValueError, SyntaxError) as err:
        raise OSError(f"Could not read the image file '{path}' ({type(err).__name__}: {err}). Replace it.") from err


def _read_idx(path: Path, magic: int) -> Tensor:
    """A uint8 tensor from an IDX file (the MNIST format) with magic number ``magic``, gzipped if named ``*.gz``."""
    raw = path.read_bytes()
    try:
        raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError) as err:
        raise ValueError(f"Could not read the IDX file '{path}' ({err}): corrupt or truncated. Replace it.") from err
    found = int.from_bytes(raw[:4], "big")
    if len(raw) < 4 or found != magic:
        raise ValueError(f"Expected the IDX file '{path}' to have magic number {magic}, but got {found}. Replace it.")
    header = 4 + 4 * raw[3]
    shape = tuple(np.frombuffer(raw[4:header], dtype=">u4").tolist()) if len(raw) >= header else None
    needed = header + (math.prod(shape) if shape else 0)
    if shape is None or len(raw) != needed:
        problem = "truncated" if len(raw) < needed else "longer than its header says"
        raise ValueError(
            f"The IDX file '{path}' is {problem}: its header{f' (shape {shape})' if shape else ''} needs"
            f" {needed} bytes, but it has {len(raw)}. Replace it."
        )
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy())


def _write_idx(path: Union[str, Path], data: Tensor) -> None:
    """Write a uint8 tensor as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    header = bytes([0, 0, 8, data.ndim]) + np.asarray(data.shape, dtype=">u4").tobytes()
    payload = header + data.contiguous().numpy().tobytes()
    Path(path).write_bytes(gzip.compress(payload) if Path(path).suffix == ".gz" else payload)


def _take(indices: Tensor, count: Optional[int], name: str, what: str) -> Tensor:
    if count is not None and count > len(indices):
        raise ValueError(f"Expected `{name}` to be at most the {len(indices)} {what}, but got {count}.")
    return indices[:count]


class VisionDataModule(LightningDataModule):
    """Base for the image-classification datamodules: a seeded split, subsets, transforms and one loader factory.

    Subclasses set ``name``, ``num_classes``, ``dims``, ``mean`` and ``std``, implement ``_base_dataset(train)``
    and, where they can, ``_download``; they override ``_transforms`` where the defaults do not fit.

    Args:
        data_dir: the folder holding (or receiving) the data.
        batch_size, eval_batch_size: training and validation/test/predict batch sizes (``None``: ``batch_size``).
        num_workers: ``DataLoader`` worker processes (0 loads in the main process).
        pin_memory, persistent_workers: ``DataLoader`` options, applied where CUDA / workers exist.
        val_split: validation samples: a count (``int``) or a fraction (``float`` in ``[0, 1)``); 0: none.
        seed: seeds the split and the subsets (not the augmentation).
        train_subset, test_subset: keep this many training (after the split) or test samples (seeded).
        augment: random crop and flip on the training set; ``False`` uses the evaluation view.
        record_augmentation: training samples become ``(image, target, geometry)`` (see the module docs).
        download, drop_last: let ``prepare_data`` download (needs internet); drop the last short training batch.

    See :class:`FashionMNISTDataModule` for an example.
    """

    name: ClassVar[str] = "vision"
    _offline_hint: str = ""
    num_classes: int
    dims: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        data_dir: str = "data",
        *,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        val_split: Union[int, float] = 5000,
        seed: int = 42,
        train_subset: Optional[int] = None,
        test_subset: Optional[int] = None,
        augment: bool = True,
        record_augmentation: bool = False,
        download: bool = False,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(data_dir, (str, os.PathLike)) or not str(data_dir):
            raise ValueError(f"Expected `data_dir` to be a non-empty path, but got {data_dir!r}.")
        if isinstance(val_split, float):
            self.val_split = check_real(val_split, "val_split", low=0.0, high=1.0, high_open=True, what="a fraction")
        else:
            hint = " Pass a count (int) or a fraction (float in [0, 1))."
            self.val_split = check_int(val_split, "val_split", minimum=0, hint=hint)
        self.data_dir = str(data_dir)
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        hint = " Pass None to use `batch_size`."
        self.eval_batch_size = check_int(eval_batch_size, "eval_batch_size", minimum=1, optional=True, hint=hint)
        self.num_workers = check_int(num_workers, "num_workers", minimum=0)
        self.seed = check_int(seed, "seed")
        hint = " Pass None to use all samples."
        self.train_subset = check_int(train_subset, "train_subset", minimum=1, optional=True, hint=hint)
        self.test_subset = check_int(test_subset, "test_subset", minimum=1, optional=True, hint=hint)
        self.pin_memory, self.persistent_workers, self.drop_last = pin_memory, persistent_workers, drop_last
        self.augment, self.record_augmentation, self.download = augment, record_augmentation, download
        # Built by `setup`: Optional[Dataset] datasets and Optional[Tensor] split indices into the training set.
        self.train_set = self.val_set = self.test_set = self._train_indices = self._val_indices = None
        self._bases: dict[bool, Dataset] = {}  # the training (True) and test (False) sets, loaded once

    def _base_dataset(self, train: bool) -> Dataset:
        """The training or test set as ``(PIL image, int)`` samples; raises naming the path if it is missing."""
        raise NotImplementedError

    def _download(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot download its data.")

    def _transforms(self) -> tuple[GeometryTransform, GeometryTransform, GeometryTransform]:
        """The training, evaluation and reference transforms."""
        return RandomCropFlip(self.dims[1:], padding=4), _WholeImage(), _WholeImage()

    def _base(self, train: bool) -> Dataset:
        """``_base_dataset(train)``, loaded once and checked to be non-empty."""
        if train not in self._bases:
            base = self._base_dataset(train)
            if len(base) == 0:  # type: ignore[arg-type]
                split = "training" if train else "test"
                raise ValueError(f"The {self.name} {split} set in '{self.data_dir}' is empty.")
            self._bases[train] = base
        return self._bases[train]

    def _dataset(self, train: bool, indices: Tensor, transform: GeometryTransform, output: str = "pair") -> Dataset:
        return _TransformedSet(self._base(train), indices, transform, T.Normalize(self.mean, self.std), output)

    @override
    def prepare_data(self) -> None:
        try:
            if self.download:
                self._download()
        except (OSError, RuntimeError) as err:
            hint = f"Without internet, {self._offline_hint}"
            raise RuntimeError(f"Could not download {self.name} into '{self.data_dir}' ({err}). {hint}") from err

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Build the datasets of ``stage`` (``None``: all); raises if the data is missing or the split does not fit."""
        check_choice(stage, "stage", (None, "fit", "validate", "test", "predict"))
        augmented, plain, _ = self._transforms()
        if stage in (None, "fit", "validate") and self.train_set is None:
            self._train_indices, self._val_indices = self._split(len(self._base(train=True)))  # type: ignore[arg-type]
            output = "geometry" if self.record_augmentation else "pair"
            self.train_set = self._dataset(True, self._train_indices, augmented if self.augment else plain, output)
            if len(self._val_indices):
                self.val_set = self._dataset(True, self._val_indices, plain)
        if stage in (None, "test", "predict") and self.test_set is None:
            size = len(self._base(train=False))  # type: ignore[arg-type]
            permutation = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed))
            indices = _take(permutation, self.test_subset, "test_subset", "test samples").sort().values
            self.test_set = self._dataset(False, indices, plain)

    def _split(self, size: int) -> tuple[Tensor, Tensor]:
        """Seeded, disjoint ``(train, val)`` indices into the full training set, each sorted."""
        num_val = int(round(size * self.val_split)) if isinstance(self.val_split, float) else self.val_split
        if self.val_split > 0 and num_val == 0:
            raise ValueError(
                f"Expected `val_split` to select at least one of the {size} training samples, but"
                f" {self.val_split} selects none. Pass a larger fraction, a count, or 0 (no validation)."
            )
        if num_val >= size:
            raise ValueError(
                f"Expected `val_split` to leave training samples, but it takes {num_val} of the {size}"
                " training samples. Pass a smaller count or a fraction such as 0.1."
            )
        permutation = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed))
        what = "training samples left after the validation split"
        train_indices = _take(permutation[num_val:], self.train_subset, "train_subset", what)
        if self.drop_last and len(train_indices) < self.batch_size:
            raise ValueError(
                f"Expected `batch_size` to be at most the {len(train_indices)} training samples, but got"
                f" {self.batch_size}; with `drop_last=True` no batch would be left. Pass a smaller one."
            )
        return train_indices.sort().values, permutation[:num_val].sort().values

    @property
    def train_indices(self) -> Tensor:
        """Indices into the full training dataset that train (after the split and ``train_subset``)."""
        self.setup("fit")
        return self._train_indices  # type: ignore[return-value]

    @property
    def val_indices(self) -> Tensor:
        """Indices into the full training dataset that validate (disjoint from ``train_indices``)."""
        self.setup("fit")
        return self._val_indices  # type: ignore[return-value]

    def train_reference_dataset(self) -> Dataset:
        """The full training set without random crop or flip, the frame of ``geometry``: ``(image, target, index)``."""
        indices = torch.arange(len(self._base(train=True)))  # type: ignore[arg-type]
        return self._dataset(True, indices, self._transforms()[2], output="index")

    def _data_loader(self, stage: str) -> Union[DataLoader, list]:
        """The loader of ``stage``'s dataset, built by ``setup(stage)`` where needed; ``[]`` without one."""
        self.setup(stage)
        train = stage == "fit"
        dataset = {"fit": self.train_set, "validate": self.val_set}.get(stage, self.test_set)
        if dataset is None:
            return []
        batch_size = self.batch_size if train or self.eval_batch_size is None else self.eval_batch_size
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._data_loader("fit")  # type: ignore[return-value]

    @override
    def val_dataloader(self) -> Union[DataLoader, list]:
        return self._data_loader("validate")  # [] when val_split=0: Lightning then skips validation

    @override
    def test_dataloader(self) -> DataLoader:
        return self._data_loader("test")  # type: ignore[return-value]

    predict_dataloader = test_dataloader  # prediction runs over the test set


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10 from torchvision's ``cifar-10-batches-py`` folder in ``data_dir``.

    Training: ``RandomCrop(32, padding=4)`` and a flip. Arguments: see :class:`VisionDataModule`.

    Example::

        >>> dm = CIFAR10DataModule("data", batch_size=64)
        >>> dm.name, dm.num_classes, dm.dims, dm.mean
        ('cifar10', 10, (3, 32, 32), (0.4914, 0.4822, 0.4465))
    """

    name = "cifar10"
    dataset_cls: ClassVar[type[tv_datasets.CIFAR10]] = tv_datasets.CIFAR10
    num_classes = 10
    dims = (3, 32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    @property
    def _offline_hint(self) -> str:
        return f"place the extracted `{self.dataset_cls.base_folder}` (from {self.dataset_cls.filename}) in data_dir."

    @override
    def _download(self) -> None:
        self.dataset_cls(self.data_dir, train=True, download=True)

    @override
    def _base_dataset(self, train: bool) -> Dataset:
        cls, folder = self.dataset_cls, Path(self.data_dir) / self.dataset_cls.base_folder
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            problem = f"{missing} are missing from '{folder}'"
            problem = problem if Path(self.data_dir).is_dir() else f"'{self.data_dir}' does not exist"
            raise FileNotFoundError(
                f"Expected `data_dir` to be a directory holding `{cls.base_folder}`, but {problem}."
                f" Pass `download=True` (needs internet) or {self._offline_hint}"
            )
        try:
            return cls(self.data_dir, train=train, download=False)
        except RuntimeError as err:
            raise ValueError(
                f"The {self.name} files in '{folder}' failed torchvision's integrity (md5) check ({err})."
                " Delete the folder and pass `download=True`, or replace it."
            ) from err


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) from torchvision's ``cifar-100-python`` folder; transforms as :class:`CIFAR10DataModule`.

    Example::

        >>> CIFAR100DataModule("data").num_classes
        100
    """

    name = "cifar100"
    dataset_cls = tv_datasets.CIFAR100
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)


class ImageNetDataModule(VisionDataModule):
    """ImageNet (or any ImageFolder tree) from ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*``.

    ``val/`` is the test set. Training: ``RandomResizedCrop(image_size, scale)`` and a flip; evaluation:
    ``Resize(resize_size)`` and ``CenterCrop(image_size)``; reference: the whole image, resized.

    Args:
        num_classes: number of class folders expected (checked in ``setup``).
        image_size: side of the training and evaluation crops.
        resize_size: shorter side before the evaluation crop; ``None`` gives ``round(image_size / 0.875)``.
        scale: area range of ``RandomResizedCrop``.
        data_dir, **kwargs: as in :class:`VisionDataModule` (``download=True`` is refused).

    Example::

        >>> dm = ImageNetDataModule("data/imagenet", image_size=160)
        >>> dm.dims, dm.num_classes, dm.resize_size
        ((3, 160, 160), 1000, 183)
    """

    name = "imagenet"
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        *,
        num_classes: int = 1000,
        image_size: int = 224,
        resize_size: Optional[int] = None,
        scale: tuple[float, float] = (0.08, 1.0),
        **kwargs: Any,
    ) -> None:
        if kwargs.get("download"):
            raise ValueError(
                "Expected `download` to be False: ImageNet cannot be downloaded (it needs an image-net.org"
                " account). Place it as data_dir/train/<class>/*.JPEG and data_dir/val/<class>/*."
            )
        super().__init__(data_dir, **kwargs)
        self.num_classes = check_int(num_classes, "num_classes", minimum=1)
        self.image_size = check_int(image_size, "image_size", minimum=1)
        resize_size = int(round(image_size / 0.875)) if resize_size is None else resize_size
        self.resize_size = check_int(
            resize_size, "resize_size", minimum=self.image_size, hint=" Pass None or at least `image_size`."
        )
        self.scale = _check_range(scale, "scale", high=1.0)
        self.dims = (3, self.image_size, self.image_size)

    @override
    def _base_dataset(self, train: bool) -> Dataset:
        hint = (
            f"Expected the layout {self.data_dir}/train/<class>/*.JPEG and {self.data_dir}/val/<class>/* (the same"
            " class folder names in both; sort the official flat val/ into class folders first)."
        )
        try:  # a missing folder, a file or a folder without class folders
            classes = [set(find_classes(f"{self.data_dir}/{split}")[0]) for split in ("train", "val")]
        except (FileNotFoundError, NotADirectoryError) as err:
            raise FileNotFoundError(f"{err} {hint}") from err
        train_classes, val_classes = classes
        if train_classes != val_classes:
            raise ValueError(
                "Expected the same class folders in train/ and val/ (labels follow the sorted folder names), but"
                f" only in train {sorted(train_classes - val_classes)[:5]}, only in val"
                f" {sorted(val_classes - train_classes)[:5]}. {hint}"
            )
        if len(train_classes) != self.num_classes:
            raise ValueError(
                f"Expected {self.num_classes} class folders (`num_classes`), but '{self.data_dir}/train'"
                f" holds {len(train_classes)}. Pass `num_classes={len(train_classes)}`."
            )
        folder = Path(self.data_dir) / ("train" if train else "val")
        try:
            return tv_datasets.ImageFolder(str(folder), loader=_load_image)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"Empty class folders in '{folder}': {err} {hint}") from err

    @override
    def _transforms(self) -> tuple[GeometryTransform, GeometryTransform, GeometryTransform]:
        size = self.image_size
        return (
            RandomResizedCropFlip(size, scale=self.scale),
            _ResizeCenterCrop(self.resize_size, size),
            _WholeImage((size, size)),
        )


_FMNIST_FILES = [f"{split}-{kind}-ubyte" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]


class FashionMNISTDataModule(VisionDataModule):
    """Fashion-MNIST from its four IDX files: the default that works offline.

    The files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` are taken from the first of
    ``data_dir``, ``data_dir/FashionMNIST/raw`` (where ``download=True`` puts them) and ``system_dir``
    that holds all four. Training adds ``RandomCrop(pad_to, padding=4)`` and a flip.

    Args:
        channels: 1 (gray) or 3 (gray repeated, for RGB networks and attention models).
        pad_to: output side in pixels (zero padding), at least 28.
        system_dir: last folder to look in; ``None`` skips it.
        data_dir, **kwargs: as in :class:`VisionDataModule`.

    Example::

        >>> dm = FashionMNISTDataModule("data", channels=1, pad_to=28, batch_size=64)
        >>> dm.dims, dm.num_classes, dm.mean
        ((1, 28, 28), 10, (0.286,))
    """

    name = "fashion_mnist"
    num_classes = 10
    _offline_hint = (
        f"run `apt-get install dataset-fashion-mnist` (into {FASHION_MNIST_SYSTEM_DIR}) or put the four"
        " IDX files in `data_dir`."
    )

    def __init__(
        self,
        data_dir: str = "data",
        *,
        channels: Literal[1, 3] = 3,
        pad_to: int = 32,
        system_dir: Optional[str] = FASHION_MNIST_SYSTEM_DIR,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, **kwargs)
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"Expected `channels` to be 1 or 3, but got {channels!r}.")
        hint = " Fashion-MNIST images are 28 px; pass 28 to keep them unpadded."
        self.pad_to = check_int(pad_to, "pad_to", minimum=28, hint=hint)
        self.channels, self.system_dir = int(channels), system_dir
        self.dims = (self.channels, self.pad_to, self.pad_to)
        self.mean, self.std = (0.2860,) * self.channels, (0.3530,) * self.channels

    @override
    def _download(self) -> None:
        try:
            self._find_files()
        except FileNotFoundError:
            tv_datasets.FashionMNIST(self.data_dir, download=True)  # fetches the test files too

    def _find_files(self) -> dict[str, Path]:
        """The four IDX files, by name without ``.gz``, from the first folder that holds them all."""
        looked = []
        folders = [Path(self.data_dir), Path(self.data_dir) / "FashionMNIST" / "raw"]
        for folder in folders + ([Path(self.system_dir)] if self.system_dir is not None else []):
            # The plain file comes last, so it wins over the .gz one.
            candidates = [(stem, path) for stem in _FMNIST_FILES for path in (folder / f"{stem}.gz", folder / stem)]
            found = {stem: path for stem, path in candidates if path.is_file()}
            if len(found) == len(_FMNIST_FILES):
                return found
            if found:
                missing = [stem for stem in _FMNIST_FILES if stem not in found]
                raise FileNotFoundError(
                    f"'{folder}' holds only part of Fashion-MNIST: {missing} (or .gz) are missing."
                    " Add them, or remove the partial copy so that the next location is used."
                )
            looked.append(f"'{folder}' ({'no IDX files' if folder.is_dir() else 'does not exist'})")
        raise FileNotFoundError(
            f"Fashion-MNIST not found: looked for {', '.join(_FMNIST_FILES)} (or .gz) in"
            f" {', '.join(looked)}. Pass `download=True` (needs internet), or {self._offline_hint}"
        )

    @override
    def _base_dataset(self, train: bool) -> Dataset:
        prefix, files = ("train" if train else "t10k"), self._find_files()
        image_path, label_path = files[f"{prefix}-images-idx3-ubyte"], files[f"{prefix}-labels-idx1-ubyte"]
        images, labels = _read_idx(image_path, 2051), _read_idx(label_path, 2049)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Expected as many labels as images, but '{image_path}' holds {images.shape[0]} images"
                f" and '{label_path}' {labels.shape[0]} labels."
            )
        check_class_indices(labels, self.num_classes, where=f" in '{label_path}'")
        if max(images.shape[1:]) > self.pad_to:
            raise ValueError(
                f"Expected `pad_to` to be at least the image size {tuple(images.shape[1:])} of"
                f" '{image_path}', but got {self.pad_to}."
            )
        return _TensorImages(images, labels, self.pad_to, "RGB" if self.channels == 3 else "L")
