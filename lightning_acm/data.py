"""LightningDataModules: CIFAR-10/100, ImageNet folders and Fashion-MNIST (the offline default).

Every datamodule derives from :class:`VisionDataModule`, and they all behave the same way:

* ``prepare_data`` only downloads (and only with ``download=True``); ``setup(stage)`` builds the
  datasets and raises ``FileNotFoundError``/``ValueError`` naming the path and how to get the data.
* The validation set is carved from the *training* set by a permutation seeded with ``seed``:
  the first ``val_split`` permuted indices validate, the rest train (the two are disjoint), and
  validation samples go through the evaluation transforms. The official test split is the
  test set (and the predict set). ``train_subset``/``test_subset`` then keep a seeded subset.
* Images are normalised with ``mean``/``std`` (one value per channel, exposed on the datamodule
  so the attention model can undo it); ``dims`` is ``(C, H, W)`` after the transforms.

**Augmentation geometry.** The random crop and flip are sampled by :class:`RandomCropFlip` and
:class:`RandomResizedCropFlip`, which return the parameters they used. With
``record_augmentation=True`` a training sample is ``(image, target, geometry)``, where
``geometry`` is float32 ``[index, y0, x0, y1, x1, flipped]``:

* ``index`` is the sample's index into the full, un-augmented training dataset (before the split
  and the subset; the same across epochs; exact as float32 up to 2**24 samples);
* ``(y0, x0, y1, x1)`` is the crop box in normalised coordinates of the *reference image*
  (``0..1`` spans it; a crop that reaches into zero padding gives values below 0 or above 1,
  e.g. ``y0 = (top - 4) / 32`` for a 32 px image padded by 4);
* ``flipped`` is 1.0 when the crop was flipped horizontally (the flip follows the crop).

The reference image is what :meth:`VisionDataModule.train_reference_dataset` returns for that
index: the whole training image without random crop or flip (Fashion-MNIST: padded to
``pad_to``; ImageNet: the whole image resized to ``image_size x image_size``), normalised. So a
heatmap computed once on the reference image can be cropped and flipped to match any epoch's
augmented view.

Example::

    >>> import tempfile, torch
    >>> from lightning_acm.data import FashionMNISTDataModule, write_idx
    >>> root = tempfile.mkdtemp()
    >>> for split, n in (("train", 120), ("t10k", 30)):
    ...     write_idx(f"{root}/{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8))
    ...     write_idx(f"{root}/{split}-labels-idx1-ubyte.gz", torch.arange(n, dtype=torch.uint8) % 10)
    >>> dm = FashionMNISTDataModule(root, val_split=20, batch_size=16, record_augmentation=True)
    >>> dm.setup("fit")
    >>> images, targets, geometry = next(iter(dm.train_dataloader()))
    >>> images.shape, targets.shape, geometry.shape, dm.dims, dm.num_classes
    (torch.Size([16, 3, 32, 32]), torch.Size([16]), torch.Size([16, 6]), (3, 32, 32), 10)
    >>> len(dm.train_set), len(dm.val_set)
    (100, 20)
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.datasets.folder import default_loader
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from typing_extensions import override

__all__ = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "FASHION_MNIST_SYSTEM_DIR",
    "FashionMNISTDataModule",
    "ImageNetDataModule",
    "RandomCropFlip",
    "RandomResizedCropFlip",
    "ResizeCenterCrop",
    "VisionDataModule",
    "read_idx",
    "write_idx",
]

#: Where ``apt-get install dataset-fashion-mnist`` puts the four IDX files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

Stage = Optional[Literal["fit", "validate", "test", "predict"]]
_STAGES = (None, "fit", "validate", "test", "predict")
# A geometry transform maps an image to (image, float32 [y0, x0, y1, x1, flipped]).
GeometryTransform = Callable[[Any], tuple[Any, Tensor]]


# --------------------------------------------------------------------------- argument checks


def _check_int(value: Any, name: str, minimum: int, hint: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"Expected `{name}` to be {kind}, but got {value!r}.{hint}")


def _check_optional_int(value: Any, name: str) -> None:
    if value is not None:
        _check_int(value, name, 1, " Pass None to use all samples.")


def _check_probability(value: Any, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Expected `{name}` to be in [0, 1], but got {value!r}.")


def _image_size(image: Any) -> tuple[int, int]:
    _, height, width = TF.get_dimensions(image)
    return height, width


def _box(top: float, left: float, height: float, width: float, image_size: tuple[int, int], flipped: bool) -> Tensor:
    ih, iw = image_size
    return torch.tensor(
        [top / ih, left / iw, (top + height) / ih, (left + width) / iw, float(flipped)], dtype=torch.float32
    )


# --------------------------------------------------------------------------- geometry transforms


class RandomCropFlip:
    """Zero-pad by ``padding``, take a random ``size`` crop, then flip horizontally with probability ``flip_p``.

    The same augmentation as ``Compose([RandomCrop(size, padding), RandomHorizontalFlip(flip_p)])``,
    but the call returns ``(image, box)`` with ``box`` float32 ``[y0, x0, y1, x1, flipped]`` in
    normalised coordinates of the *input* image (negative or above 1 where the crop covers the
    padding). Works on PIL images and ``(..., H, W)`` tensors; randomness comes from torch's
    global generator, which the ``DataLoader`` seeds differently in each worker.

    Example::

        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> image, box = RandomCropFlip(32, padding=4)(torch.rand(3, 32, 32))
        >>> image.shape, box.shape, bool((box[2:4] - box[0:2] == 1).all())
        (torch.Size([3, 32, 32]), torch.Size([5]), True)
    """

    def __init__(self, size: Union[int, tuple[int, int]], *, padding: int = 0, flip_p: float = 0.5) -> None:
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if min(self.size) < 1:
            raise ValueError(f"Expected `size` to be positive, but got {size!r}.")
        _check_int(padding, "padding", 0)
        _check_probability(flip_p, "flip_p")
        self.padding = padding
        self.flip_p = float(flip_p)

    def __call__(self, image: Any) -> tuple[Any, Tensor]:
        original = _image_size(image)
        padded = TF.pad(image, self.padding) if self.padding else image
        top, left, height, width = T.RandomCrop.get_params(padded, self.size)
        image = TF.crop(padded, top, left, height, width)
        flipped = bool(torch.rand(()) < self.flip_p)
        if flipped:
            image = TF.hflip(image)
        pad = self.padding
        return image, _box(top - pad, left - pad, height, width, original, flipped)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, padding={self.padding}, flip_p={self.flip_p})"


class RandomResizedCropFlip:
    """``RandomResizedCrop`` followed by a horizontal flip with probability ``flip_p``; returns the geometry.

    The call returns ``(image, box)`` with ``box`` float32 ``[y0, x0, y1, x1, flipped]``: the
    sampled crop in normalised coordinates of the input image (always within ``[0, 1]``).

    Example::

        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> image, box = RandomResizedCropFlip(16)(torch.rand(3, 40, 60))
        >>> image.shape, bool(((box[:4] >= 0) & (box[:4] <= 1)).all())
        (torch.Size([3, 16, 16]), True)
    """

    def __init__(
        self,
        size: Union[int, tuple[int, int]],
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    ) -> None:
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if min(self.size) < 1:
            raise ValueError(f"Expected `size` to be positive, but got {size!r}.")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"Expected `scale` to satisfy 0 < min <= max <= 1, but got {scale!r}.")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"Expected `ratio` to satisfy 0 < min <= max, but got {ratio!r}.")
        _check_probability(flip_p, "flip_p")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_p = float(flip_p)
        self.interpolation = interpolation

    def __call__(self, image: Any) -> tuple[Any, Tensor]:
        original = _image_size(image)
        top, left, height, width = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        image = TF.resized_crop(image, top, left, height, width, list(self.size), self.interpolation, antialias=True)
        flipped = bool(torch.rand(()) < self.flip_p)
        if flipped:
            image = TF.hflip(image)
        return image, _box(top, left, height, width, original, flipped)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip_p={self.flip_p})"


class ResizeCenterCrop:
    """Resize the shorter side to ``resize_size``, then center-crop ``crop_size`` (the ImageNet evaluation view).

    Returns ``(image, box)`` like the random transforms, with ``flipped = 0``.

    Example::

        >>> import torch
        >>> image, box = ResizeCenterCrop(8, 4)(torch.rand(3, 16, 16))
        >>> image.shape, box.tolist()
        (torch.Size([3, 4, 4]), [0.25, 0.25, 0.75, 0.75, 0.0])
    """

    def __init__(self, resize_size: int, crop_size: int) -> None:
        _check_int(resize_size, "resize_size", 1)
        _check_int(crop_size, "crop_size", 1)
        if crop_size > resize_size:
            raise ValueError(
                f"Expected `crop_size` to be at most `resize_size`, but got {crop_size} > {resize_size}."
            )
        self.resize_size = resize_size
        self.crop_size = crop_size

    def __call__(self, image: Any) -> tuple[Any, Tensor]:
        resized = TF.resize(image, [self.resize_size], antialias=True)
        height, width = _image_size(resized)
        # torchvision's center_crop rounds the offsets this way.
        top = int(round((height - self.crop_size) / 2.0))
        left = int(round((width - self.crop_size) / 2.0))
        image = TF.crop(resized, top, left, self.crop_size, self.crop_size)
        return image, _box(top, left, self.crop_size, self.crop_size, (height, width), False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize_size={self.resize_size}, crop_size={self.crop_size})"


class _WholeImage:
    """The whole image, optionally resized to ``size`` (aspect ratio not kept); the box is [0, 0, 1, 1]."""

    def __init__(self, size: Optional[tuple[int, int]] = None) -> None:
        self.size = size

    def __call__(self, image: Any) -> tuple[Any, Tensor]:
        if self.size is not None:
            image = TF.resize(image, list(self.size), antialias=True)
        return image, torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0])


class _ToNormalizedTensor:
    """PIL image -> float tensor, gray repeated to ``channels``, normalised with ``mean``/``std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int) -> None:
        self.mean, self.std, self.channels = list(mean), list(std), channels

    def __call__(self, image: Any) -> Tensor:
        tensor = TF.to_tensor(image) if not isinstance(image, Tensor) else image
        if tensor.shape[0] == 1 and self.channels > 1:
            tensor = tensor.repeat(self.channels, 1, 1)
        return TF.normalize(tensor, self.mean, self.std)


