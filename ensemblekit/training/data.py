"""Datasets and loaders: scikit-learn digits, Fashion-MNIST, CIFAR-10/100 and any ImageFolder.

Every dataset has the same four splits:

* ``"train"``: what the ensemble is trained on;
* ``"val"``: a fixed held-out part (no augmentation by default), for
  calibrating halting thresholds and choosing hyper-parameters;
* ``"trainval"``: ``"train"`` and ``"val"`` together (the standard training
  set, for final runs);
* ``"test"``: the evaluation set.

Held-out parts are drawn once with a fixed seed (stratified by class where the
class counts allow it), so every run, process and machine sees the same split.
Items are ``(image [C, H, W] float32 normalised, label int)``.

Fashion-MNIST is read with `torchvision.datasets.FashionMNIST` from the
first place that holds its four files (see [`find_fashion_mnist()`][ensemblekit.training.data.find_fashion_mnist]): the
``root`` given, the folder in ``$ENSEMBLEKIT_FASHION_MNIST``, the Debian
package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
then torchvision's download where a network allows it.

Examples:
    >>> train, info = load_dataset("digits", "train")
    >>> loader = make_loader(train, batch_size=64, shuffle=True, seed=0)
    >>> info.num_classes, tuple(next(iter(loader))[0].shape)
    (10, (64, 3, 32, 32))
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedShuffleSplit
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset
from torchvision import datasets as tv_datasets
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from ensemblekit.errors import EnsembleKitError, InvalidValueError, UnknownNameError

__all__ = [
    "CACHE_ENV",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "DIGITS_TEST_FRACTION",
    "DIGITS_VAL_FRACTION",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_PACKAGE",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_SYSTEM_DIR",
    "FASHION_MNIST_URL",
    "IMAGEFOLDER_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFLINE_ENV",
    "SPLITS",
    "SPLIT_SEED",
    "SUBSET_RULE",
    "VAL_FRACTION",
    "DataNotFoundError",
    "DatasetInfo",
    "RandomPadCrop",
    "SeededItems",
    "TensorImageDataset",
    "cache_dir",
    "dataset_labels",
    "fashion_mnist_available",
    "find_fashion_mnist",
    "load_dataset",
    "load_digits_dataset",
    "load_fashion_mnist",
    "make_loader",
    "split_indices",
    "stratified_subset",
]

Split = Literal["train", "val", "trainval", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "trainval", "test")
DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagefolder", "fashion-mnist")

SPLIT_SEED = 0
"""Seed of every fixed held-out split (never change it: results depend on it)."""
SUBSET_RULE = "stratified"
"""How ``max_train_items`` and ``max_eval_items`` cut a split (`stratified_subset()`), recorded with a run's data
settings when it is cut: a checkpoint or table run made when the first N items were taken is not resumed or reused
with a stratified subset."""
DIGITS_TEST_FRACTION = 0.2
DIGITS_VAL_FRACTION = 0.1
"""Fraction of *all* digits images held out for validation."""
VAL_FRACTION = 0.1
"""Fraction of a training set (Fashion-MNIST, CIFAR, ImageFolder without a test folder) held out for validation."""

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGEFOLDER_SIZE = 224
"""timm's default input size, an ImageFolder's when no backbone's data config is given."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Attributes:
        name: dataset name as given to [`load_dataset()`][ensemblekit.training.data.load_dataset].
        num_classes: number of classes.
        in_chans: image channels.
        image_size: side of the square images the dataset yields.
        mean: per-channel mean used for normalisation.
        std: per-channel standard deviation used for normalisation.
        classes: class names, in label order.
        source: where the files were read from (empty for bundled data).
    """

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(in_chans, image_size, image_size)`` of one image."""
        return (self.in_chans, self.image_size, self.image_size)


