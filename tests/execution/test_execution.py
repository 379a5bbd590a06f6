"""Execution strategies: every one computes what the loop computes."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import ensemblekit as ek
from ensemblekit.core.blocks import BlockSplit
from ensemblekit.core.registry import UnknownComponentError
from ensemblekit.execution import AutoExecutor, LoopExecutor
from tests.conftest import toy_split

STRATEGIES = sorted(set(ek.list_components("execution strategy")) - {"loop"})
TOPOLOGIES = [("tree", {"depth": 2}), ("independent", {"members": 3})]


def with_executor(ens: ek.Ensemble, name: str) -> ek.Ensemble:
    """A deep copy of ``ens`` that runs its levels with the strategy ``name``."""
    other = copy.deepcopy(ens)
    other.execution = AutoExecutor(rounds=1) if name == "auto" else name  # one timing round: fast tests
    return other


def train_step(ens: ek.Ensemble, x: torch.Tensor, y: torch.Tensor):
    """Member logits, parameter gradients and buffers after one forward and backward."""
    out = ens.forward_output(x)
    ens.loss(out, y).total.backward()
    grads = {k: p.grad for k, p in ens.named_parameters()}
    return out.members.detach(), grads, dict(ens.named_buffers())


def assert_same(reference, other, atol=1e-5, rtol=1e-4):
    members, grads, buffers = reference
    assert torch.allclose(other[0], members, atol=atol, rtol=rtol)
    assert grads.keys() == other[1].keys()
    for k in grads:
        assert torch.allclose(other[1][k], grads[k], atol=atol, rtol=rtol), k
    for k in buffers:
        assert torch.allclose(other[2][k].double(), buffers[k].double(), atol=atol, rtol=rtol), k


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("topology", TOPOLOGIES, ids=[t for t, _ in TOPOLOGIES])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_match_the_loop(strategy, topology, training):
    torch.manual_seed(0)
    name, options = topology
    ens = ek.wrap(toy_split(3, channels=4), name, **options).train(training)
    x, y = torch.randn(5, 4, 8, 8), torch.randint(0, 5, (5,))
    reference = train_step(copy.deepcopy(ens), x, y)
    assert_same(reference, train_step(with_executor(ens, strategy), x, y))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("strategy", ["vmap", "grouped", "auto"])
def test_strategies_match_the_loop_on_a_timm_backbone(strategy, training):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5, channels=(8, 8, 16, 16), stem_width=8)
    ens = ek.wrap(model, "tree", depth=2).double().train(training)  # float64: BN on tiny batches amplifies rounding
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.randint(0, 5, (3,))
    reference = train_step(copy.deepcopy(ens), x, y)
    assert_same(reference, train_step(with_executor(ens, strategy), x, y), atol=1e-9, rtol=1e-7)


def test_running_statistics_land_in_each_node_and_state_dict():
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(2), "tree", depth=1).train()
    x = torch.randn(4, 3, 8, 8)
    loop = copy.deepcopy(ens)
    loop(x)
    for strategy in ("vmap", "grouped"):
        other = with_executor(ens, strategy)
        other(x)
        other(x[:2])  # a second call counts a second batch
        loop_twice = copy.deepcopy(loop)
        loop_twice(x[:2])
        for (k, a), b in zip(other.state_dict().items(), loop_twice.state_dict().values()):
            assert torch.allclose(a.double(), b.double(), atol=1e-6), (strategy, k)
        assert int(other.nodes[2][1].num_batches_tracked) == 2


class SizedBlock(nn.Module):
    """Takes and returns a tuple state carrying a Python size next to the tensor."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x, size):
        assert x.shape[-2:] == size
        return torch.relu(self.norm(self.conv(x))), size


class Entry(nn.Module):
    def forward(self, x):
        return x, tuple(x.shape[-2:])


class Head(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 5):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x, size):
        return self.fc(x.mean((2, 3)))