# --------------------------------------------------------------------------- datasets


class _TransformedSet(Dataset):
    """``base[indices[i]]`` through a geometry transform and ``to_tensor``.

    ``output`` picks the sample: ``"pair"`` -> ``(image, target)``, ``"geometry"`` ->
    ``(image, target, [index, y0, x0, y1, x1, flipped])``, ``"index"`` -> ``(image, target, index)``.
    """

    def __init__(
        self,
        base: Dataset,
        indices: Optional[Tensor],
        transform: GeometryTransform,
        to_tensor: Callable[[Any], Tensor],
        output: Literal["pair", "geometry", "index"] = "pair",
    ) -> None:
        self.base = base
        # A tensor, not a list: forked workers would otherwise copy a list of Python ints page by page.
        self.indices = indices
        self.transform = transform
        self.to_tensor = to_tensor
        self.output = output

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: int) -> tuple[Any, ...]:
        if not -len(self) <= item < len(self):
            raise IndexError(f"Index {item} is out of range for a dataset of {len(self)} samples.")
        index = int(self.indices[item]) if self.indices is not None else item % len(self)
        image, target = self.base[index]
        image, box = self.transform(image)
        image = self.to_tensor(image)
        if self.output == "geometry":
            return image, target, torch.cat((torch.tensor([index], dtype=torch.float32), box))
        if self.output == "index":
            return image, target, index
        return image, target


