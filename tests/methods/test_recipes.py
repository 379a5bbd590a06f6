"""The HNE and EnsembleNet recipes: structure, size and losses as in the papers."""

from __future__ import annotations

import pytest
import timm
import torch

import ensemblekit as ek
from ensemblekit.components.aggregators import MeanLogits
from ensemblekit.components.losses import EnsembleNetCoDistillation, EnsembleNetEnsembling, HierarchicalDistillation
from ensemblekit.components.topologies import MultiBranch, Tree
from ensemblekit.core.flops import count_flops
from ensemblekit.methods.ensemblenet import AdaptedBlock

X = torch.randn(2, 3, 32, 32)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared CPU makes more threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def backbone(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=10, **kwargs)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_recipes_resolve_by_name_every_time():
    from ensemblekit.methods import ensemblenet, hne

    assert callable(hne) and callable(ensemblenet)
    assert ek.recipes.hne is hne and ek.recipes.ensemblenet is ensemblenet


def test_hne_is_a_distilled_tree_with_mean_of_logits():
    ens = ek.recipes.hne(backbone(), depth=2)
    assert isinstance(ens.topology, Tree) and ens.topology.branching == 2
    assert ens.num_members == 4 and ens.nested_sizes == (1, 2, 4)
    assert isinstance(ens.aggregator, MeanLogits)
    loss = ens.loss_strategy
    assert isinstance(loss, HierarchicalDistillation) and (loss.alpha, loss.temperature) == (0.5, 2.0)
    assert ens(X).shape == (2, 10)


def test_hne_options():
    ens = ek.recipes.hne(backbone(), depth=1, branching=3, alpha=0.2, temperature=4.0)
    assert ens.num_members == 3 and (ens.loss_strategy.alpha, ens.loss_strategy.temperature) == (0.2, 4.0)
    ablation = ek.recipes.hne(backbone(), depth=1, loss="nested")
    assert type(ablation.loss_strategy).__name__ == "NestedCE"
    with pytest.raises(TypeError, match="fixes the aggregator"):
        ek.recipes.hne(backbone(), depth=1, aggregator="vote")


def test_ensemblenet_is_no_bigger_than_its_backbone():
    base = backbone()
    ens = ek.recipes.ensemblenet(base, branches=2)
    assert isinstance(ens.topology, MultiBranch) and ens.num_members == 2
    assert n_params(ens) <= n_params(base)
    assert ens.cost_table(input_size=tuple(X.shape[1:]))[-1].flops <= count_flops(base.eval(), X[:1])
    assert isinstance(ens.loss_strategy, EnsembleNetCoDistillation) and ens.loss_strategy.mu == 3.0


def test_ensemblenet_branches_are_narrow_blocks_behind_an_adapter():
    base = backbone()
    ens = ek.recipes.ensemblenet(base, branches=2, fork=-2, width=0.5)
    fork = ens.topology.fork_block(len(ens.graph.levels))
    branch_nodes = [n for n in ens.graph.nodes if n.block >= fork]
    assert len(branch_nodes) == 2 * (len(ens.graph.levels) - fork)
    firsts = [ens.nodes[n.index] for n in branch_nodes if n.block == fork]
    assert all(isinstance(m, AdaptedBlock) for m in firsts)
    conv = firsts[0].adapter.proj[0]
    assert (conv.in_channels, conv.out_channels) == (128, 64)  # layer2 of resnet10t -> half width
    trunk = [ens.nodes[n.index] for n in ens.graph.nodes if n.block < fork]
    assert n_params(torch.nn.ModuleList(trunk)) == sum(
        n_params(m) for name, m in base.named_children() if name in ("conv1", "bn1", "layer1", "layer2"))
    heads = list(ens.heads)
    assert heads[0].fc.in_features == 256  # the narrow model's classifier
    assert not torch.equal(heads[0].fc.weight, heads[1].fc.weight)  # each branch drawn anew
    out = ens.forward_output(X)
    assert out.members.shape == (2, 2, 10)
    ens.loss(out, torch.tensor([3, 4])).total.backward()
    assert all(p.grad is not None for p in ens.parameters())


