"""Anytime inference and the deadline policy: node reuse, limits, deadlines, grad mode."""

from __future__ import annotations

import pytest
import torch

import ensemblekit as ek
from ensemblekit.core.anytime import overruns
from tests.conftest import toy_split

NODE = 1.0
"""Seconds one node takes on the fake clock."""


@pytest.fixture
def clock(monkeypatch):
    """A fake clock for ensemblekit.core.anytime: it moves only when a slow node runs or the test waits."""
    now = [0.0]
    monkeypatch.setattr("ensemblekit.core.anytime.perf_counter", lambda: now[0])
    return now


def build(topology: str, **options):
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(3), topology, **options).eval()
    ens.cost_table()  # measured once, before any hook below
    return ens


def count_nodes(ens) -> list[int]:
    """Record the index of every node evaluation."""
    calls: list[int] = []
    for i, node in enumerate(ens.nodes):
        node.register_forward_hook(lambda *a, i=i: calls.append(i))
    return calls


def slow_nodes(ens, now: list[float]) -> None:
    """Every node evaluation takes NODE seconds on the fake clock."""
    def tick(*args):
        now[0] += NODE
    for node in ens.nodes:
        node.register_forward_hook(tick)


@pytest.mark.parametrize("topology,options", [("tree", {"depth": 2}), ("multi_branch", {"branches": 3}),
                                              ("cascade", {"members": 3}), ("chain", {})])
def test_each_step_computes_only_the_new_nodes(topology, options):
    ens = build(topology, **options)
    x = torch.randn(2, 3, 8, 8)
    calls = count_nodes(ens)
    prefixes = ens.forward_output(x).prefixes()
    calls.clear()
    costs = ens.cost_table()
    for k, step in enumerate(ens.anytime(x)):
        assert sorted(calls) == ens.graph.new_nodes(k)  # the first step is the first member's own path
        calls.clear()
        assert step.members == k + 1 and step.flops == costs[k].flops
        assert torch.allclose(step.prediction, prefixes[:, k], atol=1e-6)
        assert torch.equal(step.member_logits, ens.forward_output(x).members[:, k])
        calls.clear()


def test_limits_and_early_stop_by_the_caller():
    ens = build("tree", depth=2)
    x = torch.randn(2, 3, 8, 8)
    calls = count_nodes(ens)
    assert [s.members for s in ens.anytime(x, max_members=2)] == [1, 2]
    assert [s.members for s in ens.anytime(x, max_flops=ens.cost_table()[2].flops)] == [1, 2, 3]
    assert [s.members for s in ens.anytime(x, max_flops=0)] == [1]  # the first member always runs
    calls.clear()
    for step in ens.anytime(x):
        break
    assert sorted(calls) == ens.graph.new_nodes(0)  # nothing computed beyond what was asked
    for bad in ({"deadline": -1.0}, {"max_flops": -1}, {"max_members": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ens.anytime(x, **bad)


def test_grad_mode_is_left_alone_between_steps():
    ens = build("tree", depth=2)
    x = torch.randn(2, 3, 8, 8)
    iterator = ens.anytime(x)
    step = next(iterator)
    assert torch.is_grad_enabled() and not step.prediction.requires_grad
    iterator.close()
    assert torch.is_grad_enabled()


def test_deadline_does_not_start_a_member_predicted_to_overrun(clock):
    ens = build("independent", members=4)  # each member: 3 nodes
    slow_nodes(ens, clock)
    x = torch.randn(2, 3, 8, 8)
    steps = list(ens.anytime(x, deadline=8.5 * NODE))
    assert [s.members for s in steps] == [1, 2]  # member 3 would end at 9 > 8.5
    assert [s.seconds for s in steps] == [3 * NODE, 6 * NODE]
    assert [s.members for s in ens.anytime(x, deadline=9 * NODE)] == [1, 2, 3]
    assert [s.members for s in ens.anytime(x, deadline=0.0)] == [1]  # the first member always runs


def test_deadline_prediction_uses_the_flops_a_member_adds(clock):
    ens = build("tree", depth=2)  # member 1: 3 nodes, member 2 adds 1, member 3 adds 2, member 4 adds 1
    slow_nodes(ens, clock)
    x = torch.randn(2, 3, 8, 8)
    steps = list(ens.anytime(x, deadline=5.5 * NODE))
    assert [s.members for s in steps] == [1, 2]  # a per-member estimate (3 nodes) would stop after member 1
    assert steps[-1].seconds == 4 * NODE


def test_deadline_counts_the_callers_time(clock):
    ens = build("independent", members=4)
    slow_nodes(ens, clock)
    x = torch.randn(2, 3, 8, 8)
    members = []
    for step in ens.anytime(x, deadline=8 * NODE):
        members.append(step.members)
        clock[0] += 3 * NODE  # the caller's own work between steps
    assert members == [1]


def test_deadline_with_the_real_clock():
    ens = build("tree", depth=2)
    x = torch.randn(2, 3, 8, 8)
    assert [s.members for s in ens.anytime(x, deadline=0.0)] == [1]
    steps = list(ens.anytime(x, deadline=60.0))
    assert [s.members for s in steps] == [1, 2, 3, 4]
    assert 0 < steps[0].seconds <= steps[-1].seconds < 60


def test_overruns():
    assert overruns(1.0, 1.0, 0.5, 10, 1)
    assert not overruns(1.0, 0.5, 0.5, 10, 10)  # 0.5 + 0.05 * 10 = 1.0 fits
    assert overruns(1.0, 0.5, 0.5, 10, 11)
    assert not overruns(1.0, 0.5, 0.5, 0, 10**9)  # no FLOPs counted: no prediction


def test_deadline_policy_stops_the_whole_batch(clock):
    ens = build("independent", members=4)
    slow_nodes(ens, clock)
    x = torch.randn(5, 3, 8, 8)
    result = ens.predict(x, halting=ek.halting.Deadline(8.5 * NODE))
    assert result.members_used.tolist() == [2] * 5
    prefixes = ens.forward_output(x).prefixes()
    assert torch.allclose(result.prediction, prefixes[:, 1], atol=1e-6)
    assert ens.predict(x, halting=ek.halting.Deadline(60.0)).members_used.tolist() == [4] * 5


def test_deadline_policy_by_name():
    ens = ek.wrap(toy_split(3), "tree", depth=2, halting={"name": "deadline", "seconds": 60.0}).eval()
    assert ens.predict(torch.randn(2, 3, 8, 8)).members_used.tolist() == [4, 4]
    with pytest.raises(ValueError, match="seconds"):
        ek.halting.Deadline(-1)
