"""Anytime inference and the deadline policy: node reuse, limits, deadlines, grad mode."""

from __future__ import annotations

import pytest
import torch

import ensemblekit as ek
from ensemblekit.core.anytime import overruns
from ensemblekit.core.timing import Clock, DeadlineTimer, Stopwatch, synchronize, timed
from tests.conftest import toy_split

NODE = 1.0
"""Seconds one node takes on the fake clock."""


@pytest.fixture
def clock(monkeypatch):
    """A fake clock for ensemblekit.core.timing (anytime, the Deadline policy, predict).

    It moves only when a slow node runs or the test waits.
    """
    now = [0.0]
    monkeypatch.setattr("ensemblekit.core.timing.perf_counter", lambda: now[0])
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


# ------------------------------------------------ one deadline rule for anytime and the Deadline policy
class SlowDeadline(ek.halting.Deadline):
    """The Deadline policy, spending ``overhead`` seconds of the fake clock before each decision.

    From the second member on: the policy reads predict's clock at its first
    step, so time spent before then is predict's own, not the policy's.
    """

    def __init__(self, seconds, now, overhead):
        super().__init__(seconds)
        self.now, self.overhead = now, overhead

    def step(self, step, state):
        if step.index > 0:
            self.now[0] += self.overhead
        return super().step(step, state)


@pytest.mark.parametrize("topology,options", [("independent", {"members": 4}), ("tree", {"depth": 2}),
                                              ("cascade", {"members": 4})])
@pytest.mark.parametrize("overhead", [0.0, 0.5 * NODE, 2 * NODE])
def test_anytime_and_the_deadline_policy_take_the_same_decisions(clock, topology, options, overhead):
    """Same deadline, same node times, same time between members: the same number of members.

    Time between members (the caller's code in anytime, the policy's own step
    in predict) counts in the elapsed time but not in the time per FLOP.
    """
    ens = build(topology, **options)
    slow_nodes(ens, clock)
    x = torch.randn(3, 3, 8, 8)
    for deadline in [0.0, 2.5, 3.0, 4.5, 5.5, 6.0, 7.5, 8.5, 9.0, 11.0, 12.5, 20.0]:
        clock[0] = 0.0
        members = 0
        for step in ens.anytime(x, deadline=deadline * NODE):
            members = step.members
            if step.members > 1:
                clock[0] += overhead  # what happens between members (from the second on, as SlowDeadline)
        clock[0] = 0.0
        used = ens.predict(x, halting=SlowDeadline(deadline * NODE, clock, overhead)).members_used
        assert used.tolist() == [members] * 3, (deadline, members, used.tolist())


def test_the_rate_counts_compute_only_in_the_deadline_policy(clock):
    """4 members of 3 nodes, 3 s of the policy's own before deciding after member 2: the rate stays 1 s per node.

    Member 2 is ready at 6, the decision made at 9; member 3 would end at
    9 + 3 = 12. A rate from the elapsed time (9 s for 6 nodes) would predict
    13.5 and stop after member 2 under a 12 s deadline.
    """
    ens = build("independent", members=4)
    slow_nodes(ens, clock)
    x = torch.randn(2, 3, 8, 8)
    assert ens.predict(x, halting=SlowDeadline(12 * NODE, clock, 3 * NODE)).members_used.tolist() == [3, 3]
    clock[0] = 0.0
    assert ens.predict(x, halting=SlowDeadline(11.9 * NODE, clock, 3 * NODE)).members_used.tolist() == [2, 2]


def test_deadline_timer_applies_overruns():
    timer = DeadlineTimer(1.0, "cpu")
    assert timer.compute == 0.0 and timer.begun == 0.0
    timer.end(0.5)  # the first member: begun at 0, ready at 0.5
    assert timer.compute == 0.5
    assert not timer.overruns(0.5, flops_done=10, flops_next=10)
    assert timer.overruns(0.5, flops_done=10, flops_next=11)
    assert overruns(1.0, 0.5, 0.5, 10, 11)
    assert not DeadlineTimer(None, "cpu").overruns(100.0, 1, 10**9)  # no deadline: only timing


def test_clock_stopwatch_and_timed(clock):
    c = Clock("cpu")
    clock[0] += 2.0
    assert c() == 2.0
    assert Clock("cpu", elapsed=3.0)() == 3.0  # continues another clock's reading
    with Stopwatch("cpu") as watch:
        clock[0] += 1.5
    assert watch.seconds == 1.5

    def work():
        clock[0] += 0.25
        return "done"

    assert timed(work, torch.device("cpu")) == ("done", 0.25)
    synchronize("cpu")  # nothing queued on a CPU: returns at once


