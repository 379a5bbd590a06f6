"""ensemblekit.functional against direct computations of each formula."""

from __future__ import annotations

import math

import pytest
import torch

from ensemblekit import functional as Fk


def test_kl_divergence_and_kd_loss_written_out():
    torch.manual_seed(0)
    s, t = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    p, q = t.softmax(-1), s.softmax(-1)
    assert torch.allclose(Fk.kl_divergence(p.log(), q.log()), (p * (p.log() - q.log())).sum(-1))
    for temp in (1.0, 2.0, 4.0):
        p_t, p_s = (t / temp).softmax(-1), (s / temp).softmax(-1)
        expected = temp**2 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
        assert torch.allclose(Fk.kd_loss(s, t, temp), expected)
    assert Fk.kd_loss(s, s, 2.0).abs() < 1e-12


def test_member_cross_entropy_is_one_batch_mean_per_member():
    torch.manual_seed(1)
    z, y = torch.randn(4, 3, 5, dtype=torch.float64), torch.randint(0, 5, (4,))
    expected = torch.stack([-z[:, n].log_softmax(-1)[torch.arange(4), y].mean() for n in range(3)])
    assert torch.allclose(Fk.member_cross_entropy(z, y), expected)


def test_confidence_is_the_max_softmax_probability():
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    e = math.exp(2)
    assert torch.allclose(Fk.confidence(z), torch.tensor([e / (e + 2), 1 / 3]))
    assert Fk.confidence(z.half()).dtype == torch.float32
    assert Fk.confidence(torch.randn(2, 4, 3)).shape == (2, 4)


def first_exit(conf, thresholds):
    """The first k with conf[k] >= thresholds[k], the last exit when none, written as a loop."""
    return next((k for k in range(len(conf) - 1) if conf[k] >= thresholds[k]), len(conf) - 1)


def test_exit_indices_per_exit_and_per_grid_point():
    torch.manual_seed(2)
    conf = torch.rand(50, 4)
    thresholds = torch.tensor([0.8, 0.6, 0.4, 2.0])
    assert Fk.exit_indices(conf, thresholds).tolist() == [first_exit(c, thresholds) for c in conf]
    grid = torch.tensor([0.0, 0.3, 0.7, 1.0])
    exits = Fk.exit_indices(conf, grid[:, None, None])
    assert exits.shape == (4, 50)
    for g, value in enumerate(grid):
        assert exits[g].tolist() == [first_exit(c, value.expand(4)) for c in conf]
    assert Fk.exit_indices(conf[:, :1], torch.tensor([2.0])).tolist() == [0] * 50  # one exit: always it


def test_exit_distribution_is_geometric():
    pi = Fk.exit_distribution(0.5, 3)
    weights = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)
    assert torch.allclose(pi, weights / weights.sum())
    with pytest.raises(ValueError, match="q must be > 0"):
        Fk.exit_distribution(0.0, 3)


def test_survival_halting_distribution_and_expected_cost():
    h = torch.tensor([[0.2, 0.5, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    s = Fk.survival(h)
    assert torch.allclose(s, torch.tensor([[1.0, 0.8, 0.4], [1.0, 1.0, 1.0]], dtype=torch.float64))
    p = Fk.halting_distribution(h)
    assert torch.allclose(p, torch.tensor([[0.2, 0.4, 0.4], [0.0, 0.0, 1.0]], dtype=torch.float64))
    assert torch.allclose(p.sum(1), torch.ones(2, dtype=torch.float64))
    cost = Fk.expected_cost(p, [1.0, 2.0, 3.0])
    assert torch.allclose(cost, torch.tensor([0.2 + 0.8 + 1.2, 3.0], dtype=torch.float64))
    assert torch.allclose(cost, s.sum(1))  # E[z] = sum_t S(t) for costs 1..T
    fractions = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert float(Fk.expected_cost(fractions, [10.0, 20.0, 40.0])) == pytest.approx(5 + 5 + 10)


def test_survival_weighted_cross_entropy_written_out():
    torch.manual_seed(3)
    probs = torch.rand(4, 3, 5, dtype=torch.float64).softmax(-1)
    s = torch.rand(4, 3, dtype=torch.float64) + 0.1
    y = torch.randint(0, 5, (4,))
    out = Fk.survival_weighted_cross_entropy(probs, s, y)
    for b in range(4):
        for t in range(3):
            ens = sum(s[b, i] * probs[b, i] for i in range(t + 1)) / sum(s[b, i] for i in range(t + 1))
            assert out[b, t].item() == pytest.approx(-math.log(ens[y[b]].item()))
