"""Tests for lightning_acm.data: fake Fashion-MNIST, CIFAR and ImageNet trees written in tmp_path, no network."""

from __future__ import annotations

import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.transforms import functional as TF

from lightning_acm.data import (
    FASHION_MNIST_SYSTEM_DIR,
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageNetDataModule,
    RandomCropFlip,
    RandomResizedCropFlip,
    _read_idx,
    _ResizeCenterCrop,
    _write_idx,
)

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
N_TRAIN, N_TEST = 200, 50
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# --------------------------------------------------------------------------- fake data


def write_fmnist(
    folder: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, gz: bool = True
) -> dict[str, torch.Tensor]:
    """Four IDX files (train gzipped when `gz`, test never, so that both readers are exercised)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    arrays = {
        "train-images-idx3-ubyte": torch.randint(0, 256, (n_train, 28, 28), generator=generator, dtype=torch.uint8),
        "train-labels-idx1-ubyte": (torch.arange(n_train) % 10).to(torch.uint8),
        "t10k-images-idx3-ubyte": torch.randint(0, 256, (n_test, 28, 28), generator=generator, dtype=torch.uint8),
        "t10k-labels-idx1-ubyte": (torch.arange(n_test) % 10).to(torch.uint8),
    }
    for name, array in arrays.items():
        suffix = ".gz" if gz and name.startswith("train") else ""
        _write_idx(folder / (name + suffix), array)
    return arrays


def write_cifar(root: Path, cifar100: bool = False, per_batch: int = 20, n_test: int = 30) -> np.ndarray:
    """torchvision's CIFAR pickle layout; returns the training images (N, 32, 32, 3)."""
    rng = np.random.default_rng(0)
    cls = torchvision.datasets.CIFAR100 if cifar100 else torchvision.datasets.CIFAR10
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "fine_labels" if cifar100 else "labels"
    names = [name for name, _ in cls.train_list]
    n_train = per_batch * 5 if not cifar100 else per_batch
    data = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    chunks = np.split(data, len(names))
    for name, chunk in zip(names, chunks, strict=True):
        labels = [i % (100 if cifar100 else 10) for i in range(len(chunk))]
        (folder / name).write_bytes(pickle.dumps({"data": chunk, label_key: labels}))
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    (folder / cls.test_list[0][0]).write_bytes(pickle.dumps({"data": test, label_key: [0] * n_test}))
    meta_names = [f"class{i}" for i in range(100 if cifar100 else 10)]
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({cls.meta["key"]: meta_names}))
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def write_imagefolder(root: Path, classes=("ant", "bee", "cat"), n_train: int = 6, n_val: int = 2) -> Path:
    rng = np.random.default_rng(0)
    sizes = [(40, 56), (48, 36), (33, 33)]
    for split, count in (("train", n_train), ("val", n_val)):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = sizes[i % len(sizes)]
                array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(array).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fmnist")
    write_fmnist(folder)
    return folder


@pytest.fixture()
def fmnist_raw(fmnist_dir: Path) -> torch.Tensor:
    return _read_idx(fmnist_dir / "train-images-idx3-ubyte.gz", 2051)


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture()
def skip_cifar_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    # torchvision checks the md5 of every CIFAR file against the official archive (in `_check_integrity` and,
    # for the meta file, `check_integrity` in `_load_meta`); fake files cannot match, so the test turns it off.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


def fmnist(data_dir: Path, **kwargs) -> FashionMNISTDataModule:
    kwargs.setdefault("val_split", 40)
    kwargs.setdefault("batch_size", 16)
    kwargs.setdefault("system_dir", None)
    return FashionMNISTDataModule(str(data_dir), **kwargs)


# --------------------------------------------------------------------------- reproduction of the augmentation


def zero_value(mean, std) -> torch.Tensor:
    """What a zero (padding) pixel becomes after normalisation, computed by the same op as the pipeline."""
    return TF.normalize(torch.zeros(len(mean), 1, 1), list(mean), list(std))