class TensorImageDataset(Dataset):
    """Images held in one tensor, with an optional per-image transform.

    Args:
        images: ``[N, C, H, W]`` float tensor, already normalised.
        labels: ``[N]`` integer labels.
        transform: applied to each image ``[C, H, W]`` when it is read.
        indices: positions of the items in the source data (to trace a split
            back to it); ``arange(N)`` by default.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable | None = None,
        indices: torch.Tensor | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise InvalidValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform
        self.indices = torch.arange(len(labels)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def split_indices(
    labels: Sequence[int] | np.ndarray, fraction: float, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into a kept part and a held-out ``fraction``.

    Stratified by label when every class has at least two items and the
    held-out part can hold one item per class; a seeded random split otherwise
    (tiny datasets). Both parts are sorted.

    Examples:
        >>> keep, held = split_indices([0, 1] * 10, 0.2)
        >>> len(keep), len(held)
        (16, 4)
    """
    labels = np.asarray(labels)
    n = len(labels)
    n_held = int(round(n * fraction))
    if not 0 < n_held < n:
        raise InvalidValueError(f"cannot hold out {fraction:.0%} of {n} items")
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() >= 2 and len(classes) <= n_held <= n - len(classes):
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=n_held, random_state=seed)
        keep, held = next(splitter.split(np.zeros(n), labels))
    else:
        perm = np.random.default_rng(seed).permutation(n)
        keep, held = perm[n_held:], perm[:n_held]
    return np.sort(keep), np.sort(held)


def stratified_subset(labels: Sequence[int] | np.ndarray, size: int, seed: int = SPLIT_SEED) -> np.ndarray:
    """Positions of ``size`` items drawn from every class in proportion to its share, sorted.

    Each class gets its exact share ``size * n_c / n`` rounded down, and the
    items left go to the classes with the largest remainders (ties drawn
    with ``seed``); when ``size`` allows, every class keeps at least one item.
    The items of each class are a seeded random draw, so the subset depends
    only on ``labels``, ``size`` and ``seed``: the same on every run, process
    and resume. A class-sorted dataset (an ``ImageFolder``) gives every class,
    not the first N items of the first classes.

    Examples:
        >>> labels = [0] * 60 + [1] * 30 + [2] * 10   # sorted by class
        >>> keep = stratified_subset(labels, 10, seed=0)
        >>> np.bincount(np.asarray(labels)[keep]).tolist()
        [6, 3, 1]
        >>> bool((keep == stratified_subset(labels, 10, seed=0)).all())
        True
    """
    labels = np.asarray(labels)
    n = len(labels)
    if size < 1:
        raise InvalidValueError(f"a subset needs at least 1 item, got {size}")
    if size >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    exact = counts * size / n
    take = np.floor(exact).astype(np.int64)
    ties = rng.permutation(len(classes))
    by_remainder = ties[np.argsort(-(exact - take)[ties], kind="stable")]
    take[by_remainder[: size - int(take.sum())]] += 1
    if size >= len(classes):  # a class too small for its share: one item, from the class most above its share
        for c in np.flatnonzero(take == 0):
            over = np.where(take > 1, take - exact, -np.inf)
            take[int(np.argmax(over))] -= 1
            take[c] = 1
    keep = [rng.permutation(np.flatnonzero(inverse == c))[: take[c]] for c in range(len(classes))]
    return np.sort(np.concatenate(keep))


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """The label of every item of ``dataset``, without reading its images where it keeps them apart.

    ``TensorImageDataset`` (``labels``), torchvision's datasets (``targets``:
    CIFAR, ImageFolder), and `Subset` and `ConcatDataset` of them; any other
    dataset is read item by item.
    """
    if isinstance(dataset, TensorImageDataset):
        return dataset.labels.cpu().numpy()
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, ConcatDataset):
        return np.concatenate([dataset_labels(part) for part in dataset.datasets])
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):  # type: ignore[arg-type]
        return np.asarray(targets)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


