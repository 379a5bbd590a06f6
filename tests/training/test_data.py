"""Datasets: digits splits, Fashion-MNIST and CIFAR from fake local files, ImageFolder, loaders."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from ensemblekit.errors import EnsembleKitError
from ensemblekit.training import data as data_module
from ensemblekit.training.data import (
    CIFAR10_MEAN,
    DataNotFoundError,
    RandomPadCrop,
    find_fashion_mnist,
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


# ---------------------------------------------------------------- Fashion-MNIST


def write_fashion_mnist(folder: Path, n_train: int = 100, n_test: int = 20, label: int | None = None,
                        gz: bool = True, seed: int = 0) -> Path:
    """The four IDX files with random 28x28 images; labels cycle over the 10 classes (or are all ``label``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.full(n, label, np.uint8) if label is not None else (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        for kind, payload in (("images-idx3", struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes()),
                              ("labels-idx1", struct.pack(">II", 0x801, n) + labels.tobytes())):
            name = folder / f"{prefix}-{kind}-ubyte"
            if gz:
                with gzip.open(f"{name}.gz", "wb") as f:
                    f.write(payload)
            else:
                name.write_bytes(payload)
    return folder


def _raw_test_images(folder: Path) -> np.ndarray:
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as f:
        return np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28)


@pytest.fixture
def fashion(monkeypatch, tmp_path):
    """No Fashion-MNIST anywhere: no variable, no Debian package, no download; a private cache."""
    monkeypatch.delenv(data_module.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setenv(data_module.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(data_module.OFFLINE_ENV, "1")
    monkeypatch.setattr(data_module, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "usr-share-datasets-fashion-mnist")
    return tmp_path


def test_fashion_mnist_splits_shapes_and_info(fashion):
    root = write_fashion_mnist(fashion / "fm")
    parts = {split: load_dataset("fashion-mnist", split, root=root) for split in ("train", "val", "trainval", "test")}
    assert {s: len(ds) for s, (ds, _) in parts.items()} == {"train": 90, "val": 10, "trainval": 100, "test": 20}
    train, val = parts["train"][0], parts["val"][0]
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert sorted(val.labels.tolist()) == list(range(10))  # stratified: one image of each class
    assert torch.equal(load_dataset("fashion-mnist", "val", root=root)[0].indices, val.indices)  # fixed split
    test, info = parts["test"]
    assert (info.name, info.num_classes, info.in_chans, info.image_size) == ("fashion-mnist", 10, 1, 28)
    assert info.classes[0] == "T-shirt/top" and len(info.classes) == 10
    assert info.source == f"root {root}"
    image, label = test[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 3
    raw = torch.from_numpy(_raw_test_images(root)[3].astype(np.float32) / 255)
    assert torch.allclose(image[0], (raw - info.mean[0]) / info.std[0], atol=1e-5)
    assert test.transform is None and train.transform is not None  # train augments by default


def test_fashion_mnist_lookup_order(fashion, monkeypatch):
    """root, then $ENSEMBLEKIT_FASHION_MNIST, then the Debian package's folder, then torchvision's download."""
    places = {"root": 1, "env": 2, "system": 3, "download": 4}
    folders = {k: write_fashion_mnist(fashion / k, label=v) for k, v in places.items() if k != "download"}
    monkeypatch.setattr(data_module, "FASHION_MNIST_SYSTEM_DIR", folders["system"])
    monkeypatch.setenv(data_module.FASHION_MNIST_ENV, str(folders["env"]))
    downloads = []

    def download(target: Path) -> str | None:
        downloads.append(target)
        write_fashion_mnist(target, label=places["download"])
        return None

    monkeypatch.setattr(data_module, "_download_fashion_mnist", download)

    def first_label(**kwargs) -> tuple[int, str]:
        ds, info = load_dataset("fashion-mnist", "test", **kwargs)
        return ds[0][1], info.source

    assert first_label(root=folders["root"]) == (1, f"root {folders['root']}")
    assert first_label() == (2, f"${data_module.FASHION_MNIST_ENV} {folders['env']}")
    monkeypatch.delenv(data_module.FASHION_MNIST_ENV)
    assert first_label() == (3, f"Debian package dataset-fashion-mnist ({folders['system']})")
    monkeypatch.setattr(data_module, "FASHION_MNIST_SYSTEM_DIR", fashion / "not-installed")
    label, source = first_label()
    assert label == 4 and source.startswith("torchvision's download in") and len(downloads) == 1
    assert first_label()[0] == 4 and len(downloads) == 1  # downloaded once, then found in the cache


def test_fashion_mnist_missing_says_what_to_install_or_where_to_put_the_files(fashion):
    with pytest.raises(DataNotFoundError) as caught:
        load_dataset("fashion-mnist", "train")
    message = str(caught.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "ENSEMBLEKIT_FASHION_MNIST=<folder>" in message and "root=<folder>" in message
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        assert name in message
    assert "ENSEMBLEKIT_OFFLINE is set" in message  # and why nothing was downloaded
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, EnsembleKitError)


def test_fashion_mnist_given_place_lacking_a_file_is_an_error_not_skipped(fashion, monkeypatch):
    full = write_fashion_mnist(fashion / "full")
    partial = write_fashion_mnist(fashion / "partial")
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv(data_module.FASHION_MNIST_ENV, str(full))
    with pytest.raises(DataNotFoundError, match=r"root .*partial lacks t10k-labels-idx1-ubyte.gz; install"):
        load_dataset("fashion-mnist", "test", root=partial)
    monkeypatch.setenv(data_module.FASHION_MNIST_ENV, str(fashion / "nowhere"))
    with pytest.raises(DataNotFoundError, match=r"\$ENSEMBLEKIT_FASHION_MNIST .*nowhere does not exist"):
        load_dataset("fashion-mnist", "test")


def test_fashion_mnist_uncompressed_files_and_torchvision_layout(fashion):
    tv_root = fashion / "tv"
    write_fashion_mnist(tv_root / "FashionMNIST" / "raw", gz=False, label=5)
    folder, source = find_fashion_mnist(tv_root)
    assert folder == tv_root and source == f"root {tv_root}"  # read in place, nothing copied
    assert not (fashion / "cache").exists()
    flat = write_fashion_mnist(fashion / "flat", gz=False, label=6)
    folder, _ = find_fashion_mnist(flat)
    staged = folder / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    assert staged.is_symlink() and staged.resolve() == (flat / "t10k-labels-idx1-ubyte").resolve()
    assert load_dataset("fashion-mnist", "test", root=flat)[0][0][1] == 6


def test_fashion_mnist_is_staged_again_when_the_files_change(fashion, monkeypatch):
    folder = write_fashion_mnist(fashion / "fm", label=1)
    monkeypatch.setenv(data_module.FASHION_MNIST_ENV, str(folder))
    assert load_dataset("fashion-mnist", "test")[0][0][1] == 1
    write_fashion_mnist(folder, label=7)
    for f in folder.iterdir():  # a new modification time, whatever the file system's resolution
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert load_dataset("fashion-mnist", "test")[0][0][1] == 7


def test_fashion_mnist_damaged_file(fashion):
    root = write_fashion_mnist(fashion / "fm")
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"not an IDX file")
    with pytest.raises(DataNotFoundError, match="cannot be read.*damaged"):
        load_dataset("fashion-mnist", "test", root=root)


def test_fashion_mnist_augmentation_and_other_size(fashion):
    root = write_fashion_mnist(fashion / "fm")
    plain, _ = load_dataset("fashion-mnist", "train", root=root, augment=False)
    augmented, _ = load_dataset("fashion-mnist", "train", root=root)
    torch.manual_seed(0)
    pairs = [(augmented[i][0], plain[i][0]) for i in range(8)]
    assert all(a.shape == (1, 28, 28) for a, _ in pairs) and any(not torch.equal(a, p) for a, p in pairs)
    small, info = load_dataset("fashion-mnist", "test", root=root, image_size=16)
    assert small[0][0].shape == (1, 16, 16) and info.input_shape == (1, 16, 16)


def test_random_pad_crop_pads_with_the_fill_and_repeats_with_the_seed():
    crop = RandomPadCrop(3, fill=-2.0, flip=True)
    image = torch.arange(36.0).reshape(1, 6, 6)
    torch.manual_seed(0)
    first = [crop(image) for _ in range(500)]
    torch.manual_seed(0)
    assert all(torch.equal(a, crop(image)) for a in first)
    assert all(a.shape == (1, 6, 6) for a in first)
    assert any((a == -2.0).any() for a in first) and any(torch.equal(a, image) for a in first)
    assert any(torch.equal(a, image.flip(-1)) for a in first)


def test_download_is_skipped_offline_and_without_a_network(monkeypatch, tmp_path):
    monkeypatch.setenv(data_module.OFFLINE_ENV, "1")
    assert "ENSEMBLEKIT_OFFLINE is set" in data_module._download_fashion_mnist(tmp_path)
    monkeypatch.delenv(data_module.OFFLINE_ENV)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data_module.socket, "create_connection", unreachable)
    assert "cannot be reached (network is unreachable)" in data_module._download_fashion_mnist(tmp_path)
    assert not any(tmp_path.iterdir())


def test_fashion_mnist_is_a_config_dataset_name():
    from ensemblekit.training.config import DataConfig

    assert DataConfig(name="fashion-mnist").name == "fashion-mnist"
