"""ensemblekit-moe: registration through its entry point, the mixture's maths, learning the gate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ensemblekit_moe import GatedMixture, confidence_features

import ensemblekit as ek
from ensemblekit.components.aggregators import MeanProbs
from ensemblekit.core.registry import AGGREGATORS
from ensemblekit.plugins.manager import plugin_infos
from ensemblekit.testing import check_aggregator, check_component, toy_split


def test_installed_package_registers_its_aggregator():
    info = next(p for p in plugin_infos() if p.name == "moe")
    assert (info.status, info.distribution) == ("loaded", "ensemblekit-moe")
    assert info.components == {"aggregator": ["moe_gate"]}
    assert AGGREGATORS.get("moe_gate").factory is GatedMixture


def test_conformance():
    check_component("aggregator", "moe_gate")


def test_conformance_with_a_trained_looking_gate():
    moe = GatedMixture(num_members=4, hidden=8)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_()
    check_aggregator(moe)


def test_untrained_gate_is_the_mean_of_probabilities():
    members = torch.randn(5, 3, 7)
    torch.testing.assert_close(GatedMixture(3)(members), MeanProbs()(members))


def test_weights_renormalise_over_the_members_seen_so_far():
    moe = GatedMixture(3)
    with torch.no_grad():
        moe.member_bias.copy_(torch.tensor([-30.0, 30.0, 0.0]))
    members = torch.randn(4, 3, 6)
    prefixes = moe.prefixes(members)
    torch.testing.assert_close(prefixes[:, 0], members[:, 0].log_softmax(-1))
    torch.testing.assert_close(prefixes[:, 1], members[:, 1].log_softmax(-1))
    torch.testing.assert_close(prefixes[:, 2], members[:, 1].log_softmax(-1))


def test_confidence_features():
    features = confidence_features(torch.tensor([[0.0, 0.0], [100.0, 0.0]]))
    torch.testing.assert_close(features, torch.tensor([[0.5, 0.0, 1.0], [1.0, 1.0, 0.0]]))


def test_too_many_members_and_bad_options():
    with pytest.raises(ValueError, match="built for 2 members"):
        GatedMixture(2)(torch.randn(1, 3, 4))
    with pytest.raises(ValueError):
        GatedMixture(0)
    with pytest.raises(ValueError):
        GatedMixture(2, hidden=0)


def test_gate_learns_to_trust_the_confident_member():
    """Per sample one member is confident and right, the other diffuse; the gate learns to pick."""
    gen = torch.Generator().manual_seed(0)
    b, c = 256, 5
    target = torch.randint(0, c, (b,), generator=gen)
    wrong = (target + torch.randint(1, c, (b,), generator=gen)) % c
    expert = F.one_hot(target, c) * 4.0 + torch.randn(b, c, generator=gen) * 0.3
    diffuse = F.one_hot(wrong, c) * 1.0 + torch.randn(b, c, generator=gen) * 0.3
    first_is_expert = torch.rand(b, generator=gen) < 0.5
    members = torch.stack([torch.where(first_is_expert[:, None], expert, diffuse),
                           torch.where(first_is_expert[:, None], diffuse, expert)], dim=1)
    baseline = F.cross_entropy(MeanProbs()(members), target).item()
    torch.manual_seed(0)
    moe = GatedMixture(2)
    optimizer = torch.optim.Adam(moe.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        loss = F.cross_entropy(moe(members), target)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * baseline


def test_by_name_through_wrap_and_trained_by_the_loss():
    ens = ek.wrap(toy_split(3), "tree", depth=2, aggregator="moe_gate", loss="nested")
    assert isinstance(ens.aggregator, GatedMixture) and ens.aggregator.member_bias.numel() == 4
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    ens.loss(ens.forward_output(x), y).total.backward()
    assert ens.aggregator.gate[-1].weight.grad.abs().sum() > 0