def crop_by_slicing(reference: torch.Tensor, geometry: torch.Tensor, size: int, fill: torch.Tensor) -> torch.Tensor:
    """Reference implementation for integer crops: pad with `fill`, slice, flip."""
    channels, height, width = reference.shape
    top, left = round(float(geometry[1]) * height), round(float(geometry[2]) * width)
    pad = max(0, -top, -left, top + size - height, left + size - width)
    padded = fill.view(channels, 1, 1).expand(channels, height + 2 * pad, width + 2 * pad).clone()
    padded[:, pad : pad + height, pad : pad + width] = reference
    crop = padded[:, top + pad : top + pad + size, left + pad : left + pad + size]
    return crop.flip(-1) if geometry[5] > 0.5 else crop


def crop_by_grid_sample(
    references: torch.Tensor, geometry: torch.Tensor, size: int, fill: torch.Tensor
) -> torch.Tensor:
    """Batched version through `F.grid_sample` (what a heatmap cache would use), `fill` outside the image."""
    steps = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y0, x0, y1, x1, flipped = geometry[:, 1:].unbind(1)
    ys = y0[:, None] + (y1 - y0)[:, None] * steps
    xs = x0[:, None] + (x1 - x0)[:, None] * steps
    xs = torch.where(flipped[:, None] > 0.5, xs.flip(1), xs)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1) * 2 - 1
    fill = fill.view(1, -1, 1, 1)
    sampled = F.grid_sample(references - fill, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return sampled + fill


# --------------------------------------------------------------------------- IDX files


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), gz=st.booleans())
def test_idx_round_trip(tmp_path_factory: pytest.TempPathFactory, shape: list[int], gz: bool) -> None:
    data = torch.randint(0, 256, tuple(shape), dtype=torch.uint8)
    path = tmp_path_factory.mktemp("idx") / ("file.gz" if gz else "file")
    _write_idx(path, data)
    assert torch.equal(_read_idx(path, 0x800 + len(shape)), data)


def test_idx_errors(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    _write_idx(path, torch.arange(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"magic number 2051, but got 2049"):
        _read_idx(path, 2051)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"'.*truncated' is truncated"):
        _read_idx(truncated, 2049)
    trailing = tmp_path / "trailing"
    trailing.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="longer than its header says"):
        _read_idx(trailing, 2049)
    short_header = tmp_path / "short"
    short_header.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="header needs 16 bytes"):
        _read_idx(short_header, 2051)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match=r"'.*garbage' to have magic number 2049, but got 2303741511"):
        _read_idx(garbage, 2049)
    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"Could not read the IDX file '.*bad.gz'"):
        _read_idx(bad_gz, 2049)
    cut_gz = tmp_path / "cut.gz"
    cut_gz.write_bytes(gzip.compress(path.read_bytes())[:-10])
    with pytest.raises(ValueError, match=r"cut.gz.*corrupt or truncated"):
        _read_idx(cut_gz, 2049)


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fmnist_samples_are_padded_normalised_and_three_channel(fmnist_dir: Path, fmnist_raw: torch.Tensor) -> None:
    dm = fmnist(fmnist_dir)
    assert (dm.name, dm.num_classes, dm.dims) == ("fashion_mnist", 10, (3, 32, 32))
    assert dm.mean == (FMNIST_MEAN,) * 3 and dm.std == (FMNIST_STD,) * 3
    dm.setup("fit")
    assert len(dm.train_set) == N_TRAIN - 40 and len(dm.val_set) == 40
    image, target = dm.val_set[0]
    index = int(dm.val_indices[0])
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert target == index % 10 and isinstance(target, int)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    expected = (fmnist_raw[index].float() / 255 - FMNIST_MEAN) / FMNIST_STD
    torch.testing.assert_close(image[0, 2:30, 2:30], expected)
    padding_value = torch.tensor((0 - FMNIST_MEAN) / FMNIST_STD)
    torch.testing.assert_close(image[:, :2], padding_value.expand(3, 2, 32))
    torch.testing.assert_close(image[:, :, 30:], padding_value.expand(3, 32, 2))


