"""Shared fixtures: tiny hand-built block splits that need no timm model; no Fashion-MNIST from the machine."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings
from torch import nn
from torch.utils.data import Dataset

from ensemblekit.core.blocks import BlockSplit
from ensemblekit.training import data as data_module

settings.register_profile("ci", deadline=None, max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)  # tests run in 2 xdist workers on 2 cores: one thread each


def conv_block(channels: int = 3) -> nn.Module:
    """A block whose FLOPs do not depend on its position (same shape in and out)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())


def toy_split(num_blocks: int, num_classes: int = 5, channels: int = 3) -> BlockSplit:
    """``num_blocks`` equal-cost conv blocks and a pool + linear head."""
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    return BlockSplit(
        blocks=[conv_block(channels) for _ in range(num_blocks)],
        head=head,
        num_classes=num_classes,
        feature_index=[None] * num_blocks,
        feature_format=["NCHW"] * num_blocks,
        in_chans=channels,
        example_size=(8, 8),
    )


@pytest.fixture
def make_split():
    return toy_split


@pytest.fixture(scope="session", autouse=True)
def no_fashion_mnist_from_the_machine(tmp_path_factory):
    """Tests never read the machine's Fashion-MNIST (the Debian package, the variable, a download, the user's
    cache): those that need it write small IDX files themselves (:func:`write_fashion_mnist`)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(data_module.FASHION_MNIST_ENV, raising=False)
        mp.setenv(data_module.CACHE_ENV, str(tmp_path_factory.mktemp("ensemblekit-cache")))
        mp.setenv(data_module.OFFLINE_ENV, "1")
        mp.setattr(data_module, "FASHION_MNIST_SYSTEM_DIR", tmp_path_factory.mktemp("no-fashion-mnist") / "absent")
        yield


def write_fashion_mnist(folder: Path, n_train: int = 100, n_test: int = 20, seed: int = 0) -> Path:
    """The four gzipped IDX files of Fashion-MNIST with random 28x28 images; labels cycle over the 10 classes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        for kind, payload in (("images-idx3", struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes()),
                              ("labels-idx1", struct.pack(">II", 0x801, n) + labels.tobytes())):
            with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(payload)
    return folder


@pytest.fixture
def fashion_mnist_env(monkeypatch, tmp_path):
    """A small Fashion-MNIST written by the test, found through ``$ENSEMBLEKIT_FASHION_MNIST``."""
    folder = write_fashion_mnist(tmp_path / "fashion-mnist")
    monkeypatch.setenv(data_module.FASHION_MNIST_ENV, str(folder))
    return folder


class Interrupt(Dataset):
    """Raises KeyboardInterrupt at the ``at``-th item read: a run killed mid-epoch."""

    def __init__(self, data: Dataset, at: int):
        self.data, self.at, self.reads = data, at, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.at:
            raise KeyboardInterrupt
        return self.data[i]