def test_ensemblenet_ensembling_loss_and_no_adapter_at_full_width():
    ens = ek.recipes.ensemblenet(backbone(), branches=3, width=1.0,
                                 loss={"name": "ensemblenet_ensembling", "lam": -1.5})
    assert ens.num_members == 3
    assert isinstance(ens.loss_strategy, EnsembleNetEnsembling) and ens.loss_strategy.lam == -1.5
    assert not any(isinstance(m, AdaptedBlock) for m in ens.nodes)


def test_ensemblenet_rejects_bad_widths():
    with pytest.raises(ValueError, match="width"):
        ek.recipes.ensemblenet(backbone(), width=1.5)
    with pytest.raises(ValueError, match="custom width"):  # narrow_model scales timm's default width
        ek.recipes.ensemblenet(backbone(channels=(8, 16, 32, 64)), width=0.5)


def test_node_and_head_overrides_of_the_core():
    from ensemblekit.core.ensemble import Ensemble
    from tests.conftest import toy_split

    split = toy_split(2)
    special = torch.nn.Identity()
    ens = Ensemble(split, Tree(1), MeanLogits(), node_modules={2: special})
    assert ens.nodes[2] is special
    with pytest.raises(ValueError, match="node_modules has index 7"):
        Ensemble(split, Tree(1), MeanLogits(), node_modules={7: special})


def test_recipes_are_registered_components():
    from ensemblekit.core.registry import RECIPES

    assert set(ek.list_components("recipe")) >= {"hne", "ensemblenet", "multi_exit", "irene"}
    for name in ("hne", "ensemblenet", "multi_exit", "irene"):
        assert RECIPES.get(name).factory is getattr(ek.recipes, name)
        assert RECIPES.get(name).builtin


def test_every_ensemble_is_built_by_wrap(monkeypatch):
    import importlib

    import ensemblekit.build

    module = importlib.import_module("ensemblekit.methods.ensemblenet")  # the package's attribute is the function
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return ensemblekit.build.wrap(*args, **kwargs)

    monkeypatch.setattr(module, "wrap", spy)
    ens = ek.recipes.ensemblenet(backbone(), branches=2, execution="vmap")
    assert len(calls) == 1 and set(calls[0]["node_modules"]) and set(calls[0]["head_modules"]) == {0, 1}
    assert ens.execution == "vmap" and all(ens.nodes[i] is m for i, m in calls[0]["node_modules"].items())


TINY = {"backbone": "resnet10t", "num_classes": 3, "image_size": 16,
        "backbone_options": {"stem_width": 8, "channels": [8, 16, 16, 16]}}


@pytest.mark.parametrize(("recipe", "options", "members"), [
    ("hne", {"depth": 1, "alpha": 0.3, "execution": "vmap"}, 2),
    ("multi_exit", {"exits": [2, 4], "ofa": True}, 2),
    ("irene", {"members": 2, "cost_weight": 0.1}, 2),
])
def test_a_config_resolves_its_recipe_by_name(recipe, options, members):
    from ensemblekit.training.config import ModelConfig, build_ensemble

    ens = build_ensemble(ModelConfig(**TINY, recipe=recipe, recipe_options=options))
    assert ens.num_members == members
    assert ens.execution == options.get("execution", "loop")
    assert ens(torch.randn(2, 3, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize(("options", "message"), [
    ({"leaves": 4},
     "model.recipe_options: recipe 'hne' does not take leaves; it takes: depth, branching, alpha, temperature"),
    ({"depth": "two"}, "model.recipe_options: recipe 'hne': option depth='two' is not of type int"),
    ({"init": "copy"}, "model.recipe_options cannot set init: the config passes"),
])
def test_recipe_options_are_checked_by_the_registry(options, message):
    from ensemblekit.training.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
        ModelConfig(**TINY, recipe="hne", recipe_options=options)
