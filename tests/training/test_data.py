"""Datasets: digits splits, CIFAR from fake local folders, ImageFolder, loaders."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from ensemblekit.training.data import (
    CIFAR10_MEAN,
    load_dataset,
    load_digits_dataset,
    make_loader,
    split_indices,
)

# ---------------------------------------------------------------- digits


def test_digits_sizes_shapes_and_info():
    sizes = {split: len(load_dataset("digits", split)[0]) for split in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 1258, "val": 180, "trainval": 1438, "test": 359}
    ds, info = load_dataset("digits", "test")
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    assert info.num_classes == 10 and info.in_chans == 3 and info.image_size == 32
    assert info.input_shape == (3, 32, 32) and len(info.mean) == len(info.std) == 3


def test_digits_split_is_disjoint_fixed_and_stratified():
    parts = {split: load_digits_dataset(split)[0] for split in ("train", "val", "test")}
    idx = {split: set(ds.indices.tolist()) for split, ds in parts.items()}
    assert not idx["train"] & idx["val"] and not idx["train"] & idx["test"] and not idx["val"] & idx["test"]
    assert len(idx["train"] | idx["val"] | idx["test"]) == 1797
    assert set(load_digits_dataset("trainval")[0].indices.tolist()) == idx["train"] | idx["val"]
    assert torch.equal(load_digits_dataset("val")[0].indices, parts["val"].indices)
    counts = torch.bincount(parts["val"].labels, minlength=10)
    assert counts.min() >= 17 and counts.max() <= 19  # 180 images, ~18 per class


def test_digits_normalised_with_train_statistics():
    ds, info = load_digits_dataset("train")
    assert abs(ds.images.mean().item()) < 1e-4
    assert abs(ds.images.std().item() - 1) < 1e-3
    assert 0 < info.mean[0] < 1 and 0 < info.std[0] < 1


def test_digits_augmentation_keeps_shape_and_changes_images():
    plain, _ = load_digits_dataset("train")
    augmented, _ = load_dataset("digits", "train")  # train defaults to augment=True
    torch.manual_seed(0)
    pairs = [(augmented[i][0], plain[i][0]) for i in range(8)]
    assert all(a.shape == (3, 32, 32) for a, _ in pairs)
    assert any(not torch.equal(a, p) for a, p in pairs)
    assert augmented.transform is not None
    assert load_dataset("digits", "val")[0].transform is None  # val defaults to no augmentation


def test_digits_other_image_size():
    ds, info = load_dataset("digits", "val", image_size=16)
    assert ds[0][0].shape == (3, 16, 16) and info.image_size == 16


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="digits, cifar10, cifar100, imagefolder"):
        load_dataset("mnist", "train")
    with pytest.raises(ValueError, match="train, val, trainval, test"):
        load_dataset("digits", "validation")


def test_split_indices_tiny_and_stratified():
    keep, held = split_indices([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 2, 0.1)  # too small to stratify
    assert len(held) == 2 and not set(keep) & set(held) and len(keep) + len(held) == 20
    labels = np.repeat(np.arange(4), 25)
    keep, held = split_indices(labels, 0.2)
    assert np.bincount(labels[held]).tolist() == [5, 5, 5, 5]
    assert np.array_equal(held, split_indices(labels, 0.2)[1])
    with pytest.raises(ValueError, match="cannot hold out"):
        split_indices([0, 1], 0.1)


# ---------------------------------------------------------------- CIFAR


def _write_batch(path: Path, n: int, num_classes: int, fine: bool, rng: np.random.Generator) -> None:
    labels = [int(i % num_classes) for i in range(n)]
    entry = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}
    if fine:
        entry["fine_labels"], entry["coarse_labels"] = labels, [y // 5 for y in labels]
    else:
        entry["labels"] = labels
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def _fake_cifar(root: Path, name: str, per_batch: int = 4, test: int = 5) -> None:
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for b in range(1, 6):
            _write_batch(folder / f"data_batch_{b}", per_batch, 10, False, rng)
        _write_batch(folder / "test_batch", test, 10, False, rng)
        meta = {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": per_batch}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        _write_batch(folder / "train", 5 * per_batch, 100, True, rng)
        _write_batch(folder / "test", test, 100, True, rng)
        meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"k{i}" for i in range(20)]}
        (folder / "meta").write_bytes(pickle.dumps(meta))


@pytest.fixture
def no_md5(monkeypatch):
    """Fake CIFAR files cannot match the official checksums: check presence only."""
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.mark.parametrize(("name", "num_classes"), [("cifar10", 10), ("cifar100", 100)])
def test_cifar_from_fake_folder(tmp_path, no_md5, name, num_classes):
    _fake_cifar(tmp_path, name)
    train, info = load_dataset(name, "train", root=tmp_path)
    val, _ = load_dataset(name, "val", root=tmp_path)
    trainval, _ = load_dataset(name, "trainval", root=tmp_path)
    test, _ = load_dataset(name, "test", root=tmp_path)
    assert (len(train), len(val), len(trainval), len(test)) == (18, 2, 20, 5)
    assert isinstance(train, Subset) and isinstance(val, Subset)
    assert not set(train.indices) & set(val.indices)
    assert (info.name, info.num_classes, info.in_chans, info.image_size) == (name, num_classes, 3, 32)
    assert len(info.classes) == num_classes
    for ds in (train, val, test):
        image, label = ds[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < num_classes


def test_cifar_normalisation_and_resize(tmp_path, no_md5):
    _fake_cifar(tmp_path, "cifar10")
    test, info = load_dataset("cifar10", "test", root=tmp_path)
    assert info.mean == CIFAR10_MEAN
    raw = test.data[0].astype(np.float32) / 255  # HWC uint8 in torchvision's CIFAR10
    expected = (torch.from_numpy(raw).permute(2, 0, 1) - torch.tensor(info.mean)[:, None, None]) / torch.tensor(
        info.std
    )[:, None, None]
    assert torch.allclose(test[0][0], expected, atol=1e-5)
    big, info = load_dataset("cifar10", "train", root=tmp_path / "cifar-10-batches-py", image_size=48)
    assert big[0][0].shape == (3, 48, 48) and info.image_size == 48


def test_cifar_augmentation_keeps_shape(tmp_path, no_md5):
    _fake_cifar(tmp_path, "cifar10")
    train, _ = load_dataset("cifar10", "train", root=tmp_path, augment=True)
    torch.manual_seed(0)
    images = [train[0][0] for _ in range(6)]
    assert all(im.shape == (3, 32, 32) for im in images)
    assert any(not torch.equal(images[0], im) for im in images[1:])


def test_cifar_missing_folder_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/data_batch_1.*CIFAR-10 python version"):
        load_dataset("cifar10", "train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/train.*CIFAR-100 python version"):
        load_dataset("cifar100", "test", root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="needs root="):
        load_dataset("cifar10", "test")


def test_cifar_wrong_checksum_is_reported(tmp_path):
    _fake_cifar(tmp_path, "cifar10")
    with pytest.raises(RuntimeError, match="checksum"):
        load_dataset("cifar10", "test", root=tmp_path)


# ---------------------------------------------------------------- ImageFolder


def _fake_imagefolder(root: Path, folders: dict[str, int], classes=("cat", "dog")) -> None:
    rng = np.random.default_rng(0)
    for split, n in folders.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def test_imagefolder_train_val(tmp_path):
    _fake_imagefolder(tmp_path, {"train": 10, "val": 2})
    train, info = load_dataset("imagefolder", "train", root=tmp_path, image_size=16)
    val, _ = load_dataset("imagefolder", "val", root=tmp_path, image_size=16)
    test, _ = load_dataset("imagefolder", "test", root=tmp_path, image_size=16)
    assert (len(train), len(val), len(test)) == (18, 2, 4)  # val: 10% of train; test: the val folder
    assert info.classes == ("cat", "dog") and info.num_classes == 2 and info.image_size == 16
    assert not set(train.indices) & set(val.indices)
    for ds in (train, val, test):
        assert ds[0][0].shape == (3, 16, 16)


def test_imagefolder_with_test_folder(tmp_path):
    _fake_imagefolder(tmp_path, {"train": 3, "val": 2, "test": 1})
    splits = ("train", "val", "trainval", "test")
    sizes = [len(load_dataset("imagefolder", s, root=tmp_path, image_size=8)[0]) for s in splits]
    assert sizes == [6, 4, 10, 2]


def test_imagefolder_wrong_layout(tmp_path):
    _fake_imagefolder(tmp_path, {"train": 2})
    with pytest.raises(FileNotFoundError, match=r"no val folder.*<root>/train/<class>/<image>"):
        load_dataset("imagefolder", "train", root=tmp_path)
    _fake_imagefolder(tmp_path / "other", {"train": 1})
    _fake_imagefolder(tmp_path / "other", {"val": 1}, classes=("cat", "cow"))
    with pytest.raises(FileNotFoundError, match="same class folders"):
        load_dataset("imagefolder", "test", root=tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("imagefolder", "test", root=tmp_path / "missing")


# ---------------------------------------------------------------- loaders


def test_make_loader_is_reproducible():
    ds, _ = load_dataset("digits", "val")
    first = [y.tolist() for _, y in make_loader(ds, 32, shuffle=True, seed=3)]
    assert first == [y.tolist() for _, y in make_loader(ds, 32, shuffle=True, seed=3)]
    assert first != [y.tolist() for _, y in make_loader(ds, 32, shuffle=True, seed=4)]
    x, y = next(iter(make_loader(ds, 32, shuffle=False)))
    assert x.shape == (32, 3, 32, 32) and y.dtype == torch.int64
    assert len(make_loader(ds, 32, shuffle=False, drop_last=True)) == len(ds) // 32


def test_make_loader_sampler():
    ds, _ = load_dataset("digits", "val")
    sampler = torch.utils.data.SubsetRandomSampler(range(10), generator=torch.Generator().manual_seed(0))
    assert sum(len(y) for _, y in make_loader(ds, 4, shuffle=False, sampler=sampler)) == 10
    with pytest.raises(ValueError, match="not both"):
        make_loader(ds, 4, shuffle=True, sampler=sampler)