def test_fmnist_one_channel_unpadded(fmnist_dir: Path, fmnist_raw: torch.Tensor) -> None:
    dm = fmnist(fmnist_dir, channels=1, pad_to=28, augment=False)
    assert dm.dims == (1, 28, 28) and dm.mean == (FMNIST_MEAN,) and dm.std == (FMNIST_STD,)
    dm.setup("fit")
    image, _ = dm.train_set[0]
    index = int(dm.train_indices[0])
    torch.testing.assert_close(image[0], (fmnist_raw[index].float() / 255 - FMNIST_MEAN) / FMNIST_STD)


def test_split_is_disjoint_seeded_and_uses_eval_transforms(fmnist_dir: Path) -> None:
    dm = fmnist(fmnist_dir, val_split=0.1, seed=3)
    train, val = dm.train_indices, dm.val_indices
    assert len(val) == 20 and len(train) == N_TRAIN - 20
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(N_TRAIN))
    again = fmnist(fmnist_dir, val_split=0.1, seed=3)
    assert torch.equal(again.val_indices, val) and torch.equal(again.train_indices, train)
    assert not torch.equal(fmnist(fmnist_dir, val_split=0.1, seed=4).val_indices, val)
    # Validation samples are the un-augmented reference images, every time.
    reference = dm.train_reference_dataset()
    for i in range(3):
        image, target = dm.val_set[i]
        ref_image, ref_target, ref_index = reference[int(val[i])]
        assert torch.equal(image, ref_image) and target == ref_target and ref_index == int(val[i])


def test_subsets_are_seeded_and_taken_after_the_split(fmnist_dir: Path) -> None:
    full = fmnist(fmnist_dir)
    dm = fmnist(fmnist_dir, train_subset=50, test_subset=10)
    dm.setup()
    assert len(dm.train_set) == 50 and len(dm.test_set) == 10
    assert torch.equal(dm.val_indices, full.val_indices)
    assert set(dm.train_indices.tolist()) <= set(full.train_indices.tolist())
    again = fmnist(fmnist_dir, train_subset=50, test_subset=10)
    again.setup()
    assert torch.equal(again.train_indices, dm.train_indices)
    assert torch.equal(again.test_set.indices, dm.test_set.indices)


def test_loaders(fmnist_dir: Path) -> None:
    dm = fmnist(fmnist_dir, batch_size=16, eval_batch_size=25)
    dm.setup("fit")
    train_batches = list(dm.train_dataloader())
    assert len(train_batches) == (N_TRAIN - 40) // 16
    images, targets = train_batches[0]
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32 and targets.dtype == torch.int64
    assert [len(batch[1]) for batch in dm.val_dataloader()] == [25, 15]
    assert [len(batch[1]) for batch in dm.test_dataloader()] == [25, 25]
    assert [len(batch[1]) for batch in dm.predict_dataloader()] == [25, 25]
    loader = dm.train_dataloader()
    assert loader.drop_last and not dm.val_dataloader().drop_last
    no_val = fmnist(fmnist_dir, val_split=0)
    no_val.setup("fit")
    assert no_val.val_dataloader() == [] and len(no_val.train_set) == N_TRAIN


def test_loaders_with_workers(fmnist_dir: Path) -> None:
    dm = fmnist(fmnist_dir, num_workers=2, persistent_workers=True, record_augmentation=True)
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    images, targets, geometry = next(iter(loader))
    assert images.shape == (16, 3, 32, 32) and geometry.shape == (16, 6)
    assert not fmnist(fmnist_dir, persistent_workers=True).train_dataloader().persistent_workers


def test_fmnist_file_locations(tmp_path: Path, fmnist_dir: Path) -> None:
    write_fmnist(tmp_path / "data" / "FashionMNIST" / "raw", gz=False)
    dm = fmnist(tmp_path / "data")
    dm.setup("test")
    assert len(dm.test_set) == N_TEST
    # A missing data_dir falls back to the system folder.
    dm = fmnist(tmp_path / "nowhere", system_dir=str(fmnist_dir))
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == N_TRAIN


