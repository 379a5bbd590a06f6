"""Shared fixtures: tiny hand-built block splits that need no timm model."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from torch import nn

from ensemblekit.core.blocks import BlockSplit

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
