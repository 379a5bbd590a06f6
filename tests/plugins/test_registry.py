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