class _TensorImages(Dataset):
    """``(N, H, W)`` uint8 images and ``(N,)`` labels, zero-padded to ``pad_to``, served as (PIL, int)."""

    def __init__(self, images: Tensor, targets: Tensor, pad_to: int) -> None:
        height, width = images.shape[-2:]
        top, left = (pad_to - height) // 2, (pad_to - width) // 2
        padding = (left, pad_to - width - left, top, pad_to - height - top)
        self.images = F.pad(images, padding) if any(padding) else images
        self.targets = targets.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index].numpy()), int(self.targets[index])


def _load_image(path: str) -> Image.Image:
    """``default_loader`` that names the file when it cannot be decoded."""
    try:
        return default_loader(path)
    except (OSError, ValueError, SyntaxError) as err:
        raise OSError(
            f"Could not read the image file '{path}' ({type(err).__name__}: {err}). Remove or replace the file."
        ) from err


# --------------------------------------------------------------------------- IDX files


_IDX_UBYTE = 0x08


def read_idx(path: Union[str, Path], *, expected_magic: Optional[int] = None) -> Tensor:
    """Read an unsigned-byte IDX file (the MNIST/Fashion-MNIST format), gzipped when the name ends in ``.gz``.

    The header is the big-endian magic number ``0x0000 08 nd`` (2051 for 3-D images, 2049 for
    1-D labels) followed by ``nd`` big-endian uint32 sizes; then the uint8 data.

    Returns:
        a uint8 tensor with the stored shape.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming ``path`` if the file is not valid gzip, the magic number is wrong
            (or differs from ``expected_magic``), or the data is truncated or has trailing bytes.

    Example::

        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/labels-idx1-ubyte"
        >>> write_idx(path, torch.tensor([3, 1, 4], dtype=torch.uint8))
        >>> read_idx(path, expected_magic=2049)
        tensor([3, 1, 4], dtype=torch.uint8)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file '{path}' does not exist.")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                raw = stream.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as err:
        raise ValueError(
            f"Could not read the IDX file '{path}' ({err}); it is corrupt or truncated. Replace it with a fresh copy."
        ) from err
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic is None or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] == 0:
        raise ValueError(
            f"Expected '{path}' to be an unsigned-byte IDX file (magic number 0x000008nd, e.g. 2051 for"
            f" images, 2049 for labels), but got magic number {magic!r}."
        )
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"Expected the IDX file '{path}' to have magic number {expected_magic}, but got {magic}.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"The IDX file '{path}' is truncated: its header needs {header} bytes, but it has {len(raw)}.")
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape)
    if len(raw) - header != expected:
        problem = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise ValueError(
            f"The IDX file '{path}' is {problem}: shape {shape} needs {expected} data bytes, but it has"
            f" {len(raw) - header}. Replace it with a fresh copy."
        )
    data = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
    return torch.from_numpy(data.copy())


def write_idx(path: Union[str, Path], data: Tensor) -> None:
    """Write a uint8 tensor as an IDX file (gzipped when ``path`` ends in ``.gz``); the inverse of :func:`read_idx`.

    Raises:
        ValueError: if ``data`` is not a uint8 tensor with 1 to 255 dimensions.
    """
    if not isinstance(data, Tensor) or data.dtype != torch.uint8 or not 1 <= data.ndim <= 255:
        raise ValueError(f"Expected `data` to be a uint8 tensor with at least one dimension, but got {data!r:.80}.")
    header = bytes([0, 0, _IDX_UBYTE, data.ndim]) + np.asarray(data.shape, dtype=">u4").tobytes()
    payload = header + data.contiguous().numpy().tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as stream:
            stream.write(payload)
    else:
        path.write_bytes(payload)


# --------------------------------------------------------------------------- base datamodule


class VisionDataModule(LightningDataModule):
    """Base for the image-classification datamodules: split, subsets, transforms and loaders.

    Subclasses set ``name``, ``num_classes``, ``dims``, ``mean`` and ``std`` and implement
    ``_check_data`` (raise when the files are missing), ``_base_dataset(train)`` (un-transformed
    ``(PIL image, int)`` samples) and the three geometry transforms (training, evaluation,
    reference); everything else lives here.

    Args:
        data_dir: the folder holding (or receiving) the data.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size; ``None`` uses ``batch_size``.
        num_workers: ``DataLoader`` worker processes (0 loads in the main process).
        pin_memory: pin batches in page-locked memory; only takes effect where CUDA is available.
        persistent_workers: keep workers alive between epochs; only takes effect with ``num_workers > 0``.
        val_split: validation samples carved from the training set: a count (``int``) or a fraction
            in ``[0, 1)`` (``float``); ``0`` turns validation off (``val_dataloader`` returns ``[]``).
        seed: seeds the split and the subsets (not the augmentation).
        train_subset: keep this many of the training samples left after the split (seeded).
        test_subset: keep this many test samples (seeded).
        augment: random crop and flip on the training set; ``False`` uses the evaluation view.
        record_augmentation: training samples become ``(image, target, geometry)`` (see the module docs).
        download: let ``prepare_data`` download the data (needs internet).
        drop_last: drop the last incomplete training batch.

    Raises:
        ValueError: if an argument is out of range (the message names it).
    """

    name: ClassVar[str] = "vision"
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
        _check_int(batch_size, "batch_size", 1)
        if eval_batch_size is not None:
            _check_int(eval_batch_size, "eval_batch_size", 1, " Pass None to use `batch_size`.")
        _check_int(num_workers, "num_workers", 0)
        if isinstance(val_split, bool) or not isinstance(val_split, (int, float)):
            raise ValueError(
                f"Expected `val_split` to be an int (a count) or a float (a fraction), but got {val_split!r}."
            )
        if isinstance(val_split, int) and val_split < 0:
            raise ValueError(f"Expected `val_split` to be a count >= 0, but got {val_split}.")
        if isinstance(val_split, float) and not 0.0 <= val_split < 1.0:
            raise ValueError(f"Expected `val_split` as a fraction to be in [0, 1), but got {val_split}.")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"Expected `seed` to be an int, but got {seed!r}.")
        _check_optional_int(train_subset, "train_subset")
        _check_optional_int(test_subset, "test_subset")
        self.data_dir = str(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.val_split = val_split
        self.seed = seed
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.augment = augment
        self.record_augmentation = record_augmentation
        self.download = download
        self.drop_last = drop_last
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        self._train_base: Optional[Dataset] = None
        self._train_indices: Optional[Tensor] = None
        self._val_indices: Optional[Tensor] = None

    # ------------------------------------------------------------------ hooks for subclasses

    def _download(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot download its data.")

    def _check_data(self) -> None:
        """Raise ``FileNotFoundError``/``ValueError`` naming the path when the data is missing."""
        raise NotImplementedError

    def _base_dataset(self, train: bool) -> Dataset:
        """The un-transformed training or test set, with ``(PIL image, int target)`` samples."""
        raise NotImplementedError

    def _train_transform(self) -> GeometryTransform:
        raise NotImplementedError

    def _eval_transform(self) -> GeometryTransform:
        return _WholeImage()

    def _reference_transform(self) -> GeometryTransform:
        return _WholeImage()

    def _to_tensor(self) -> Callable[[Any], Tensor]:
        return _ToNormalizedTensor(self.mean, self.std, self.dims[0])

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def prepare_data(self) -> None:
        """Download the data when ``download=True``; do nothing otherwise."""
        if self.download:
            self._download()

    @override
    def setup(self, stage: Optional[str] = None) -> None:
        """Build the datasets for ``stage`` (``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or ``None`` for all).

        Raises:
            FileNotFoundError: if the data is not where it should be (the message says how to get it).
            ValueError: if the split, the subsets or the batch size do not fit the dataset size.
        """
        if stage not in _STAGES:
            raise ValueError(
                f"Expected `stage` to be one of 'fit', 'validate', 'test', 'predict' or None, but got {stage!r}."
            )
        if stage in (None, "fit", "validate") and self.train_set is None:
            self._check_data()
            base = self._training_base()
            train_indices, val_indices = self._split(len(base))  # type: ignore[arg-type]
            self._train_indices, self._val_indices = train_indices, val_indices
            to_tensor = self._to_tensor()
            train_transform = self._train_transform() if self.augment else self._eval_transform()
            output = "geometry" if self.record_augmentation else "pair"
            self.train_set = _TransformedSet(base, train_indices, train_transform, to_tensor, output)
            self.val_set = (
                _TransformedSet(base, val_indices, self._eval_transform(), to_tensor) if len(val_indices) else None
            )
        if stage in (None, "test", "predict") and self.test_set is None:
            self._check_data()
            base = self._base_dataset(train=False)
            size = len(base)  # type: ignore[arg-type]
            if size == 0:
                raise ValueError(f"The {self.name} test set in '{self.data_dir}' is empty.")
            indices = None
            if self.test_subset is not None:
                if self.test_subset > size:
                    raise ValueError(
                        f"Expected `test_subset` to be at most the {size} test samples, but got {self.test_subset}."
                    )
                generator = torch.Generator().manual_seed(self.seed)
                indices = torch.randperm(size, generator=generator)[: self.test_subset].sort().values
            self.test_set = _TransformedSet(base, indices, self._eval_transform(), self._to_tensor())

    def _training_base(self) -> Dataset:
        if self._train_base is None:
            base = self._base_dataset(train=True)
            if len(base) == 0:  # type: ignore[arg-type]
                raise ValueError(f"The {self.name} training set in '{self.data_dir}' is empty.")
            self._train_base = base
        return self._train_base

    def _split(self, size: int) -> tuple[Tensor, Tensor]:
        if isinstance(self.val_split, float):
            num_val = int(round(size * self.val_split))
            if self.val_split > 0 and num_val == 0:
                raise ValueError(
                    f"Expected `val_split` to select at least one of the {size} training samples, but"
                    f" {self.val_split} selects none. Pass a larger fraction, a count, or 0 to turn validation off."
                )
        else:
            num_val = self.val_split
        if num_val >= size:
            raise ValueError(
                f"Expected `val_split` to leave training samples, but it takes {num_val} of the {size}"
                " training samples. Pass a smaller count or a fraction such as 0.1."
            )
        permutation = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed))
        val_indices, train_indices = permutation[:num_val], permutation[num_val:]
        if self.train_subset is not None:
            if self.train_subset > len(train_indices):
                raise ValueError(
                    f"Expected `train_subset` to be at most the {len(train_indices)} training samples left after"
                    f" the validation split, but got {self.train_subset}."
                )
            train_indices = train_indices[: self.train_subset]
        if self.drop_last and len(train_indices) < self.batch_size:
            raise ValueError(
                f"Expected `batch_size` to be at most the {len(train_indices)} training samples, but got"
                f" {self.batch_size}; with `drop_last=True` no batch would be left. Pass a smaller `batch_size`."
            )
        return train_indices.sort().values, val_indices.sort().values

    # ------------------------------------------------------------------ public views

    @property
    def train_indices(self) -> Tensor:
        """Indices into the full training dataset that train (after the split and ``train_subset``).

        Calls ``setup("fit")`` first where it has not run.
        """
        if self._train_indices is None:
            self.setup("fit")
        return self._train_indices  # type: ignore[return-value]

    @property
    def val_indices(self) -> Tensor:
        """Indices into the full training dataset that validate (disjoint from ``train_indices``)."""
        if self._val_indices is None:
            self.setup("fit")
        return self._val_indices  # type: ignore[return-value]

    def train_reference_dataset(self) -> Dataset:
        """The full training set (all indices, split ignored) without random crop or flip, normalised.

        Samples are ``(image, target, index)`` with ``index`` the training-set index that
        ``geometry[0]`` refers to; the image is the reference frame of the recorded boxes.

        Raises:
            FileNotFoundError: if the training data is missing.
        """
        self._check_data()
        return _TransformedSet(
            self._training_base(), None, self._reference_transform(), self._to_tensor(), output="index"
        )

    # ------------------------------------------------------------------ loaders

    def _data_loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train or self.eval_batch_size is None else self.eval_batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (``(images, targets)`` or ``(images, targets, geometry)``)."""
        if self.train_set is None:
            self.setup("fit")
        return self._data_loader(self.train_set, train=True)  # type: ignore[arg-type]

    @override
    def val_dataloader(self) -> Union[DataLoader, list]:
        """Validation batches in a fixed order; ``[]`` when ``val_split=0`` (Lightning then skips validation)."""
        if self.train_set is None:
            self.setup("validate")
        return [] if self.val_set is None else self._data_loader(self.val_set, train=False)

    @override
    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        if self.test_set is None:
            self.setup("test")
        return self._data_loader(self.test_set, train=False)  # type: ignore[arg-type]

    @override
    def predict_dataloader(self) -> DataLoader:
        """The test set again, for ``trainer.predict``."""
        if self.test_set is None:
            self.setup("predict")
        return self._data_loader(self.test_set, train=False)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- CIFAR


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10 from torchvision's ``cifar-10-batches-py`` folder in ``data_dir``.

    Training: ``RandomCrop(32, padding=4)`` and a horizontal flip; evaluation: the image as is;
    both then ``ToTensor`` and ``Normalize(mean, std)``. Arguments: see :class:`VisionDataModule`.

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

    def _folder(self) -> Path:
        return Path(self.data_dir) / self.dataset_cls.base_folder

    def _how_to_get(self) -> str:
        return (
            f"Pass `download=True` (needs internet) or place the extracted `{self.dataset_cls.base_folder}` folder"
            f" (from {self.dataset_cls.filename}) in data_dir."
        )

    @override
    def _download(self) -> None:
        try:
            self.dataset_cls(self.data_dir, train=True, download=True)
        except (OSError, RuntimeError) as err:
            raise RuntimeError(
                f"Could not download {self.name} into '{self.data_dir}' ({err}). Without internet, place the"
                f" extracted `{self.dataset_cls.base_folder}` folder in data_dir and pass `download=False`."
            ) from err

    @override
    def _check_data(self) -> None:
        root = Path(self.data_dir)
        if not root.is_dir():
            raise FileNotFoundError(
                f"Expected `data_dir` to be a directory holding `{self.dataset_cls.base_folder}`, but '{root}'"
                f" does not exist. {self._how_to_get()}"
            )
        names = [name for name, _ in self.dataset_cls.train_list + self.dataset_cls.test_list]
        names.append(self.dataset_cls.meta["filename"])
        missing = [name for name in names if not (self._folder() / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.name} files {missing} are missing from '{self._folder()}'. {self._how_to_get()}"
            )

    @override
    def _base_dataset(self, train: bool) -> Dataset:
        try:
            return self.dataset_cls(self.data_dir, train=train, download=False)
        except RuntimeError as err:
            raise ValueError(
                f"The {self.name} files in '{self._folder()}' failed torchvision's integrity (md5) check ({err})."
                f" Delete the folder and pass `download=True`, or replace it with a fresh copy."
            ) from err

    @override
    def _train_transform(self) -> GeometryTransform:
        return RandomCropFlip(self.dims[1:], padding=4)


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


