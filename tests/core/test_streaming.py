"""The streaming engine: what predict() gives each sample, in input order, every step on a full batch."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import ensemblekit as ek
from ensemblekit.core.batching import BatchLayoutError, concat_state, joinable
from ensemblekit.core.streaming import StreamEngine, StreamError
from ensemblekit.core.timing import DeadlineTimer
from ensemblekit.functional import confidence
from tests.conftest import toy_split
from tests.core.test_batching import prototype_split, rope_split

TOPOLOGIES = {
    "tree": {"depth": 2},
    "independent": {"members": 3},
    "cascade": {"members": 3},
    "multi_branch": {"branches": 3},
    "chain": {},
}
AGGREGATORS = ("mean", "mean_probs", "vote", "weighted", "last")
POLICIES = ("fixed", "confidence", "budgeted", "learned", "deadline")
SIZE = 6  # images are SIZE x SIZE

_ensembles: dict[tuple[str, str], ek.Ensemble] = {}


def ensemble(topology: str, aggregator: str) -> ek.Ensemble:
    """One eval-mode ensemble per topology and aggregator, built once (toy blocks of 3 channels)."""
    key = (topology, aggregator)
    if key not in _ensembles:
        torch.manual_seed(len(_ensembles))
        _ensembles[key] = ek.wrap(toy_split(3), topology, aggregator=aggregator, **TOPOLOGIES[topology]).eval()
    return _ensembles[key]


def thresholds_between(conf: Tensor, quantile: float) -> list[float]:
    """Per member, a threshold half-way between two neighbouring distinct confidences near ``quantile``:
    far from every sample's confidence, so batched kernels' rounding cannot move a decision."""
    out = []
    for column in conf.T:
        values = column.unique()  # sorted
        if len(values) == 1:
            out.append(min(float(values[0]) + 0.5, 1.0))  # above every confidence below 1
            continue
        j = min(int(quantile * (len(values) - 1)), len(values) - 2)
        out.append(float(values[j] + values[j + 1]) / 2)
    return out


def make_policy(kind: str, ens: ek.Ensemble, x: Tensor, quantile: float) -> ek.HaltingPolicy:
    m = ens.num_members
    if kind == "fixed":
        return ek.halting.Fixed(1 + int(quantile * m) % m)
    if kind in ("confidence", "budgeted"):
        with torch.no_grad():
            conf = confidence(ens.forward_output(x).prefixes())
        thresholds = thresholds_between(conf, quantile)
        if kind == "confidence":
            return ek.halting.Confidence(thresholds)
        return ek.halting.Budgeted(thresholds=thresholds[:-1] + [-math.inf])
    if kind == "learned":
        policy = ek.halting.Learned(hidden=4, aux_head=True)
        policy.bind(ens)
        policy.mark_trained()
        policy.eval()
        # an untrained selector halts every sample alike: move its first decision between two samples
        first: list[Tensor] = []
        selector = policy._selector

        def spy(logits: Tensor, aux: Tensor | None, state: Any) -> Any:
            out = selector(logits, aux, state)
            if state is None:
                first.append(out[0])
            return out

        policy._selector = spy  # type: ignore[method-assign]
        ens.predict(x, halting=policy)
        del policy._selector
        with torch.no_grad():
            policy.out.bias -= thresholds_between(first[0][:, None], quantile)[0]
        return policy
    return ek.halting.Deadline(3600.0 if quantile >= 0.5 else 0.0)  # never or always stop after member 1


def stream_all(ens: ek.Ensemble, batches: list[Tensor], policy: ek.HaltingPolicy, **options: Any
               ) -> dict[str, Tensor]:
    results = list(ens.stream(batches, halting=policy, **options))
    assert [r.index for r in results] == list(range(len(batches)))
    assert [r.prediction.shape[0] for r in results] == [b.shape[0] for b in batches]
    return {name: torch.cat([getattr(r, name) for r in results])
            for name in ("prediction", "members_used", "flops", "latency")}


@settings(max_examples=100)
@given(topology=st.sampled_from(sorted(TOPOLOGIES)), aggregator=st.sampled_from(AGGREGATORS),
       kind=st.sampled_from(POLICIES), sizes=st.lists(st.integers(1, 7), min_size=1, max_size=5),
       batch_size=st.integers(1, 9), max_wait=st.sampled_from([None, 0, 1, 3]),
       quantile=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_each_sample_gets_what_predict_gives_it(topology, aggregator, kind, sizes, batch_size, max_wait, quantile,
                                                 seed):
    ens = ensemble(topology, aggregator)
    x = torch.randn(sum(sizes), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    policy = make_policy(kind, ens, x, quantile)
    expected = ens.predict(x, halting=policy)
    got = stream_all(ens, list(x.split(sizes)), policy, batch_size=batch_size, max_wait=max_wait)
    assert torch.equal(got["members_used"], expected.members_used)
    torch.testing.assert_close(got["prediction"], expected.prediction, rtol=1e-5, atol=1e-5)
    assert torch.equal(got["flops"], expected.flops)
    assert got["latency"].dtype == torch.float64 and bool((got["latency"] >= 0).all())
    if kind == "deadline":
        assert bool((got["members_used"] == (ens.num_members if quantile >= 0.5 else 1)).all())


def split_by_confidence(ens: ek.Ensemble, n: int, seed: int = 0) -> tuple[Tensor, Tensor, float]:
    """``n`` images whose member-1 confidence is below, ``n`` above a threshold (the threshold)."""
    x = torch.randn(4 * n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        conf = confidence(ens.forward_output(x).prefixes())[:, 0]
    order = conf.argsort()
    values = conf[order]
    threshold = float(values[2 * n - 1] + values[2 * n]) / 2
    return x[order[:n]], x[order[-n:]], threshold


def test_results_come_in_input_order_and_wait_for_the_flush():
    ens = ensemble("chain", "mean")
    going, stopping, threshold = split_by_confidence(ens, 4)
    policy = ek.halting.Confidence([threshold, 0.0, 0.0])
    engine = StreamEngine(ens, policy, batch_size=8)
    assert engine.submit(going) == 0 and engine.ready() == []  # 4 samples wait for member 1, 4 < 8
    assert engine.waiting == [4, 0, 0]
    assert engine.submit(stopping) == 1
    assert engine.ready() == []  # all of batch 1 stopped, but batch 0 is still running
    assert engine.waiting == [0, 4, 0]  # step 0 ran on a full batch of 8; batch 0 waits for member 2
    engine.flush()
    results = engine.ready()
    assert [r.index for r in results] == [0, 1]
    assert results[0].members_used.tolist() == [2] * 4 and results[1].members_used.tolist() == [1] * 4
    assert engine.waiting == [0, 0, 0] and engine.ready() == []


def test_every_step_runs_on_a_full_batch_until_the_flush():
    ens = ensemble("tree", "mean")
    going, stopping, threshold = split_by_confidence(ens, 12, seed=1)
    policy = ek.halting.Confidence([threshold, 1.0, 1.0, 1.0])  # half stop after member 1, the rest use all
    batches = [torch.cat([going[i:i + 3], stopping[i:i + 3]]) for i in range(0, 12, 3)]  # 4 batches of 6
    ens.cost_table(input_size=(3, SIZE, SIZE))  # FLOPs are counted before the hooks go on
    seen: dict[int, list[int]] = {}
    hooks = [node.register_forward_hook(lambda module, args, out, i=i: seen.setdefault(i, []).append(
        args[0].shape[0])) for i, node in enumerate(ens.nodes)]
    try:
        got = stream_all(ens, batches, policy, batch_size=6)
    finally:
        for hook in hooks:
            hook.remove()
    assert got["members_used"].tolist() == ([4] * 3 + [1] * 3) * 4
    root = ens.graph.members[0].path[0]
    assert seen[root] == [6, 6, 6, 6]
    second = ens.graph.new_nodes(1)[-1]  # the leaf member 2 adds
    assert seen[second] == [6, 6]  # 12 samples went on: two full batches, not four halves


def test_max_wait_bounds_the_latency_in_batches():
    ens = ensemble("chain", "mean")
    going, _, threshold = split_by_confidence(ens, 6, seed=2)
    policy = ek.halting.Confidence([threshold, 1.0, 1.0])
    for max_wait in (0, 1, 2):
        engine = StreamEngine(ens, policy, batch_size=64, max_wait=max_wait)
        done: list[int] = []
        for t in range(6):
            engine.submit(going[t:t + 1])
            done += [r.index for r in engine.ready()]
            due = list(range(t - max_wait + 1))  # every batch submitted max_wait batches ago or earlier
            assert done == list(range(len(done))) and done[:len(due)] == due, (max_wait, t, done)
            if t < max_wait:
                assert done == []  # a partial step runs only when a sample is due (it takes later ones along)
        engine.flush()
        assert done + [r.index for r in engine.ready()] == list(range(6))


def test_max_wait_zero_runs_each_batch_through_as_predict_does():
    ens = ensemble("tree", "mean")
    x = torch.randn(10, 3, SIZE, SIZE)
    policy = ek.halting.Confidence(0.2)
    engine = StreamEngine(ens, policy, batch_size=100, max_wait=0)
    for i, batch in enumerate(x.split(5)):
        assert engine.submit(batch) == i
        (result,) = engine.ready()
        assert torch.equal(result.members_used, ens.predict(batch, halting=policy).members_used)


def test_a_single_image_is_a_batch_of_one():
    ens = ensemble("tree", "mean")
    x = torch.randn(3, 3, SIZE, SIZE)
    results = list(ens.stream(iter(x), halting=ek.halting.Fixed(2), batch_size=2))
    assert [r.prediction.shape for r in results] == [(1, ens.num_classes)] * 3
    torch.testing.assert_close(torch.cat([r.prediction for r in results]),
                               ens.predict(x, halting=ek.halting.Fixed(2)).prediction)


@pytest.mark.parametrize("split, size", [(prototype_split, 2), (rope_split, 4)])
def test_tuple_states_with_a_shared_side_input_are_joined(split, size):
    """A per-class parameter passed along, and a table computed from sizes in each batch (equal values)."""
    torch.manual_seed(0)
    ens = ek.wrap(split(), "chain").eval()
    x = torch.randn(9, 3, size, size)
    with torch.no_grad():
        conf = confidence(ens.forward_output(x).prefixes())
    policy = ek.halting.Confidence([float(conf[:, 0].median()), 0.0])
    got = stream_all(ens, list(x.split([4, 1, 4])), policy, batch_size=3)
    expected = ens.predict(x, halting=policy)
    assert 1 < int(expected.members_used.sum()) < 18
    assert torch.equal(got["members_used"], expected.members_used)
    torch.testing.assert_close(got["prediction"], expected.prediction)


def test_a_shared_value_that_differs_between_batches_is_not_joined():
    state = (torch.ones(2, 3), torch.zeros(4))
    other = (torch.ones(1, 3), torch.ones(4))
    with pytest.raises(BatchLayoutError, match=r"\[1\] is shared .* differs between the batches"):
        concat_state([state, other], [2, 1], (True, False), "the state of node 0")
    joined = concat_state([state, (torch.ones(1, 3), torch.zeros(4))], [2, 1], (True, False), "s")
    assert joined[0].shape == (3, 3) and joined[1] is state[1]
    count = {"sum": torch.ones(2, 5), "count": torch.tensor(2.0)}
    assert joinable([count, {"sum": torch.zeros(3, 5), "count": torch.tensor(2.0)}], None)
    assert not joinable([count, {"sum": torch.zeros(3, 5), "count": torch.tensor(1.0)}], None)
    timers = [{"timer": DeadlineTimer(1.0, "cpu")} for _ in range(2)]
    assert not joinable(timers, None) and joinable([timers[0], timers[0]], None)


def test_deadline_state_of_each_step_batch_stays_its_own():
    """Deadline keeps one timer per batch it decides for: batches that met at step 0 share one, others not."""
    ens = ensemble("chain", "mean")
    policy = ek.halting.Deadline(3600.0)
    timers: list[list[int]] = []
    original = policy.step

    def step(step: Any, state: Any) -> Any:
        stop, new = original(step, state)
        timers.append([step.index, id(new["timer"]), step.prediction.shape[0]])
        return stop, new

    policy.step = step  # type: ignore[method-assign]
    x = torch.randn(12, 3, SIZE, SIZE)
    got = stream_all(ens, list(x.split(4)), policy, batch_size=6)
    assert got["members_used"].tolist() == [3] * 12
    # step 0 runs on 6 + 6 samples: two timers; each later step batch holds samples of both, decided apart
    first = {t[1] for t in timers if t[0] == 0}
    assert len(first) == 2
    for index in (1, 2):
        assert sorted(t[2] for t in timers if t[0] == index) == [6, 6]
        assert {t[1] for t in timers if t[0] == index} == first


def test_train_mode_is_refused_and_a_policy_given_apart_runs_in_eval_mode():
    ens = ensemble("tree", "mean")
    ens.train()
    try:
        with pytest.raises(StreamError, match="eval mode only.*call ens.eval"):
            ens.stream([torch.randn(2, 3, SIZE, SIZE)], halting=ek.halting.Fixed(1))
    finally:
        ens.eval()
    policy = ek.halting.Fixed(2)
    assert policy.training  # a new module is in training mode
    modes: list[bool] = []
    original = policy.step
    policy.step = lambda step, state: (modes.append(policy.training), original(step, state))[1]  # type: ignore
    list(ens.stream([torch.randn(2, 3, SIZE, SIZE)], halting=policy))
    assert modes == [False, False] and policy.training


def test_batches_unlike_the_first_are_refused():
    ens = ensemble("tree", "mean")
    engine = StreamEngine(ens, ek.halting.Fixed(1))
    engine.submit(torch.randn(2, 3, SIZE, SIZE))
    with pytest.raises(StreamError, match="like the first"):
        engine.submit(torch.randn(2, 3, SIZE + 2, SIZE))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        StreamEngine(ens, ek.halting.Fixed(1), batch_size=0)
    with pytest.raises(ValueError, match="max_wait must be an integer >= 0"):
        StreamEngine(ens, ek.halting.Fixed(1), max_wait=-1)
    with pytest.raises(ValueError, match="needs a halting policy"):
        StreamEngine(ens)


@pytest.mark.parametrize("isc", [None, "concat"])
def test_multi_exit_heads_that_read_the_previous_exit(isc):
    from ensemblekit.methods.imta.recipe import multi_exit

    torch.manual_seed(0)
    ens = multi_exit(toy_split(4), isc=isc).eval()
    x = torch.randn(13, 3, SIZE, SIZE)
    with torch.no_grad():
        conf = confidence(ens.forward_output(x).prefixes())
    policy = ek.halting.Confidence(thresholds_between(conf, 0.5))
    expected = ens.predict(x, halting=policy)
    assert len(expected.members_used.unique()) > 1
    got = stream_all(ens, list(x.split([5, 3, 5])), policy, batch_size=4)
    assert torch.equal(got["members_used"], expected.members_used)
    torch.testing.assert_close(got["prediction"], expected.prediction)


def test_a_timm_backbone():
    from ensemblekit.backbones import create_backbone

    torch.manual_seed(0)
    model = create_backbone("resnet10t", num_classes=5, channels=(8, 8, 8, 8), stem_width=8)
    ens = ek.wrap(model, "tree", depth=2).eval()
    x = torch.randn(11, 3, 16, 16)
    with torch.no_grad():
        conf = confidence(ens.forward_output(x).prefixes())
    policy = ek.halting.Confidence(thresholds_between(conf, 0.5))
    expected = ens.predict(x, halting=policy)
    got = stream_all(ens, list(x.split([4, 4, 3])), policy, batch_size=3)
    assert len(expected.members_used.unique()) > 1
    assert torch.equal(got["members_used"], expected.members_used)
    torch.testing.assert_close(got["prediction"], expected.prediction)