def test_fmnist_missing_files(tmp_path: Path) -> None:
    dm = fmnist(tmp_path / "nowhere", system_dir=str(tmp_path / "also_nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere' \(does not exist\).*apt-get install dataset-fashion-mnist"):
        dm.setup("fit")
    with pytest.raises(
        FileNotFoundError,
        match=r"Pass `download=True` \(needs internet\), or run `apt-get install .*put the four IDX files in `data_dir`",
    ):
        dm.setup("test")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        dm.train_reference_dataset()
    partial = tmp_path / "partial"
    write_fmnist(partial)
    (partial / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"only part of Fashion-MNIST: \['t10k-labels-idx1-ubyte'\]"):
        fmnist(partial).setup("test")


def test_fmnist_corrupt_files(tmp_path: Path) -> None:
    arrays = write_fmnist(tmp_path, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", arrays["t10k-labels-idx1-ubyte"][:-1])
    with pytest.raises(ValueError, match=r"'.*t10k-images-idx3-ubyte' holds 50 images and '.*t10k-labels.*' 49 labels"):
        fmnist(tmp_path).setup("test")
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", arrays["t10k-images-idx3-ubyte"])
    with pytest.raises(ValueError, match=r"'.*t10k-labels-idx1-ubyte' to have magic number 2049, but got 2051"):
        fmnist(tmp_path).setup("test")
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", torch.full((N_TEST,), 10, dtype=torch.uint8))
    with pytest.raises(
        ValueError, match=r"`targets` in \[0, 10\), but got values in \[10, 10\] in '.*t10k-labels-idx1-ubyte'. Check"
    ):
        fmnist(tmp_path).setup("test")
    raw = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:-100])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte' is truncated"):
        fmnist(tmp_path).setup("test")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"batch_size": 0}, r"`batch_size` to be a positive int, but got 0"),
        ({"eval_batch_size": 0}, r"`eval_batch_size` to be None or a positive int, but got 0. Pass None"),
        ({"num_workers": -1}, r"`num_workers` to be an int >= 0, but got -1"),
        ({"val_split": -1}, r"`val_split` to be an int >= 0, but got -1. Pass a count"),
        ({"val_split": 1.0}, r"`val_split` \(a fraction\) to be in \[0, 1\), but got 1.0"),
        (
            {"val_split": True},
            r"`val_split` to be an int >= 0, but got True. Pass a count \(int\) or a fraction \(float",
        ),
        ({"train_subset": 0}, r"`train_subset` to be None or a positive int, but got 0. Pass None"),
        ({"test_subset": -5}, r"`test_subset` to be None or a positive int, but got -5"),
        ({"seed": 1.5}, r"`seed` to be an int"),
        ({"channels": 2}, r"`channels` to be 1 or 3, but got 2"),
        ({"pad_to": 20}, r"`pad_to` to be an int >= 28, but got 20"),
    ],
)
def test_init_errors(fmnist_dir: Path, kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        fmnist(fmnist_dir, **kwargs)


def test_init_error_data_dir() -> None:
    with pytest.raises(ValueError, match="`data_dir` to be a non-empty path"):
        FashionMNISTDataModule("")


@pytest.mark.parametrize(
    ("kwargs", "stage", "error"),
    [
        ({"val_split": N_TRAIN}, "fit", r"`val_split` to leave training samples, but it takes 200 of the 200"),
        ({"val_split": 0.001}, "fit", r"`val_split` to select at least one of the 200 training samples"),
        ({"train_subset": 500}, "fit", r"`train_subset` to be at most the 160 training samples left"),
        ({"test_subset": 51}, "test", r"`test_subset` to be at most the 50 test samples, but got 51"),
        ({"batch_size": 170}, "fit", r"`batch_size` to be at most the 160 training samples, but got 170"),
        ({}, "train", r"`stage` to be one of None, 'fit', 'validate', 'test', 'predict', but got 'train'"),
    ],
)
def test_setup_errors(fmnist_dir: Path, kwargs: dict, stage: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        fmnist(fmnist_dir, **kwargs).setup(stage)


def test_batch_larger_than_train_set_is_fine_without_drop_last(fmnist_dir: Path) -> None:
    dm = fmnist(fmnist_dir, batch_size=170, drop_last=False)
    assert [len(batch[1]) for batch in dm.train_dataloader()] == [160]


def test_prepare_data_downloads_only_when_asked(
    tmp_path: Path, fmnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_fashion_mnist(root, download):
        calls.append((root, download))
        write_fmnist(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_fashion_mnist)
    fmnist(tmp_path / "a").prepare_data()
    fmnist(fmnist_dir, download=True).prepare_data()  # files already there
    assert calls == []
    dm = fmnist(tmp_path / "b", download=True)
    dm.prepare_data()
    assert calls == [(str(tmp_path / "b"), True)]
    dm.setup("test")
    assert len(dm.test_set) == N_TEST

    def offline(root, download):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(
        RuntimeError, match=r"Could not download fashion_mnist into .*apt-get install dataset-fashion-mnist"
    ):
        fmnist(tmp_path / "c", download=True).prepare_data()


# --------------------------------------------------------------------------- augmentation geometry


def test_fmnist_geometry_reproduces_the_augmented_image(fmnist_dir: Path) -> None:
    dm = fmnist(fmnist_dir, record_augmentation=True)
    dm.setup("fit")
    reference = dm.train_reference_dataset()
    assert len(reference) == N_TRAIN
    fill = zero_value(dm.mean, dm.std).flatten()
    torch.manual_seed(0)
    samples = [dm.train_set[i] for i in range(64)]
    images = torch.stack([sample[0] for sample in samples])
    geometry = torch.stack([sample[2] for sample in samples])
    assert geometry.dtype == torch.float32 and geometry.shape == (64, 6)
    assert torch.equal(geometry[:, 0].long(), dm.train_indices[:64])
    torch.testing.assert_close(geometry[:, 3] - geometry[:, 1], torch.ones(64))
    assert (geometry[:, 1] >= -4 / 32).all() and (geometry[:, 3] <= 1 + 4 / 32).all()
    assert 0 < geometry[:, 5].sum() < 64 and set(geometry[:, 5].tolist()) <= {0.0, 1.0}
    assert (geometry[:, 1:3] != 0).any(), "some crops must be shifted for the test to mean something"
    references = torch.stack([reference[int(g[0])][0] for g in geometry])
    for image, ref, g in zip(images, references, geometry, strict=True):
        assert torch.equal(image, crop_by_slicing(ref, g, 32, fill))
    torch.testing.assert_close(crop_by_grid_sample(references, geometry, 32, fill), images, atol=1e-6, rtol=0)
    for _, target, g in samples:
        assert reference[int(g[0])][1] == target


def test_geometry_without_augmentation_is_the_whole_image(fmnist_dir: Path) -> None:
    dm = fmnist(fmnist_dir, record_augmentation=True, augment=False)
    dm.setup("fit")
    image, _, geometry = dm.train_set[5]
    index = int(dm.train_indices[5])
    assert geometry.tolist() == [float(index), 0.0, 0.0, 1.0, 1.0, 0.0]
    assert torch.equal(image, dm.train_reference_dataset()[index][0])


def test_geometry_transforms() -> None:
    torch.manual_seed(0)
    image = torch.rand(1, 10, 20)
    for _ in range(10):
        out, box = RandomCropFlip((4, 8), flip_p=0.0)(image)
        top, left = round(float(box[0]) * 10), round(float(box[1]) * 20)
        assert torch.equal(out, image[:, top : top + 4, left : left + 8]) and box[4] == 0
        torch.testing.assert_close(box[2:4] - box[0:2], torch.tensor([0.4, 0.4]))
        assert RandomCropFlip(4, flip_p=1.0)(image)[1][4] == 1
        _, box = RandomResizedCropFlip(8, scale=(0.2, 0.5))(image)
        assert ((box[:4] >= 0) & (box[:4] <= 1)).all()
        area = float((box[2] - box[0]) * (box[3] - box[1]))
        assert 0.15 < area < 0.55
    wide = torch.rand(3, 20, 40)
    out, box = _ResizeCenterCrop(10, 6)(wide)  # resized to 10 x 20, crop rows 2..8, columns 7..13
    assert box.tolist() == pytest.approx([0.2, 0.35, 0.8, 0.65, 0.0])
    assert torch.equal(out, TF.center_crop(TF.resize(wide, [10], antialias=True), [6]))
    assert "padding=4" in repr(RandomCropFlip(32, padding=4))


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: RandomCropFlip(0), r"`size` to be positive, but got 0"),
        (lambda: RandomCropFlip(4, padding=-1), r"`padding` to be an int >= 0, but got -1"),
        (lambda: RandomCropFlip(4, flip_p=2.0), r"`flip_p` to be in \[0, 1\], but got 2.0"),
        (lambda: RandomResizedCropFlip(4, scale=(0.5, 0.2)), r"`scale` to satisfy 0 < min <= max <= 1"),
        (lambda: RandomResizedCropFlip(4, ratio=(0.0, 1.0)), r"`ratio` to satisfy 0 < min <= max"),
    ],
)
def test_geometry_transform_errors(build, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        build()


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.usefixtures("skip_cifar_md5")
def test_cifar10(tmp_path: Path) -> None:
    raw = write_cifar(tmp_path)
    dm = CIFAR10DataModule(str(tmp_path), val_split=10, batch_size=8, record_augmentation=True)
    assert (dm.name, dm.num_classes, dm.dims) == ("cifar10", 10, (3, 32, 32))
    dm.setup()
    assert len(dm.train_set) == 90 and len(dm.val_set) == 10 and len(dm.test_set) == 30
    image, target = dm.val_set[0]
    index = int(dm.val_indices[0])
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    expected = (torch.from_numpy(raw[index]).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(image, expected)
    assert target == index % 10
    images, targets, geometry = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and geometry.shape == (8, 6)
    reference = dm.train_reference_dataset()
    fill = zero_value(dm.mean, dm.std).flatten()
    for image, g in zip(images, geometry, strict=True):
        assert torch.equal(image, crop_by_slicing(reference[int(g[0])][0], g, 32, fill))


@pytest.mark.usefixtures("skip_cifar_md5")
def test_cifar100(tmp_path: Path) -> None:
    write_cifar(tmp_path, cifar100=True, per_batch=40)
    dm = CIFAR100DataModule(str(tmp_path), val_split=0.25, batch_size=10)
    assert (dm.name, dm.num_classes, dm.mean) == ("cifar100", 100, (0.5071, 0.4865, 0.4409))
    dm.setup("fit")
    assert len(dm.train_set) == 30 and len(dm.val_set) == 10
    assert next(iter(dm.train_dataloader()))[0].shape == (10, 3, 32, 32)


def test_cifar_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"directory holding `cifar-10-batches-py`.*download=True"):
        CIFAR10DataModule(str(tmp_path / "nowhere")).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"'test_batch'.*missing.*place the extracted `cifar-10-batches-py`"):
        (tmp_path / "cifar-10-batches-py").mkdir()
        CIFAR10DataModule(str(tmp_path)).setup("test")
    other = tmp_path / "fake"
    write_cifar(other)
    # Unpatched, torchvision's md5 check rejects the fake files: the error says what to do.
    with pytest.raises(ValueError, match=r"failed torchvision's integrity \(md5\) check.*download=True"):
        CIFAR10DataModule(str(other), val_split=10, batch_size=8).setup("fit")

    class Offline(torchvision.datasets.CIFAR10):
        def __init__(self, *args, **kwargs) -> None:
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(CIFAR10DataModule, "dataset_cls", Offline)
    CIFAR10DataModule(str(tmp_path)).prepare_data()  # download=False: never touches the network
    with pytest.raises(RuntimeError, match=r"Could not download cifar10.*place the extracted"):
        CIFAR10DataModule(str(tmp_path), download=True).prepare_data()