def tuple_split() -> BlockSplit:
    return BlockSplit(blocks=[Stem(), SizedBlock(), SizedBlock()], head=Head(), num_classes=5, feature_index=[0, 0, 0],
                      feature_format=["NCHW"] * 3, in_chans=3, example_size=(8, 8))


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.entry = Entry()
        self.block = SizedBlock()

    def forward(self, x):
        return self.block(*self.entry(x))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_vmap_and_auto_take_tuple_states_with_python_values(training):
    torch.manual_seed(0)
    ens = ek.wrap(tuple_split(), "tree", depth=2).train(training)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    reference = train_step(copy.deepcopy(ens), x, y)
    for strategy in ("vmap", "auto"):
        assert_same(reference, train_step(with_executor(ens, strategy), x, y))
    with pytest.raises(ValueError, match="'grouped' cannot run these nodes"):
        with_executor(ens, "grouped")(x)


def test_grouped_refuses_blocks_that_mix_channels():
    block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Flatten(), nn.Unflatten(1, (3, 8, 8)))
    split = BlockSplit(blocks=[block], head=nn.Sequential(nn.Flatten(), nn.Linear(192, 5)), num_classes=5,
                       feature_index=[None], feature_format=["NCHW"], in_chans=3, example_size=(8, 8))
    ens = ek.wrap(split, "independent", members=2)
    with pytest.raises(ValueError, match="Flatten is not a conv/BN/element-wise layer"):
        with_executor(ens, "grouped")(torch.randn(2, 3, 8, 8))
    auto, x = with_executor(ens, "auto").eval(), torch.randn(2, 3, 8, 8)
    assert torch.allclose(auto(x), ens.eval()(x), atol=1e-5)
    assert set(auto.executor.choices.values()) <= {"loop", "loop_nhwc", "vmap"}


