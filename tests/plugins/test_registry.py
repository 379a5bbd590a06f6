"""Names and objects resolve through one registry, with clear errors."""

from __future__ import annotations

import pytest

import ensemblekit as ek
from ensemblekit.core.registry import AGGREGATORS, TOPOLOGIES, UnknownComponentError
from tests.conftest import toy_split


def test_strings_and_objects_resolve_alike():
    by_name = ek.wrap(toy_split(3), "tree", depth=2)
    by_object = ek.wrap(toy_split(3), ek.topologies.Tree(depth=2, branching=2))
    by_mapping = ek.wrap(toy_split(3), {"name": "tree", "depth": 2})
    assert by_name.num_members == by_object.num_members == by_mapping.num_members == 4
    assert set(TOPOLOGIES.names()) >= {"tree", "independent", "multi_branch", "chain", "cascade"}
    assert set(AGGREGATORS.names()) >= {"mean", "mean_probs", "vote", "weighted"}


def test_weighted_aggregator_by_name_gets_the_member_count():
    ens = ek.wrap(toy_split(2), "independent", members=3, aggregator="weighted")
    assert ens.aggregator.log_weights.numel() == 3


def test_unknown_name_lists_known_and_close_names():
    with pytest.raises(UnknownComponentError) as err:
        ek.wrap(toy_split(3), "tre", depth=2)
    message = str(err.value)
    assert "Did you mean 'tree'" in message and "independent" in message


def test_unknown_option_lists_accepted_ones():
    with pytest.raises(TypeError, match="does not take dpeth.*depth, branching"):
        ek.wrap(toy_split(3), "tree", dpeth=2)


def test_the_registry_never_imports_the_plugin_layer():
    """The registry is passive: the plugin manager installs its loader (import-linter checks this too)."""
    import ast
    import inspect

    import ensemblekit.core.registry as registry

    tree = ast.parse(inspect.getsource(registry))
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name and name.startswith("ensemblekit.plugins")]


def test_a_registry_without_a_loader_holds_what_was_registered(monkeypatch):
    import ensemblekit.core.registry as registry

    monkeypatch.setattr(registry, "_load", None)
    monkeypatch.setattr(registry, "_describe_skipped", None)
    own = registry.Registry("widget", None)
    own.register("w", dict, plugin="me")
    assert own.names() == ["w"] and own.create("w", size=2) == {"size": 2}
    with pytest.raises(UnknownComponentError, match="unknown widget 'x'. Known widget names: w.$"):
        own.get("x")


def test_list_components_by_kind():
    assert ek.list_components("topology") == TOPOLOGIES.names()
    builtin = {"loop", "loop_nhwc", "vmap", "grouped", "grouped_nhwc", "auto"}
    assert builtin <= set(ek.list_components("execution strategy"))
    assert {"hne", "ensemblenet", "multi_exit", "irene"} <= set(ek.list_components("recipe"))
    with pytest.raises(ValueError, match="unknown kind of component 'topologies'; the kinds are topology, "):
        ek.list_components("topologies")


def test_context_goes_only_to_factories_that_take_it():
    weighted = AGGREGATORS.create("weighted", context={"num_members": 3})
    assert weighted.log_weights.numel() == 3
    given = AGGREGATORS.create({"name": "weighted", "num_members": 2}, context={"num_members": 3})
    assert given.log_weights.numel() == 2  # the spec wins over the context
    AGGREGATORS.create("mean", context={"num_members": 3})  # MeanLogits takes no num_members: not given
    with pytest.raises(TypeError, match="aggregator 'weighted' does not take depth; it takes: weights, learnable$"):
        AGGREGATORS.create("weighted", context={"num_members": 3}, depth=2)


def test_check_raises_what_create_would_without_building():
    TOPOLOGIES.check("tree", depth=2)
    AGGREGATORS.check("weighted", context=("num_members",))  # supplied by the caller: not missing
    with pytest.raises(TypeError, match="topology 'tree': option depth='2' is not of type int"):
        TOPOLOGIES.check({"name": "tree", "depth": "2"})
    with pytest.raises(UnknownComponentError, match="unknown topology 'tre'"):
        TOPOLOGIES.check("tre")


def forwarding(backbone, members: int = 2, **options):
    """A recipe that passes its options on to wrap()."""
    return ek.wrap(backbone, "independent", members=members, **options)


forwarding.passes_kwargs_to = ek.wrap


def test_options_passed_on_to_wrap_are_checked_as_wraps():
    from ensemblekit.core.registry import Registry, accepts

    recipes = Registry("recipe", None)
    recipes.register("forwarding", forwarding, plugin="test")
    assert accepts(forwarding, "execution") and not accepts(forwarding, "topology")
    recipes.check("forwarding", context=("backbone",), members=3, execution="vmap", init="copy")
    with pytest.raises(TypeError, match="needs the option\\(s\\) backbone"):
        recipes.check("forwarding")
    with pytest.raises(TypeError, match="recipe 'forwarding' does not take leaves; it takes: members, aggregator, "):
        recipes.check("forwarding", context=("backbone",), leaves=3)
    with pytest.raises(TypeError, match="option init=3 is not of type str"):
        recipes.check("forwarding", context=("backbone",), init=3)
    ens = recipes.create("forwarding", backbone=toy_split(2), execution="vmap")
    assert ens.num_members == 2 and ens.execution == "vmap"