# --------------------------------------------------------------------------- ImageNet


def imagenet(data_dir: Path, **kwargs) -> ImageNetDataModule:
    kwargs.setdefault("num_classes", 3)
    kwargs.setdefault("image_size", 32)
    kwargs.setdefault("val_split", 3)
    kwargs.setdefault("batch_size", 4)
    return ImageNetDataModule(str(data_dir), **kwargs)


def test_imagenet(imagenet_dir: Path) -> None:
    dm = imagenet(imagenet_dir, record_augmentation=True)
    assert (dm.name, dm.dims, dm.resize_size, dm.mean) == ("imagenet", (3, 32, 32), 37, (0.485, 0.456, 0.406))
    dm.setup()
    assert len(dm.train_set) == 15 and len(dm.val_set) == 3 and len(dm.test_set) == 6
    images, targets, geometry = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and targets.dtype == torch.int64
    val_image, _ = dm.val_set[0]
    test_image, test_target = dm.test_set[5]
    assert val_image.shape == test_image.shape == (3, 32, 32) and test_target == 2
    # The recorded box, in the original image's normalised coordinates, reproduces the crop exactly.
    originals = torchvision.datasets.ImageFolder(str(imagenet_dir / "train"))
    torch.manual_seed(1)
    for i in range(len(dm.train_set)):
        image, _, g = dm.train_set[i]
        original = originals[int(g[0])][0]
        height, width = original.height, original.width
        top, left = round(float(g[1]) * height), round(float(g[2]) * width)
        h, w = round(float(g[3]) * height) - top, round(float(g[4]) * width) - left
        assert 0 <= top < top + h <= height and 0 <= left < left + w <= width
        expected = TF.resized_crop(original, top, left, h, w, [32, 32], antialias=True)
        expected = TF.hflip(expected) if g[5] else expected
        expected = TF.normalize(TF.to_tensor(expected), list(dm.mean), list(dm.std))
        assert torch.equal(image, expected)
    # The reference view is the whole image, squashed to image_size x image_size.
    ref_image, ref_target, index = dm.train_reference_dataset()[7]
    squashed = TF.resize(originals[7][0], [32, 32], antialias=True)
    expected = TF.normalize(TF.to_tensor(squashed), list(dm.mean), list(dm.std))
    assert index == 7 and ref_target == originals[7][1] and torch.equal(ref_image, expected)


