"""splitting's Chain is now BlockSequence (the multi-exit topology keeps the name Chain)."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import ensemblekit as ek
from ensemblekit.splitting import BlockSequence, split_sequential


def test_chain_is_a_deprecated_name_of_block_sequence():
    for path in ("ensemblekit.splitting", "ensemblekit.splitting.sequential"):
        module = importlib.import_module(path)
        with pytest.warns(DeprecationWarning, match="BlockSequence"):
            assert module.Chain is BlockSequence
    with pytest.warns(DeprecationWarning):
        from ensemblekit.splitting import Chain  # noqa: F401
    assert ek.topologies.Chain is not BlockSequence
    with pytest.raises(AttributeError):
        importlib.import_module("ensemblekit.splitting").NoSuchThing  # noqa: B018


def test_merged_pieces_are_block_sequences():
    torch.manual_seed(0)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    blocks = split_sequential([nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), head], 2).blocks
    assert any(isinstance(b, BlockSequence) for b in blocks)