class DataDependent(nn.Module):
    """Python control flow on tensor values: vmap cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y.relu() if float(y.detach().mean()) > 0 else -y


def test_auto_never_chooses_a_strategy_that_fails():
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))
    split = BlockSplit(blocks=[DataDependent(), DataDependent()], head=head, num_classes=5,
                       feature_index=[None, None], feature_format=["NCHW"] * 2, in_chans=3, example_size=(8, 8))
    ens = ek.wrap(split, "tree", depth=1)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError):
        with_executor(ens, "vmap")(x)
    auto = with_executor(ens, "auto")
    assert torch.allclose(auto(x), ens(x), atol=1e-5)
    executor: AutoExecutor = auto.executor
    assert all(t.get("vmap", float("inf")) == float("inf") for t in executor.timings.values())
    assert "vmap" not in executor.choices.values()


def test_auto_measures_once_per_signature_and_leaves_no_trace():
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(3), "tree", depth=2).train()
    x = torch.randn(4, 3, 8, 8)
    auto = with_executor(ens, "auto")
    loop = copy.deepcopy(ens)
    torch.manual_seed(1)
    a = auto(x)
    torch.manual_seed(1)
    b = loop(x)
    assert torch.allclose(a, b, atol=1e-5)
    for k, v in loop.state_dict().items():  # timing runs did not move the running statistics
        assert torch.allclose(auto.state_dict()[k].double(), v.double(), atol=1e-6), k
    executor: AutoExecutor = auto.executor
    measured = [k for k, t in executor.timings.items() if len(t) > 1]
    assert len(measured) == 3  # one per level (1, 2 and 4 nodes), as the first pass met them
    assert all(set(executor.timings[k]) >= {"loop", "vmap", "grouped"} for k in measured)
    assert len(executor.plans) == 1  # then whole passes were timed once, per plan
    choices = dict(executor.choices)
    auto(x)
    assert executor.choices == choices and len(executor.plans) == 1  # nothing measured again
    with torch.no_grad():
        auto.eval()(x)
    assert len(executor.plans) == 2  # eval without gradients is another pass
    assert len([k for k, t in executor.timings.items() if len(t) > 1]) == 6


def test_predict_and_anytime_work_with_every_strategy():
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(3), "tree", depth=2).eval()
    x = torch.randn(6, 3, 8, 8)
    prefixes = ens.forward_output(x).prefixes()
    for strategy in STRATEGIES:
        other = with_executor(ens, strategy)
        steps = list(other.anytime(x))
        assert torch.allclose(steps[-1].prediction, prefixes[:, -1], atol=1e-5)
        result = other.predict(x, halting=ek.halting.Fixed(2))
        assert torch.allclose(result.prediction, prefixes[:, 1], atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_executor_survives_deepcopy_and_pickle(strategy):
    ens = with_executor(ek.wrap(toy_split(2), "tree", depth=1), strategy).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = ens(x)
        buffer = io.BytesIO()
        torch.save(ens, buffer)
        loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
        assert torch.allclose(loaded(x), expected, atol=1e-6)
        assert torch.allclose(copy.deepcopy(ens)(x), expected, atol=1e-6)
    assert pickle.loads(pickle.dumps(ens.executor)).name == strategy


def test_inference_cache_follows_parameter_updates():
    torch.manual_seed(0)
    for strategy in ("vmap", "grouped"):
        ens = with_executor(ek.wrap(toy_split(2), "independent", members=2), strategy).eval()
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            before = ens(x)
            ens.nodes[1][0].weight.add_(1.0)
            after = ens(x)
            loop = with_executor(ens, "loop")(x)
        assert not torch.allclose(before, after)
        assert torch.allclose(after, loop, atol=1e-5)


@pytest.mark.parametrize(("strategy", "backend"), [("loop", "aot_eager"), ("vmap", "eager"),
                                                   ("grouped", "aot_eager"), ("auto", "eager")])
def test_torch_compile_inference_and_training(strategy, backend):
    torch.manual_seed(0)
    ens = with_executor(ek.wrap(toy_split(2), "tree", depth=1), strategy)
    reference = copy.deepcopy(ens)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    compiled = torch.compile(ens, backend=backend)
    with torch.no_grad():
        assert torch.allclose(compiled.eval()(x), reference.eval()(x), atol=1e-5)
    compiled.train()
    reference.train()
    torch.nn.functional.cross_entropy(compiled(x), y).backward()
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    for a, b in zip(ens.parameters(), reference.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


@pytest.mark.parametrize("strategy", ["loop", "loop_nhwc", "vmap", "auto"])
def test_torch_compile_traces_a_timm_tree_in_one_graph(strategy):
    """fullgraph=True: no graph break anywhere in the ensemble's forward, eval or train."""
    timm = pytest.importorskip("timm")
    torch._dynamo.reset()  # each strategy compiles Ensemble.forward anew: stay clear of the recompile limit
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5, channels=(8, 8, 8, 8), stem_width=8)
    ens = ek.wrap(model, "tree", depth=2, execution=strategy, example_input=torch.randn(1, 3, 16, 16))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    reference = copy.deepcopy(ens)
    with torch.no_grad():
        out = torch.compile(ens.eval(), fullgraph=True, backend="aot_eager")(x)
    assert torch.allclose(out, reference.eval()(x), atol=1e-5)
    members = torch.compile(ens.train().forward_members, fullgraph=True, backend="aot_eager")
    ens.loss(members(x), y).total.backward()
    reference.train().loss(reference.forward_members(x), y).total.backward()
    for a, b in zip(ens.parameters(), reference.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_costs_are_counted_on_the_plain_nodes():
    ens = ek.wrap(toy_split(3), "tree", depth=2)
    others = [with_executor(ens, strategy) for strategy in STRATEGIES]
    table = ens.cost_table()
    assert all(other.cost_table() == table for other in others)


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(UnknownComponentError, match="auto.*grouped.*loop.*vmap"):
        ek.wrap(toy_split(2), "tree", depth=1, execution="fast")


def test_assigning_execution_switches_the_strategy():
    ens = ek.wrap(toy_split(2), "tree", depth=1).eval()
    x = torch.randn(2, 3, 8, 8)
    before = ens(x)
    ens.execution = "grouped"
    assert ens.execution == "grouped" and ens.executor.name == "grouped"
    assert torch.allclose(ens(x), before, atol=1e-5)
    with pytest.raises(ValueError, match="unknown execution strategy 'fast'"):  # an UnknownComponentError
        ens.execution = "fast"
    assert ens.execution == "grouped"


@pytest.mark.parametrize("spec", ["loop_nhwc", {"name": "loop", "channels_last": True},
                                  LoopExecutor(channels_last=True)], ids=["name", "mapping", "object"])
def test_execution_takes_a_name_a_mapping_or_an_object(spec):
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(2), "tree", depth=1).eval()
    x = torch.randn(2, 3, 8, 8)
    built = ek.wrap(toy_split(2), "tree", depth=1, execution=spec)
    assert isinstance(built.executor, LoopExecutor) and built.execution == "loop_nhwc"
    assert ek.Ensemble(toy_split(2), ek.topologies.Tree(depth=1), ek.aggregators.MeanLogits(),
                       execution=spec).execution == "loop_nhwc"
    expected = ens(x)
    ens.execution = spec
    assert ens.execution == "loop_nhwc"
    assert torch.allclose(ens(x), expected, atol=1e-5)


