"""Aggregators: batch form equals incremental form, and each matches its formula."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ensemblekit.components.aggregators import MeanLogits, MeanProbs, Vote, WeightedMean

shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(2, 5))


def all_aggregators(m):
    return [MeanLogits(), MeanProbs(), Vote(), WeightedMean(m, [float(i + 1) for i in range(m)])]


@given(shapes, st.integers(0, 2**16))
def test_batch_equals_incremental(shape, seed):
    b, m, c = shape
    members = torch.randn(b, m, c, generator=torch.Generator().manual_seed(seed))
    for agg in all_aggregators(m):
        state = None
        for k in range(m):
            state = agg.update(state, members[:, k], k)
            assert torch.equal(agg.value(state), agg.prefixes(members)[:, k])
        assert torch.equal(agg(members), agg.value(state))


@given(shapes, st.integers(0, 2**16))
def test_formulas(shape, seed):
    b, m, c = shape
    z = torch.randn(b, m, c, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(MeanLogits()(z), z.mean(1))
    torch.testing.assert_close(MeanProbs()(z).softmax(-1), z.softmax(-1).mean(1))
    votes = torch.nn.functional.one_hot(z.argmax(-1), c).sum(1)
    assert torch.equal(Vote()(z).argmax(-1), votes.argmax(-1))
    w = torch.arange(1.0, m + 1)
    expected = (z * (w / w.sum())[None, :, None]).sum(1)
    torch.testing.assert_close(WeightedMean(m, w.tolist())(z), expected)


def test_learnable_weights_get_gradients():
    agg = WeightedMean(3, learnable=True)
    agg(torch.randn(2, 3, 4)).pow(2).sum().backward()
    assert agg.log_weights.grad is not None


def test_bad_members_shape():
    with pytest.raises(ValueError, match="members"):
        MeanLogits()(torch.randn(2, 3))
    with pytest.raises(ValueError, match="positive"):
        WeightedMean(2, [1.0, -1.0])