def test_synchronize_waits_for_the_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("mps", None)))
    synchronize(torch.device("cuda", 1))
    synchronize("mps")
    synchronize("cpu")
    assert calls == [("cuda", torch.device("cuda", 1)), ("mps", None)]


def test_the_old_import_paths_of_the_clock_still_work():
    from ensemblekit.core import anytime, timing

    assert anytime.Clock is timing.Clock and anytime.overruns is timing.overruns


def record_levels(ens) -> list[list[int]]:
    """The nodes of every executor call (one call per level)."""
    calls: list[list[int]] = []
    run = ens.executor.run

    def spy(modules, inputs):
        calls.append([next(i for i, n in enumerate(ens.nodes) if n is m) for m in modules])
        return run(modules, inputs)

    ens.executor.run = spy
    return calls


@pytest.mark.parametrize("topology,options", [("tree", {"depth": 2}), ("multi_branch", {"branches": 3}),
                                              ("independent", {"members": 3}), ("chain", {})])
def test_nested_granularity_yields_every_prefix_as_the_member_one(topology, options):
    ens = build(topology, **options)
    x = torch.randn(3, 3, 8, 8)
    by_member = list(ens.anytime(x))
    nested = list(ens.anytime(x, granularity="nested"))
    assert [s.members for s in nested] == [s.members for s in by_member] == list(range(1, ens.num_members + 1))
    for a, b in zip(nested, by_member):
        assert a.flops == b.flops
        torch.testing.assert_close(a.prediction, b.prediction)
        torch.testing.assert_close(a.member_logits, b.member_logits)


def test_nested_granularity_runs_each_level_of_a_sub_ensemble_in_one_call():
    ens = build("tree", depth=2, branching=2)  # members 0 | 1 | 2 3: nested sizes 1, 2, 4
    x = torch.randn(2, 3, 8, 8)
    calls = record_levels(ens)
    steps = ens.anytime(x, granularity="nested")
    next(steps)
    assert calls == [[0], [1], [3]]  # member 1's own path
    calls.clear()
    next(steps)
    assert calls == [[4]]
    calls.clear()
    next(steps)
    assert calls == [[2], [5, 6]]  # the second subtree: its level-1 node, then both leaves in one call
    calls.clear()
    assert next(steps).members == 4 and calls == []  # computed with member 3: only its head runs
    ens4 = build("tree", depth=2, branching=3)  # nested sizes 1, 3, 9
    calls = record_levels(ens4)
    assert [s.members for s in ens4.anytime(x, granularity="nested")] == list(range(1, 10))
    # member 1's path; members 2-3's leaves; members 4-9: two level-1 nodes, then six leaves (per member: 13 calls)
    assert [len(c) for c in calls] == [1, 1, 1, 2, 2, 6]


def test_nested_granularity_cuts_a_sub_ensemble_at_the_limits(clock):
    ens = build("tree", depth=2)
    x = torch.randn(2, 3, 8, 8)
    calls = record_levels(ens)
    assert [s.members for s in ens.anytime(x, granularity="nested", max_members=3)] == [1, 2, 3]
    assert calls[-2:] == [[2], [5]]  # member 4's leaf was never computed
    costs = ens.cost_table()
    assert [s.members for s in ens.anytime(x, granularity="nested", max_flops=costs[2].flops)] == [1, 2, 3]
    slow_nodes(ens, clock)  # member 1: 3 nodes, member 2 adds 1, members 3-4 add 3
    steps = list(ens.anytime(x, granularity="nested", deadline=6.5 * NODE))
    assert [s.members for s in steps] == [1, 2, 3]  # members 3 and 4 would end at 7: cut to member 3 (6)
    assert steps[-1].seconds == 6 * NODE
    clock[0] = 0.0
    members = []
    for step in ens.anytime(x, granularity="nested", deadline=7 * NODE):
        members.append(step.members)
        if step.members == 3:
            clock[0] += 5 * NODE  # the caller takes past the deadline: member 4's head does not run
    assert members == [1, 2, 3]
    with pytest.raises(ValueError, match="granularity must be one of 'member', 'nested'"):
        ens.anytime(x, granularity="level")