def test_imagenet_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path, n_train=2, n_val=1)
    (root / "val" / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    dm = imagenet(root)
    dm.setup("test")
    with pytest.raises(OSError, match=r"Could not read the image file '.*val/bee/broken.png'"):
        list(dm.test_dataloader())


def _missing_root(root: Path) -> Path:
    return root / "missing"


def _rename_val(root: Path) -> Path:
    (root / "val").rename(root / "valid")
    return root


def _rename_train(root: Path) -> Path:
    (root / "train").rename(root / "tr")
    return root


def _train_is_a_file(root: Path) -> Path:
    shutil.rmtree(root / "train")
    (root / "train").write_bytes(b"")
    return root


def _empty_class(root: Path) -> Path:
    for path in (root / "val" / "ant").iterdir():
        path.unlink()
    return root


def _extra_class(root: Path) -> Path:
    (root / "val" / "dog").mkdir()
    return root


@pytest.mark.parametrize(
    ("mutate", "exception", "error"),
    [
        (_missing_root, FileNotFoundError, r"No such file or directory: '.*missing/train'.*train/<class>"),
        (_rename_val, FileNotFoundError, r"No such file or directory: '.*/val'"),
        (_rename_train, FileNotFoundError, r"No such file or directory: '.*/train'"),
        (_train_is_a_file, FileNotFoundError, r"Not a directory: '.*/train'.*train/<class>"),
        (_empty_class, FileNotFoundError, r"Empty class folders in '.*val'.*ant"),
        (_extra_class, ValueError, r"only in val \['dog'\]"),
    ],
)
def test_imagenet_layout_errors(tmp_path: Path, mutate, exception: type, error: str) -> None:
    root = write_imagefolder(tmp_path / "data", n_train=2, n_val=1)
    with pytest.raises(exception, match=error):
        imagenet(mutate(root), val_split=0, batch_size=1).setup("test")


def test_imagenet_no_class_folders(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(FileNotFoundError, match=r"any class folder in .*train\..*sort the official flat val/"):
        imagenet(tmp_path).setup("fit")


def test_imagenet_argument_errors(imagenet_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"Expected 1000 class folders \(`num_classes`\).*Pass `num_classes=3`"):
        imagenet(imagenet_dir, num_classes=1000).setup("fit")
    with pytest.raises(ValueError, match=r"`download` to be False: ImageNet cannot be downloaded"):
        imagenet(imagenet_dir, download=True)
    with pytest.raises(
        ValueError, match=r"`resize_size` to be an int >= 32, but got 16. Pass None or at least `image_size`"
    ):
        imagenet(imagenet_dir, resize_size=16)
    with pytest.raises(ValueError, match=r"`scale` to satisfy"):
        imagenet(imagenet_dir, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"`image_size` to be a positive int"):
        imagenet(imagenet_dir, image_size=0)


# --------------------------------------------------------------------------- integration


def test_trainer_sees_geometry_batches(fmnist_dir: Path) -> None:
    import lightning as L
    from trainers import quiet_trainer

    seen: list[int] = []

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3 * 32 * 32, 10)

        def training_step(self, batch, batch_idx):
            images, targets, geometry = batch
            assert geometry.shape == (images.shape[0], 6)
            seen.append(len(targets))
            return F.cross_entropy(self.layer(images.flatten(1)), targets)

        def validation_step(self, batch, batch_idx):
            images, targets = batch
            self.log("val_loss", F.cross_entropy(self.layer(images.flatten(1)), targets))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = quiet_trainer(limit_train_batches=3, limit_val_batches=1)
    trainer.fit(Tiny(), datamodule=fmnist(fmnist_dir, record_augmentation=True))
    assert seen == [16, 16, 16]


def test_jsonargparse_signature() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(FashionMNISTDataModule, "data")
    config = parser.parse_args(["--data.val_split=5000", "--data.channels=1", "--data.train_subset=100"])
    assert config.data.val_split == 5000 and isinstance(config.data.val_split, int)
    assert config.data.channels == 1 and config.data.train_subset == 100
    assert parser.parse_args(["--data.val_split=0.1"]).data.val_split == 0.1


# --------------------------------------------------------------------------- the real data set, where installed


@pytest.mark.skipif(
    not (Path(FASHION_MNIST_SYSTEM_DIR) / "train-images-idx3-ubyte.gz").is_file(),
    reason="`apt-get install dataset-fashion-mnist` has not been run",
)
def test_system_fashion_mnist(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(str(tmp_path / "empty"), batch_size=256)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 60000 and len(dm.val_set) == 5000
    assert len(dm.test_set) == 10000
    images, targets = next(iter(dm.test_dataloader()))
    assert images.shape == (256, 3, 32, 32) and 0 <= int(targets.min()) and int(targets.max()) <= 9
    # The per-pixel statistics of the unpadded 28 x 28 area match the documented mean/std.
    pixels = images[:, 0, 2:30, 2:30] * FMNIST_STD + FMNIST_MEAN
    assert abs(float(pixels.mean()) - FMNIST_MEAN) < 0.02 and abs(float(pixels.std()) - FMNIST_STD) < 0.02
