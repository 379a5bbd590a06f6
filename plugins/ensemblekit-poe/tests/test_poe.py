"""ensemblekit-poe: registration through its entry point, the product's maths, halting."""

from __future__ import annotations

import pytest
import torch
from ensemblekit_poe import ProductOfExperts, ProductSupportHalting, support_size

import ensemblekit as ek
from ensemblekit.core.interfaces import HaltingStep
from ensemblekit.core.registry import AGGREGATORS, HALTING_POLICIES
from ensemblekit.plugins.manager import plugin_infos
from ensemblekit.testing import check_component, check_halting_policy, toy_split


def test_installed_package_registers_its_components():
    info = next(p for p in plugin_infos() if p.name == "poe")
    assert (info.status, info.distribution) == ("loaded", "ensemblekit-poe")
    assert info.components == {"aggregator": ["poe"], "halting policy": ["poe_support"]}
    assert AGGREGATORS.get("poe").factory is ProductOfExperts
    assert HALTING_POLICIES.get("poe_support").factory is ProductSupportHalting


@pytest.mark.parametrize("kind, name", [("aggregator", "poe"), ("halting policy", "poe_support")])
def test_conformance(kind, name):
    check_component(kind, name)


def test_entropy_criterion_and_geometric_conform():
    check_halting_policy(ProductSupportHalting(criterion="entropy", geometric=True))
    check_component("aggregator", "poe")


def test_product_is_the_renormalised_product_of_probabilities():
    members = torch.randn(4, 3, 6)
    probs = members.softmax(-1)
    expected = probs.prod(dim=1) / probs.prod(dim=1).sum(-1, keepdim=True)
    torch.testing.assert_close(ProductOfExperts()(members).softmax(-1), expected)


def test_geometric_mean_of_identical_members_is_that_member():
    member = torch.randn(4, 1, 6)
    torch.testing.assert_close(ProductOfExperts(geometric=True)(member.repeat(1, 5, 1)),
                               member[:, 0].log_softmax(-1))


def test_a_member_vetoes_a_class():
    members = torch.tensor([[[5.0, 5.0, -5.0], [-20.0, 5.0, 5.0]]])
    assert ProductOfExperts()(members).argmax(-1).item() == 1


def test_support_size():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.97, 0.02, 0.01], [0.25, 0.25, 0.5]])
    assert support_size(probs, 0.9).tolist() == [3, 1, 3]
    assert support_size(probs, 0.5).tolist() == [1, 1, 1]


def _step(index: int, logits: torch.Tensor, num_members: int = 4) -> HaltingStep:
    return HaltingStep(index, num_members, logits, logits, flops=1.0)


def test_halting_stops_confident_samples_only():
    policy = ProductSupportHalting(mass=0.9)
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    stop, state = policy.step(_step(0, logits), None)
    assert stop.tolist() == [True, False]
    stop, _ = policy.step(_step(1, logits), state)
    assert stop.tolist() == [True, False]


def test_product_sharpens_across_members_until_it_stops():
    policy = ProductSupportHalting(criterion="entropy", threshold=0.3)
    logits = torch.tensor([[1.5, 0.0, 0.0]])
    stops, state = [], None
    for k in range(4):
        stop, state = policy.step(_step(k, logits), state)
        stops.append(stop.item())
    assert stops == [False, False, True, True]


def test_min_members():
    policy = ProductSupportHalting(min_members=2)
    stop, state = policy.step(_step(0, torch.tensor([[10.0, 0.0]])), None)
    assert not stop.item()
    assert policy.step(_step(1, torch.tensor([[10.0, 0.0]])), state)[0].item()


@pytest.mark.parametrize("options", [{"criterion": "size"}, {"mass": 0.0}, {"min_members": 0}, {"threshold": -1}])
def test_bad_options(options):
    with pytest.raises(ValueError):
        ProductSupportHalting(**options)


def test_by_name_through_wrap():
    ens = ek.wrap(toy_split(3), "tree", depth=2, aggregator="poe",
                  halting={"name": "poe_support", "criterion": "entropy", "threshold": 10.0})
    assert isinstance(ens.aggregator, ProductOfExperts)
    result = ens.eval().predict(torch.randn(3, 3, 8, 8))
    assert result.members_used.tolist() == [1, 1, 1]