def _pil_transform(
    augment: bool, image_size: int, native_size: int | None, mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    """PIL image -> normalised float tensor; resized (shorter side, centre crop)
    unless ``native_size == image_size``; augmented with the standard CIFAR
    pad-and-crop (pad ``image_size // 8``, 4 for 32) and horizontal flip."""
    geometry: list[Any] = [] if native_size == image_size else [v2.Resize(image_size), v2.CenterCrop(image_size)]
    if augment:
        geometry += [v2.RandomCrop(image_size, padding=image_size // 8), v2.RandomHorizontalFlip()]
    return v2.Compose(
        [v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    )


# ---------------------------------------------------------------- digits


@functools.lru_cache(maxsize=4)
def _digits(image_size: int) -> tuple[dict[str, np.ndarray], torch.Tensor, torch.Tensor, float, float]:
    bunch = load_digits()
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    pixels = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    rest, test = split_indices(bunch.target, DIGITS_TEST_FRACTION)
    keep, held = split_indices(bunch.target[rest], DIGITS_VAL_FRACTION / (1 - DIGITS_TEST_FRACTION))
    indices = {"train": rest[keep], "val": rest[held], "trainval": rest, "test": test}
    train = pixels[indices["train"]]
    mean, std = float(train.mean()), float(train.std())
    images = ((pixels - mean) / std).expand(-1, 3, -1, -1).contiguous()
    return indices, images, labels, mean, std


def load_digits_dataset(
    split: Split, augment: bool = False, image_size: int = 32
) -> tuple[TensorImageDataset, DatasetInfo]:
    """scikit-learn's bundled 8x8 digits as small RGB images (no download).

    Pixels are scaled to [0, 1], upsampled (bilinear) to ``image_size``,
    repeated over 3 channels and normalised with the mean and std of the
    training split. The split is fixed (stratified, seeded): 20% test, 10% of
    all images for validation, the rest for training; ``dataset.indices`` are
    the positions in `sklearn.datasets.load_digits()`. Augmentation is a random pad-and-crop
    (no flip: digits are not mirror-symmetric).

    Examples:
        >>> ds, info = load_digits_dataset("val")
        >>> len(ds), info.input_shape
        (180, (3, 32, 32))
    """
    _check_split(split)
    indices, images, labels, mean, std = _digits(image_size)
    idx = torch.as_tensor(indices[split])
    transform = v2.RandomCrop(image_size, padding=image_size // 8) if augment else None
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        in_chans=3,
        image_size=image_size,
        mean=(mean,) * 3,
        std=(std,) * 3,
        classes=tuple(str(d) for d in range(10)),
    )
    return TensorImageDataset(images[idx], labels[idx], transform, indices=idx), info


# ---------------------------------------------------------------- Fashion-MNIST


class DataNotFoundError(EnsembleKitError, FileNotFoundError):
    """A dataset's files are in none of the places looked at, or not laid out as expected; the message says what
    to install or where to put them."""


FASHION_MNIST_ENV = "ENSEMBLEKIT_FASHION_MNIST"
"""Environment variable naming a folder that holds the four Fashion-MNIST files."""
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the four files (gzipped)."""
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""The four IDX files, each found as itself or gzipped (``.gz``)."""
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"
CACHE_ENV = "ENSEMBLEKIT_CACHE"
"""Environment variable overriding the cache folder (default ``$XDG_CACHE_HOME/ensemblekit``,
``~/.cache/ensemblekit``)."""
OFFLINE_ENV = "ENSEMBLEKIT_OFFLINE"
"""Set to 1 to never download (the lookup stops after the local places)."""


def cache_dir() -> Path:
    """The folder where ensemblekit stages downloaded or decompressed data."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ensemblekit"


def _fashion_mnist_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The four files found in ``folder`` (itself or its torchvision layout ``FashionMNIST/raw``), and the missing
    ones."""
    found: dict[str, Path] = {}
    for name in FASHION_MNIST_FILES:
        for place in (folder, folder / "FashionMNIST" / "raw"):
            for candidate in (place / name, place / f"{name}.gz"):
                if candidate.is_file():
                    found[name] = candidate
                    break
            if name in found:
                break
    return found, [f"{name}.gz" for name in FASHION_MNIST_FILES if name not in found]


def _stage_fashion_mnist(files: dict[str, Path]) -> Path:
    """A torchvision root whose ``FashionMNIST/raw`` holds the four files uncompressed.

    Files already laid out that way are used where they are; otherwise each
    file is decompressed (or linked, when not gzipped) into the cache, once:
    a stamp next to it records the source's path, size and time.
    """
    raw_folders = {path.parent for path in files.values()}
    if len(raw_folders) == 1 and all(path.name == name for name, path in files.items()):
        raw = raw_folders.pop()
        if raw.name == "raw" and raw.parent.name == "FashionMNIST":
            return raw.parent.parent
    root = cache_dir() / "fashion-mnist"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        target, stamp = raw / name, raw / f"{name}.source"
        info = source.stat()
        signature = f"{source.resolve()} {info.st_size} {info.st_mtime_ns}\n"
        if target.is_file() and stamp.is_file() and stamp.read_text() == signature:
            continue
        tmp = raw / f".{name}.tmp-{os.getpid()}"
        try:
            if source.suffix == ".gz":
                with gzip.open(source, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            else:
                tmp.symlink_to(source.resolve())
            os.replace(tmp, target)
        finally:
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
        stamp.write_text(signature)
    return root


def _fashion_mnist_help() -> str:
    names = ", ".join(f"{name}.gz" for name in FASHION_MNIST_FILES)
    return (f"install the Debian package: `sudo apt-get install {FASHION_MNIST_PACKAGE}` (it puts the files into "
            f"{FASHION_MNIST_SYSTEM_DIR}), or put the four files {names} ({FASHION_MNIST_URL}) into a folder and pass "
            f"it as root=<folder> (--root <folder>) or set {FASHION_MNIST_ENV}=<folder>")


def _download_fashion_mnist(target: Path) -> str | None:
    """Let torchvision download the files into ``target``; ``None`` on success, else why not."""
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        return f"not downloaded: {OFFLINE_ENV} is set"
    host = tv_datasets.FashionMNIST.mirrors[0].split("/")[2]
    try:  # torchvision's download has no timeout: check that the mirror answers first
        socket.create_connection((host, 80), timeout=5).close()
    except OSError as err:
        return f"not downloaded: {host} cannot be reached ({err})"
    try:
        tv_datasets.FashionMNIST(str(target), train=True, download=True)
    except Exception as err:  # whatever torchvision raises for a failed download
        return f"torchvision's download failed ({type(err).__name__}: {err})"
    return None


def fashion_mnist_available() -> bool:
    """Whether [`find_fashion_mnist()`][ensemblekit.training.data.find_fashion_mnist] finds the files without a
    download (the variable, the Debian package or an earlier download); what ``demo`` and ``reproduce`` check to
    choose Fashion-MNIST over digits."""
    places = [FASHION_MNIST_SYSTEM_DIR, cache_dir() / "fashion-mnist-download"]
    if os.environ.get(FASHION_MNIST_ENV):
        places = [Path(os.environ[FASHION_MNIST_ENV]).expanduser()]
    return any(not _fashion_mnist_files(folder)[1] for folder in places)


def find_fashion_mnist(root: str | Path | None = None) -> tuple[Path, str]:
    """The folder to give `torchvision.datasets.FashionMNIST` as ``root``, and where the files came from.

    The places, in order: ``root``; the folder in ``$ENSEMBLEKIT_FASHION_MNIST``;
    the Debian package's folder
    ([`FASHION_MNIST_SYSTEM_DIR`][ensemblekit.training.data.FASHION_MNIST_SYSTEM_DIR]); a download by
    torchvision into the cache, where a network allows it (not with ``ENSEMBLEKIT_OFFLINE=1``). A ``root`` or
    variable that is given but lacks a file is an error (it is not skipped). Each folder may hold the files
    gzipped or not, directly or as ``FashionMNIST/raw/``; gzipped files are decompressed into the cache once
    ([`cache_dir()`][ensemblekit.training.data.cache_dir]).

    Raises:
        DataNotFoundError: the files are in none of these places; the message
            says what to install or where to put them.
    """
    explicit = [("root", root)] if root is not None else []
    if os.environ.get(FASHION_MNIST_ENV):
        explicit.append((f"${FASHION_MNIST_ENV}", os.environ[FASHION_MNIST_ENV]))
    for what, value in explicit[:1]:  # the first explicit place decides
        folder = Path(value).expanduser()
        files, missing = _fashion_mnist_files(folder)
        if missing:
            state = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
            raise DataNotFoundError(f"fashion-mnist: {what} {folder} {state}; {_fashion_mnist_help()}")
        return _stage_fashion_mnist(files), f"{what} {folder}"
    files, missing = _fashion_mnist_files(FASHION_MNIST_SYSTEM_DIR)
    if not missing:
        return _stage_fashion_mnist(files), f"Debian package {FASHION_MNIST_PACKAGE} ({FASHION_MNIST_SYSTEM_DIR})"
    target = cache_dir() / "fashion-mnist-download"
    files, missing = _fashion_mnist_files(target)
    if not missing:
        return _stage_fashion_mnist(files), f"torchvision's download in {target}"
    why = _download_fashion_mnist(target)
    files, missing = _fashion_mnist_files(target)
    if why is None and not missing:
        return _stage_fashion_mnist(files), f"torchvision's download in {target}"
    raise DataNotFoundError(
        f"fashion-mnist: the data files were not found: no root given, {FASHION_MNIST_ENV} is not set, "
        f"{FASHION_MNIST_SYSTEM_DIR} does not hold them (package {FASHION_MNIST_PACKAGE} not installed), "
        f"{why or 'the download left files missing'}; {_fashion_mnist_help()}")


class RandomPadCrop:
    """Pad an image ``[C, H, W]`` by ``padding`` with ``fill``, crop ``H x W`` back at a random offset, and
    flip it horizontally with probability 1/2 when ``flip`` is set (the CIFAR augmentation, about 4x cheaper
    per image than the torchvision v2 transforms; draws from torch's RNG, seeded per loader worker)."""

    def __init__(self, padding: int, fill: float = 0.0, flip: bool = True):
        self.padding, self.fill, self.flip = padding, fill, flip

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        p, n = self.padding, 2 * self.padding + 1
        draw = int(torch.randint(0, 2 * n * n, ()))  # one draw: offsets and flip
        top, left, flip = draw % n, draw // n % n, draw // (n * n)
        h, w = image.shape[-2:]
        out = F.pad(image, (p, p, p, p), value=self.fill)[..., top:top + h, left:left + w] if p else image
        return out.flip(-1) if self.flip and flip else out


def _files_signature(root: Path) -> tuple:
    """Path, size and time of each staged file (a cache key that changes when a file does)."""
    raw = root / "FashionMNIST" / "raw"
    return tuple((name, (raw / name).stat().st_size, (raw / name).stat().st_mtime_ns) for name in FASHION_MNIST_FILES)


@functools.lru_cache(maxsize=2)
def _fashion_mnist(root: Path, image_size: int, signature: tuple = ()) -> tuple[dict[str, torch.Tensor],
                                                                                dict[str, torch.Tensor]]:
    images, labels = {}, {}
    for part, train in (("train", True), ("test", False)):
        try:
            data = tv_datasets.FashionMNIST(str(root), train=train, download=False)
        except Exception as err:  # torchvision's reader raises several kinds on a damaged file
            raise DataNotFoundError(
                f"fashion-mnist: the files staged in {root / 'FashionMNIST' / 'raw'} cannot be read "
                f"({type(err).__name__}: {err}); they are damaged or not the Fashion-MNIST IDX files; "
                f"{_fashion_mnist_help()}") from err
        pixels = data.data.unsqueeze(1).float().div_(255)
        if image_size != pixels.shape[-1]:
            pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
        images[part] = pixels.sub_(FASHION_MNIST_MEAN[0]).div_(FASHION_MNIST_STD[0])
        labels[part] = data.targets.long()
    return images, labels


def load_fashion_mnist(
    split: Split, root: str | Path | None = None, augment: bool = False, image_size: int = 28
) -> tuple[TensorImageDataset, DatasetInfo]:
    """Fashion-MNIST (Zalando): 60k training and 10k test images of 28x28, one channel, 10 classes.

    Read with `torchvision.datasets.FashionMNIST` from the place
    [`find_fashion_mnist()`][ensemblekit.training.data.find_fashion_mnist] finds. Pixels are scaled to [0, 1], resized
    (bilinear) when ``image_size`` is not 28 and normalised with the
    training set's mean and std. ``"val"`` is a fixed stratified 10% of the
    training set (seed [`SPLIT_SEED`][ensemblekit.training.data.SPLIT_SEED]), ``"train"`` the rest,
    ``"trainval"`` all 60k, ``"test"`` the 10k test images;
    ``dataset.indices`` are positions in the training (or test) file.
    Augmentation: a random pad-and-crop (pad ``image_size // 8``, black) and
    a horizontal flip.

    Raises:
        DataNotFoundError: the files are nowhere (the message says what to
            install or where to put them), or cannot be read.
    """
    _check_split(split)
    folder, source = find_fashion_mnist(root)
    folder = folder.resolve()
    images, labels = _fashion_mnist(folder, image_size, _files_signature(folder))
    part = "test" if split == "test" else "train"
    if split in ("test", "trainval"):
        idx = torch.arange(len(labels[part]))
    else:
        keep, held = split_indices(labels[part].numpy(), VAL_FRACTION)
        idx = torch.as_tensor(keep if split == "train" else held)
    black = -FASHION_MNIST_MEAN[0] / FASHION_MNIST_STD[0]
    transform = RandomPadCrop(image_size // 8, fill=black) if augment else None
    info = DatasetInfo(
        name="fashion-mnist",
        num_classes=10,
        in_chans=1,
        image_size=image_size,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        classes=tuple(tv_datasets.FashionMNIST.classes),
        source=source,
    )
    if split in ("test", "trainval"):  # the whole file: share the cached tensors instead of copying them
        return TensorImageDataset(images[part], labels[part], transform, indices=idx), info
    return TensorImageDataset(images[part][idx], labels[part][idx], transform, indices=idx), info


# ---------------------------------------------------------------- CIFAR


_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/{}-python.tar.gz"
_CIFAR = {  # name -> (torchvision class, mean, std, title, download address)
    "cifar10": (tv_datasets.CIFAR10, CIFAR10_MEAN, CIFAR10_STD, "CIFAR-10", _CIFAR_URL.format("cifar-10")),
    "cifar100": (tv_datasets.CIFAR100, CIFAR100_MEAN, CIFAR100_STD, "CIFAR-100", _CIFAR_URL.format("cifar-100")),
}


def _cifar_root(name: str, root: str | Path | None) -> Path:
    cls, _, _, title, url = _CIFAR[name]
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    if root is None:
        raise DataNotFoundError(
            f"{name} needs root=<folder>: the folder that contains {cls.base_folder}/ "
            f"({', '.join(files)}); download the {title} python version ({url}) and extract it there"
        )
    root = Path(root).expanduser()
    if root.name == cls.base_folder:
        root = root.parent
    folder = root / cls.base_folder
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(
            f"{name}: expected {folder}/{missing[0]} (missing: {', '.join(missing)}); "
            f"download the {title} python version ({url}) and extract it into {root} "
            f"so that {folder}/ holds {', '.join(files)}"
        )
    return root


def _load_cifar(
    name: str, split: Split, root: str | Path | None, augment: bool, image_size: int
) -> tuple[Dataset, DatasetInfo]:
    cls, mean, std, title, url = _CIFAR[name]
    root = _cifar_root(name, root)
    transform = _pil_transform(augment, image_size, 32, mean, std)
    try:
        dataset = cls(str(root), train=split != "test", transform=transform, download=False)
    except RuntimeError as err:
        raise RuntimeError(
            f"{name}: the files in {root / cls.base_folder} fail torchvision's checksum "
            f"(corrupted, or not the official {title} python version); download {url} again and extract it there"
        ) from err
    info = DatasetInfo(
        name=name,
        num_classes=len(dataset.classes),
        in_chans=3,
        image_size=image_size,
        mean=mean,
        std=std,
        classes=tuple(dataset.classes),
    )
    if split in ("test", "trainval"):
        return dataset, info
    keep, held = split_indices(dataset.targets, VAL_FRACTION)
    return Subset(dataset, (keep if split == "train" else held).tolist()), info


# ---------------------------------------------------------------- ImageFolder


def _load_imagefolder(
    split: Split, root: str | Path | None, augment: bool, image_size: int | None,
    data_config: dict[str, Any] | None = None,
) -> tuple[Dataset, DatasetInfo]:
    layout = (
        "expected <root>/train/<class>/<image> and <root>/val/<class>/<image> "
        f"(optionally <root>/test/<class>/<image>), images ending in {', '.join(IMG_EXTENSIONS)}"
    )
    if root is None:
        raise DataNotFoundError(f"imagefolder needs root=<folder>; {layout}")
    root = Path(root).expanduser()
    missing = [d for d in ("train", "val") if not (root / d).is_dir()]
    if missing:
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else None
        where = f"{root} does not exist" if found is None else f"{root} holds folders {found}"
        raise DataNotFoundError(f"imagefolder: no {', '.join(missing)} folder ({where}); {layout}")
    folders = [d for d in ("train", "val", "test") if (root / d).is_dir()]
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    for d in folders[1:]:
        other = sorted(p.name for p in (root / d).iterdir() if p.is_dir())
        if other != classes:
            raise DataNotFoundError(
                f"imagefolder: {root / d} has class folders {other} but {root / 'train'} has {classes}; "
                f"every split needs the same class folders; {layout}"
            )
    has_test = "test" in folders
    from ensemblekit.backbones.transforms import data_config as default_config
    from ensemblekit.backbones.transforms import image_transform

    config = default_config() if data_config is None else dict(data_config)
    if image_size is not None:
        config["input_size"] = (3, image_size, image_size)
    config["input_size"] = (3, *config["input_size"][-2:])  # ImageFolder reads RGB images
    transform = image_transform(config, augment)

    def folder(d: str) -> tv_datasets.ImageFolder:
        try:
            return tv_datasets.ImageFolder(str(root / d), transform=transform)
        except (FileNotFoundError, RuntimeError) as err:
            raise DataNotFoundError(f"imagefolder: {root / d} is not usable ({err}); {layout}") from err

    if split == "test":
        dataset: Dataset = folder("test" if has_test else "val")
    elif has_test:
        dataset = folder(split) if split != "trainval" else ConcatDataset([folder("train"), folder("val")])
    else:
        dataset = folder("train")
        if split != "trainval":
            keep, held = split_indices(dataset.targets, VAL_FRACTION)
            dataset = Subset(dataset, (keep if split == "train" else held).tolist())
    info = DatasetInfo(
        name="imagefolder",
        num_classes=len(classes),
        in_chans=3,
        image_size=int(config["input_size"][-2]),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        classes=tuple(classes),
    )
    return dataset, info


# ---------------------------------------------------------------- entry points


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UnknownNameError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")


def load_dataset(
    name: str,
    split: Split,
    root: str | Path | None = None,
    augment: bool | None = None,
    image_size: int | None = None,
    data_config: dict[str, Any] | None = None,
) -> tuple[Dataset, DatasetInfo]:
    """Load one split of a dataset.

    Args:
        name: ``"digits"`` (bundled with scikit-learn), ``"fashion-mnist"``
            (one channel, 28x28; found by [`find_fashion_mnist()`][ensemblekit.training.data.find_fashion_mnist]:
            ``root``, ``$ENSEMBLEKIT_FASHION_MNIST``, the Debian package
            ``dataset-fashion-mnist``, then torchvision's download), ``"cifar10"`` or
            ``"cifar100"`` (``root`` holds ``cifar-10-batches-py/`` or
            ``cifar-100-python/``, the official python version, extracted),
            or ``"imagefolder"`` (``root/train/<class>/*.png`` and
            ``root/val/<class>/*.png``; with a ``root/test`` folder too,
            ``val`` is the validation split and ``test`` the test split,
            otherwise ``val`` is the test split and the validation split is a
            fixed 10% of ``train``).
        split: ``"train"``, ``"val"``, ``"trainval"`` or ``"test"``.
        root: data folder (unused for digits; optional for Fashion-MNIST).
        augment: random pad-and-crop (and horizontal flip, except for digits;
            for ImageFolder timm's training transform: random resized crop,
            flip, colour jitter); ``None`` means on for ``"train"`` and ``"trainval"``.
        image_size: side of the images returned; defaults to 32 (digits,
            CIFAR), 28 (Fashion-MNIST) or, for ImageFolder, the data config's
            input size (224 without one).
        data_config: ImageFolder only: timm's data config of the backbone
            (``ensemblekit.backbones.transforms.data_config``, or
            ``timm.data.resolve_model_data_config``): its input size, mean,
            std, crop and interpolation make the transforms
            (``timm.data.create_transform``); ``None``: timm's defaults
            (ImageNet mean and std, 224, crop 0.875).

    Returns:
        ``(dataset, info)``; items are ``(image [C, S, S], label)`` with
        ``C = info.in_chans`` (1 for Fashion-MNIST, 3 otherwise).

    Raises:
        ValueError: unknown dataset name or split.
        FileNotFoundError: data missing or laid out wrongly (the message says
            what to put where; [`DataNotFoundError`][ensemblekit.training.data.DataNotFoundError] for Fashion-MNIST).

    Examples:
        >>> test, info = load_dataset("digits", "test")
        >>> len(test), info.num_classes
        (359, 10)
    """
    if name not in DATASETS:
        raise UnknownNameError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    _check_split(split)
    if augment is None:
        augment = split in ("train", "trainval")
    if name == "digits":
        return load_digits_dataset(split, augment=augment, image_size=image_size or 32)
    if name == "fashion-mnist":
        return load_fashion_mnist(split, root, augment=augment, image_size=image_size or 28)
    if name == "imagefolder":
        return _load_imagefolder(split, root, augment, image_size, data_config)
    return _load_cifar(name, split, root, augment, image_size or 32)


class SeededItems(Dataset):
    """``dataset`` whose item ``i`` of epoch ``e`` draws its random augmentation from its own seed.

    Each item runs under torch's global RNG seeded from ``(seed, epoch, i)`` and
    restored afterwards, so an item's augmentation depends neither on the worker
    process that loads it nor on the items loaded before it: a run resumed in the
    middle of an epoch, with any number of workers, sees the same images.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        words = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, dtype=np.uint32)
        generator = torch.default_generator  # the CPU generator transforms draw from (torch.manual_seed would
        saved = generator.get_state()        # also seed every accelerator: about 100 us per item)
        try:
            generator.manual_seed(int(words[0]) << 32 | int(words[1]))
            return self.dataset[index]
        finally:
            generator.set_state(saved)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int | None = None,
    sampler: Sampler | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A `DataLoader`, reproducible when ``seed`` is given.

    The seed drives a dedicated generator for the shuffle order and for the
    per-worker seeds (so random augmentations repeat too). ``shuffle`` and
    ``sampler`` exclude each other.

    Examples:
        >>> ds, _ = load_dataset("digits", "val")
        >>> a = [y.tolist() for _, y in make_loader(ds, 32, shuffle=True, seed=1)]
        >>> a == [y.tolist() for _, y in make_loader(ds, 32, shuffle=True, seed=1)]
        True
    """
    if sampler is not None and shuffle:
        raise InvalidValueError("pass either shuffle=True or a sampler, not both (the sampler decides the order)")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