def test_an_executor_object_is_used_as_given():
    auto = AutoExecutor(candidates=("loop", "vmap"), rounds=1)
    ens = ek.wrap(toy_split(2), "tree", depth=1, execution=auto)
    assert ens.executor is auto
    ens(torch.randn(2, 3, 8, 8))
    assert set(auto.choices.values()) <= {"loop", "vmap"} and len(auto.plans) == 1
    with pytest.raises(TypeError, match="option rounds=0.5 is not of type int"):
        ens.execution = {"name": "auto", "rounds": 0.5}
    assert ens.executor is auto


def test_auto_keeps_the_fastest_whole_pass_plan(monkeypatch):
    """A plan that only wins as a chain (here: made the fastest) replaces the per-level choices."""
    import ensemblekit.execution.auto as execution

    torch.manual_seed(0)
    ens = ek.wrap(toy_split(3), "tree", depth=2).train()
    auto = with_executor(ens, "auto")
    reference = copy.deepcopy(ens)
    executor: AutoExecutor = auto.executor
    real_time_pass = execution._time_pass

    def grouped_is_fastest(run_pass, params, device):
        real_time_pass(run_pass, params, device)
        return 0.5 if executor._forced == "grouped" else 1.0

    monkeypatch.setattr(execution, "_time_pass", grouped_is_fastest)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    out = auto.forward_output(x)
    assert min(next(iter(executor.plans.values())).items(), key=lambda kv: kv[1])[0] == "grouped"
    executor._seen = seen = []
    auto.loss(auto.forward_output(x), y).total.backward()
    executor._seen = None
    assert [choice for _, _, choice in seen] == ["grouped"] * 3  # every level of the pass now runs grouped
    reference_out = reference.forward_output(x)
    assert torch.allclose(out.members, reference_out.members, atol=1e-5)
    reference.loss(reference.forward_output(x), y).total.backward()
    for (name, a), b in zip(auto.named_parameters(), reference.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-4), name
    for (name, a), b in zip(auto.named_buffers(), reference.buffers()):  # tuning left no trace
        assert torch.allclose(a.double(), b.double(), atol=1e-6), name


def test_grouped_reads_the_graphs_of_traced_blocks():
    """Graph blocks show their fx graphs through the core's TracedBlock protocol (no import of splitting)."""
    from ensemblekit.core.blocks import TracedBlock
    from ensemblekit.execution.grouped import GroupedExecutor
    from ensemblekit.splitting.graph import GraphBlock, PathTracer, trace_modes

    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
    block = GraphBlock(model, trace_modes(model, PathTracer).graphs)
    assert isinstance(block, TracedBlock) and not isinstance(model[0], TracedBlock)
    x = torch.randn(2, 3, 8, 8)
    assert GroupedExecutor().unsupported([block, copy.deepcopy(block)], [x, x]) is None
    flat = GraphBlock(nn.Sequential(nn.Flatten()), trace_modes(nn.Sequential(nn.Flatten()), PathTracer).graphs)
    assert "Flatten" in GroupedExecutor().unsupported([flat, copy.deepcopy(flat)], [x, x])
