"""The Ensemble module on hand-built block splits: equivalence, costs, state."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ensemblekit as ek
from ensemblekit.components.topologies import Cascade, Chain, Independent, MultiBranch, Tree
from ensemblekit.core.blocks import call_block
from tests.conftest import toy_split


def small_topologies():
    """Topologies small enough to instantiate modules for (<= ~40 nodes)."""
    tree = st.builds(lambda d, k: (Tree(d, k), d + 1), st.integers(0, 3), st.integers(2, 3)).filter(
        lambda t: t[0].branching ** t[0].depth <= 27)
    indep = st.builds(lambda n, b: (Independent(n), b), st.integers(1, 4), st.integers(1, 4))
    cascade = st.builds(lambda n, b: (Cascade(n), b), st.integers(1, 3), st.integers(1, 3))
    multi = st.builds(lambda n, b: (MultiBranch(n, fork=-1), b), st.integers(1, 4), st.integers(2, 4))
    chain = st.builds(lambda b: (Chain(), b), st.integers(1, 4))
    return st.one_of(tree, indep, cascade, multi, chain)


def member_alone(ens, x, m):
    """Member ``m`` computed from its own blocks only, no cache, no sharing."""
    state = x
    for node in ens.graph.members[m].path:
        state = call_block(ens.nodes[node], state)
    return call_block(ens.heads[m], state)


@given(small_topologies(), st.booleans())
def test_shared_path_equals_member_alone(topo_blocks, training):
    topo, blocks = topo_blocks
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(blocks), topo)
    ens.train(training)
    x = torch.randn(3, 3, 8, 8)
    members = ens.forward_members(x)
    assert members.shape == (3, ens.num_members, 5)
    for m in range(ens.num_members):
        assert torch.equal(members[:, m], member_alone(ens, x, m))


@given(small_topologies())
def test_no_parameter_is_shared_and_copies_differ(topo_blocks):
    topo, blocks = topo_blocks
    ens = ek.wrap(toy_split(blocks), topo)
    pointers = [p.data_ptr() for p in ens.parameters()]
    assert len(pointers) == len(set(pointers))
    by_block: dict[int, list] = {}
    for node in ens.graph.nodes:
        by_block.setdefault(node.block, []).append(ens.nodes[node.index][0].weight)
    for weights in by_block.values():  # every copy of a block is its own random draw
        for i in range(len(weights)):
            for j in range(i + 1, len(weights)):
                assert not torch.equal(weights[i], weights[j])


@given(st.integers(0, 3), st.integers(2, 3))
def test_tree_cost_counts_each_node_once(depth, k):
    ens = ek.wrap(toy_split(depth + 1), Tree(depth, k))
    costs = ens.costs()
    block = costs.node_flops[0]
    assert block > 0 and len(set(costs.node_flops)) == 1  # equal-cost blocks
    table = ens.cost_table()
    nodes_full = (k ** (depth + 1) - 1) // (k - 1)
    assert table[-1].flops == nodes_full * block + sum(costs.head_flops)
    for row in table:  # prefix of n members = its distinct nodes + n heads
        n_nodes = len(ens.graph.prefix_nodes(row.members))
        assert row.flops == n_nodes * block + row.members * costs.head_flops[0]
    assert [r.flops for r in table] == sorted(r.flops for r in table)
    assert table[-1].params == sum(p.numel() for p in ens.nodes.parameters()) + sum(
        p.numel() for p in ens.heads.parameters())


def test_first_member_is_the_backbone():
    torch.manual_seed(0)
    split = toy_split(3)
    x = torch.randn(2, 3, 8, 8)
    split_eval = [b.eval() for b in split.blocks]
    reference = split.forward(x)
    ens = ek.wrap(split, "tree", depth=2).eval()
    assert torch.equal(ens.forward_members(x)[:, 0], reference)
    assert split_eval  # the user's modules are left untouched: copies were made
    copied = ek.wrap(split, "tree", depth=2, init="copy").eval()
    assert all(torch.equal(copied.forward_members(x)[:, m], reference) for m in range(4))


def test_state_dict_round_trip():
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(3), "tree", depth=2)
    buffer = io.BytesIO()
    torch.save(ens.state_dict(), buffer)
    other = ek.wrap(toy_split(3), "tree", depth=2)
    other.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(ens.eval()(x), other.eval()(x))


def test_forward_aggregates_members_and_backward_reaches_every_node():
    ens = ek.wrap(toy_split(3), "tree", depth=2)
    x = torch.randn(4, 3, 8, 8)
    out = ens.forward_output(x)
    assert torch.allclose(ens(x), out.members.mean(1), atol=1e-6)
    ens.loss(out, torch.tensor([0, 1, 2, 3])).total.backward()
    assert all(p.grad is not None for p in ens.parameters())


@pytest.mark.parametrize("topology", ["tree", "independent", "multi_branch", "chain", "cascade"])
def test_predict_with_compaction_matches_full_evaluation(topology):
    torch.manual_seed(0)
    opts = {"depth": 2} if topology == "tree" else {}
    ens = ek.wrap(toy_split(3), topology, **opts).eval()
    x = torch.randn(6, 3, 8, 8)
    prefixes = ens.forward_output(x).prefixes()

    class StopOnSample(ek.halting.Fixed):  # per-sample: sample i stops after member i % M
        def step(self, step, state):
            idx = state["idx"] if state else torch.arange(step.prediction.shape[0])
            return idx % ens.num_members <= step.index, {"idx": idx}

    result = ens.predict(x, halting=StopOnSample())
    expected_used = torch.arange(6) % ens.num_members + 1
    assert torch.equal(result.members_used, expected_used)
    expected = prefixes[torch.arange(6), expected_used - 1]
    assert torch.allclose(result.prediction, expected, atol=1e-6)
    costs = [row.flops for row in ens.cost_table()]
    assert result.flops.tolist() == [costs[u - 1] for u in expected_used.tolist()]


@pytest.mark.parametrize(("topology", "options"), [("tree", {"depth": 2}), ("chain", {}), ("multi_branch", {})])
def test_a_forward_pass_runs_every_node_once_and_releases_inner_states(topology, options):
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(3), topology, **options).eval()
    x = torch.randn(2, 3, 8, 8)
    calls = []
    for node in ens.nodes:
        node.register_forward_hook(lambda *a: calls.append(1))
    cache = ek.NodeCache(x)
    exits = {m.exit_node for m in ens.graph.members}
    ens.compute_nodes(cache, range(ens.graph.num_nodes), keep=exits)
    assert set(cache.states) == exits  # inner states were dropped once read
    ens.forward_members(x)
    assert len(calls) == 2 * ens.graph.num_nodes  # no node computed twice, dropped states included


def test_anytime_reuses_nodes_and_matches_prefixes():
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(3), "tree", depth=2).eval()
    x = torch.randn(2, 3, 8, 8)
    ens.cost_table()  # measured once, up front
    calls = []
    for node in ens.nodes:
        node.register_forward_hook(lambda *a: calls.append(1))
    steps = list(ens.anytime(x))
    assert len(calls) == ens.graph.num_nodes  # every node exactly once
    prefixes = ens.forward_output(x).prefixes()
    for step in steps:
        assert torch.allclose(step.prediction, prefixes[:, step.members - 1], atol=1e-6)
    assert [s.members for s in ens.anytime(x, max_members=2)] == [1, 2]
    budget = ens.cost_table()[1].flops
    assert [s.members for s in ens.anytime(x, max_flops=budget)] == [1, 2]
    assert [s.members for s in ens.anytime(x, deadline=0.0)] == [1]


def test_clear_errors_for_bad_input():
    ens = ek.wrap(toy_split(2), "tree", depth=1)
    with pytest.raises(ValueError, match="4 dimensions"):
        ens(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        ens(torch.randn(1, 1, 8, 8))
    with pytest.raises(TypeError, match="floating"):
        ens(torch.zeros(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        ens(torch.randn(0, 3, 8, 8))
    out = ens.forward_output(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="labels must be in 0..4"):
        ens.loss(out, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="needs 3 blocks"):
        ek.wrap(toy_split(2), "tree", depth=2)


def test_num_classes_replaces_the_classifier():
    ens = ek.wrap(toy_split(2), "independent", members=2, num_classes=7)
    assert ens(torch.randn(2, 3, 8, 8)).shape == (2, 7)


def test_torch_compile_runs():
    ens = ek.wrap(toy_split(2), "tree", depth=1).eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(ens, backend="eager")
    assert torch.allclose(compiled(x), ens(x))


class TokenBlock(torch.nn.Module):
    """A block holding raw parameters, like a ViT stem (position embedding, layer scale)."""

    def __init__(self):
        super().__init__()
        self.pos_embed = torch.nn.Parameter(torch.randn(1, 3, 1, 1) * 0.02)
        self.gamma = torch.nn.Parameter(torch.full((1, 3, 1, 1), 1e-5))

    def forward(self, x):
        return (x + self.pos_embed) * self.gamma


def test_copies_redraw_raw_random_parameters_and_keep_constant_ones():
    split = toy_split(2)
    split.blocks[0] = TokenBlock()
    ens = ek.wrap(split, "independent", members=2)
    first, second = (ens.nodes[m.path[0]] for m in ens.graph.members)
    assert not torch.equal(first.pos_embed, second.pos_embed)
    assert torch.equal(first.gamma, second.gamma)