# --------------------------------------------------------------------------- ImageNet


class ImageNetDataModule(VisionDataModule):
    """ImageNet (or any ImageFolder tree) from ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*``.

    ``val/`` is the test set; validation is carved from ``train/`` (see :class:`VisionDataModule`).
    Training: ``RandomResizedCrop(image_size, scale)`` and a horizontal flip; evaluation:
    ``Resize(resize_size)`` and ``CenterCrop(image_size)``. The reference view for the geometry
    (``train_reference_dataset``) is the whole image resized to ``image_size x image_size``:
    the aspect ratio is distorted so that boxes, in normalised coordinates of the original image,
    map onto it directly. Unreadable image files raise an ``OSError`` naming the file.

    Args:
        data_dir: the folder holding ``train/`` and ``val/``.
        num_classes: number of class folders expected (checked in ``setup``).
        image_size: side of the training and evaluation crops.
        resize_size: shorter side before the evaluation center crop; ``None`` gives
            ``round(image_size / 0.875)`` (256 for 224).
        scale: area range of ``RandomResizedCrop``.
        **kwargs: the arguments of :class:`VisionDataModule` (``download=True`` is refused).

    Example::

        >>> dm = ImageNetDataModule("data/imagenet", image_size=160)
        >>> dm.dims, dm.num_classes, dm.resize_size
        ((3, 160, 160), 1000, 183)
    """

    name = "imagenet"
    num_classes = 1000
    dims = (3, 224, 224)
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
                "Expected `download` to be False: ImageNet cannot be downloaded automatically (it needs a registered"
                " account at image-net.org). Place it as data_dir/train/<class>/*.JPEG and data_dir/val/<class>/*."
            )
        super().__init__(data_dir, **kwargs)
        _check_int(num_classes, "num_classes", 1)
        _check_int(image_size, "image_size", 1)
        if resize_size is None:
            resize_size = int(round(image_size / 0.875))
        _check_int(resize_size, "resize_size", 1)
        if resize_size < image_size:
            raise ValueError(
                f"Expected `resize_size` to be at least `image_size` ({image_size}), but got {resize_size}."
            )
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"Expected `scale` to satisfy 0 < min <= max <= 1, but got {scale!r}.")
        self.num_classes = num_classes
        self.image_size = image_size
        self.resize_size = resize_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.dims = (3, image_size, image_size)

    def _layout_hint(self) -> str:
        return (
            f"Expected the layout {self.data_dir}/train/<class>/*.JPEG and {self.data_dir}/val/<class>/* (the"
            " same class folder names in both; sort the official flat val/ into class folders first)."
        )

    def _class_folders(self, split: str) -> list[str]:
        folder = Path(self.data_dir) / split
        if not folder.is_dir():
            raise FileNotFoundError(f"The {self.name} folder '{folder}' does not exist. {self._layout_hint()}")
        classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
        if not classes:
            raise FileNotFoundError(f"'{folder}' holds no class folders. {self._layout_hint()}")
        return classes

    @override
    def _check_data(self) -> None:
        if not Path(self.data_dir).is_dir():
            raise FileNotFoundError(f"`data_dir` '{self.data_dir}' does not exist. {self._layout_hint()}")
        train_classes, val_classes = self._class_folders("train"), self._class_folders("val")
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))[:5]
            only_val = sorted(set(val_classes) - set(train_classes))[:5]
            raise ValueError(
                "Expected the same class folders in train/ and val/ (labels are assigned by sorted folder name),"
                f" but {len(train_classes)} != {len(val_classes)} or names differ: only in train {only_train},"
                f" only in val {only_val}. {self._layout_hint()}"
            )
        if len(train_classes) != self.num_classes:
            raise ValueError(
                f"Expected {self.num_classes} class folders (`num_classes`), but '{self.data_dir}/train' holds"
                f" {len(train_classes)}. Pass `num_classes={len(train_classes)}`."
            )

    @override
    def _base_dataset(self, train: bool) -> Dataset:
        folder = Path(self.data_dir) / ("train" if train else "val")
        try:
            return tv_datasets.ImageFolder(str(folder), loader=_load_image)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"Empty class folders in '{folder}': {err} {self._layout_hint()}") from err

    @override
    def _train_transform(self) -> GeometryTransform:
        return RandomResizedCropFlip(self.image_size, scale=self.scale)

    @override
    def _eval_transform(self) -> GeometryTransform:
        return ResizeCenterCrop(self.resize_size, self.image_size)

    @override
    def _reference_transform(self) -> GeometryTransform:
        return _WholeImage((self.image_size, self.image_size))


