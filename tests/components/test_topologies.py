"""Invariants of the node graphs of every topology (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensemblekit.components.topologies import Cascade, Chain, Independent, MultiBranch, Tree

depths = st.integers(0, 5)
branchings = st.integers(2, 4)


@given(depths, branchings)
def test_tree_counts(depth, k):
    g = Tree(depth, k).build(depth + 1)
    assert g.num_members == k**depth
    assert [len(level) for level in g.levels] == [k**b for b in range(depth + 1)]
    assert g.num_nodes == (k ** (depth + 1) - 1) // (k - 1)
    assert g.nested_sizes == tuple(k**b for b in range(depth + 1))


@given(depths, branchings)
def test_tree_prefixes_are_nested_subtrees(depth, k):
    g = Tree(depth, k).build(depth + 1)
    for b in range(depth + 1):
        size = k**b
        prefix = g.members[:size]
        # one subtree: all members share the node at block depth - b, and no
        # other member does
        root = prefix[0].path[depth - b]
        assert all(m.path[depth - b] == root for m in prefix)
        assert all(m.path[depth - b] != root for m in g.members[size:])
    for n in range(1, g.num_members):
        assert set(g.prefix_nodes(n)) <= set(g.prefix_nodes(n + 1))


@given(depths, branchings)
def test_new_nodes_partition_the_tree(depth, k):
    g = Tree(depth, k).build(depth + 1)
    added = [i for m in range(g.num_members) for i in g.new_nodes(m)]
    assert sorted(added) == list(range(g.num_nodes))  # every node exactly once
    # depth-first: the k-th member adds the nodes below its branch point only
    for m in range(1, g.num_members):
        shared = next(b for b in range(depth + 1) if g.members[m].path[b] != g.members[m - 1].path[b])
        assert len(g.new_nodes(m)) == depth + 1 - shared


@given(st.integers(1, 6), st.integers(1, 6))
def test_independent_and_cascade_share_nothing(n, blocks):
    for topo in (Independent(n), Cascade(n)):
        g = topo.build(blocks)
        paths = [set(m.path) for m in g.members]
        assert g.num_nodes == n * blocks
        assert all(not (a & b) for i, a in enumerate(paths) for b in paths[i + 1:])
        assert g.nested_sizes == tuple(range(1, n + 1))
    assert Cascade(n).sequential and not Independent(n).sequential


@given(st.integers(1, 5), st.integers(2, 6), st.data())
def test_multi_branch_shares_the_trunk(n, blocks, data):
    fork = data.draw(st.integers(1, blocks - 1))
    g = MultiBranch(n, fork=fork).build(blocks)
    assert g.num_nodes == fork + n * (blocks - fork)
    trunks = {m.path[:fork] for m in g.members}
    assert len(trunks) == 1
    assert g.nested_sizes == ((1, n) if n > 1 else (1,))


@given(st.integers(1, 7), st.data())
def test_chain_exits(blocks, data):
    exits = sorted(data.draw(st.sets(st.integers(0, blocks - 1), min_size=1)))
    g = Chain(exits).build(blocks)
    assert g.num_nodes == blocks
    assert [len(m.path) - 1 for m in g.members] == exits
    assert g.nested_sizes == tuple(range(1, len(exits) + 1))


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="branching"):
        Tree(2, 1)
    with pytest.raises(ValueError, match="fork"):
        MultiBranch(2, fork=5).build(3)
    with pytest.raises(ValueError, match="exits"):
        Chain([2, 1]).build(3)
    with pytest.raises(ValueError, match="needs 3 blocks"):
        Tree(2).build(4)