# --------------------------------------------------------------------------- Fashion-MNIST


_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class FashionMNISTDataModule(VisionDataModule):
    """Fashion-MNIST from its four IDX files: the default that works offline.

    The files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (each gzipped or not) are looked
    for in ``data_dir``, then ``data_dir/FashionMNIST/raw`` (torchvision's layout, where
    ``download=True`` puts them), then ``system_dir`` (``apt-get install dataset-fashion-mnist``
    installs them in ``/usr/share/datasets/fashion-mnist``); the first folder holding all four is used.

    The 28 px gray images are zero-padded to ``pad_to`` px, repeated to ``channels`` channels (3
    lets CIFAR pipelines and ImageNet attention models apply), and normalised with the dataset's
    mean 0.2860 and std 0.3530 on every channel. Training adds ``RandomCrop(pad_to, padding=4)``
    and a horizontal flip unless ``augment=False``; the padded image is the geometry's reference frame.

    Args:
        data_dir: first folder to look in; ``download=True`` downloads into it.
        channels: 1 (gray) or 3 (gray repeated).
        pad_to: output side in pixels, at least 28.
        system_dir: last folder to look in; ``None`` skips it.
        **kwargs: the arguments of :class:`VisionDataModule`.

    Raises:
        ValueError: if ``channels`` or ``pad_to`` is out of range.

    Example::

        >>> dm = FashionMNISTDataModule("data", channels=1, pad_to=28)
        >>> dm.dims, dm.mean, dm.std
        ((1, 28, 28), (0.286,), (0.353,))
    """

    name = "fashion_mnist"
    num_classes = 10
    dims = (3, 32, 32)
    mean = (0.2860,) * 3
    std = (0.3530,) * 3

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
        _check_int(pad_to, "pad_to", 28, " Fashion-MNIST images are 28 px; pass 28 to keep them unpadded.")
        self.channels = channels
        self.pad_to = pad_to
        self.system_dir = system_dir
        self.dims = (channels, pad_to, pad_to)
        self.mean = (0.2860,) * channels
        self.std = (0.3530,) * channels

    def _candidate_dirs(self) -> list[Path]:
        dirs = [Path(self.data_dir), Path(self.data_dir) / "FashionMNIST" / "raw"]
        if self.system_dir is not None:
            dirs.append(Path(self.system_dir))
        return dirs

    def _find_files(self) -> tuple[Optional[dict[str, Path]], list[str]]:
        """The four file paths from the first folder holding them all, and what each folder lacked."""
        report = []
        for folder in self._candidate_dirs():
            if not folder.is_dir():
                report.append(f"'{folder}' (does not exist)")
                continue
            found: dict[str, Path] = {}
            for key, stem in _FMNIST_FILES.items():
                for name in (stem, stem + ".gz"):
                    if (folder / name).is_file():
                        found[key] = folder / name
                        break
            if len(found) == len(_FMNIST_FILES):
                return found, report
            missing = [stem for key, stem in _FMNIST_FILES.items() if key not in found]
            if found:
                raise FileNotFoundError(
                    f"'{folder}' holds only part of Fashion-MNIST: {missing} (or .gz) are missing. Add them, or"
                    " remove the partial copy so that the next location is used."
                )
            report.append(f"'{folder}' (no IDX files)")
        return None, report

    @override
    def _download(self) -> None:
        if self._find_files()[0] is not None:
            return
        try:
            for train in (True, False):
                tv_datasets.FashionMNIST(self.data_dir, train=train, download=True)
        except (OSError, RuntimeError) as err:
            raise RuntimeError(
                f"Could not download Fashion-MNIST into '{self.data_dir}' ({err}). Without internet, run"
                " `apt-get install dataset-fashion-mnist` or put the four IDX files in data_dir."
            ) from err

    @override
    def _check_data(self) -> None:
        files, report = self._find_files()
        if files is None:
            names = ", ".join(f"{stem}[.gz]" for stem in _FMNIST_FILES.values())
            raise FileNotFoundError(
                f"Fashion-MNIST not found: looked for {names} in {', '.join(report)}. Run"
                f" `apt-get install dataset-fashion-mnist` (installs them in {FASHION_MNIST_SYSTEM_DIR}), put the"
                " four IDX files in `data_dir`, or pass `download=True` (needs internet)."
            )

    def _load_split(self, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
        files, _ = self._find_files()
        if files is None:
            self._check_data()
        image_path, label_path = files[f"{split}_images"], files[f"{split}_labels"]  # type: ignore[index]
        images = read_idx(image_path, expected_magic=2051)
        labels = read_idx(label_path, expected_magic=2049)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Expected as many labels as images, but '{image_path}' holds {images.shape[0]} images and"
                f" '{label_path}' {labels.shape[0]} labels."
            )
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise ValueError(
                f"Expected labels in [0, {self.num_classes - 1}] in '{label_path}', but found {int(labels.max())}."
            )
        if max(images.shape[1:]) > self.pad_to:
            raise ValueError(
                f"Expected `pad_to` to be at least the image size {tuple(images.shape[1:])} of '{image_path}',"
                f" but got {self.pad_to}."
            )
        return images, labels

    @override
    def _base_dataset(self, train: bool) -> Dataset:
        images, labels = self._load_split("train" if train else "test")
        return _TensorImages(images, labels, self.pad_to)

    @override
    def _train_transform(self) -> GeometryTransform:
        return RandomCropFlip(self.pad_to, padding=4)
