"""FLOPs follow the input that is evaluated, in every dtype; a multiply-add is 2 FLOPs, MACs are half."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import ensemblekit as ek
from ensemblekit.backbones import create_backbone
from ensemblekit.components.halting import Budgeted, Confidence, Deadline, Fixed
from ensemblekit.core.blocks import BlockSplit
from ensemblekit.core.cost import CostError, CostTable, PrefixCost, measure_costs
from ensemblekit.core.flops import FLOPS_NOTE, count_flops
from ensemblekit.core.formatting import format_si
from ensemblekit.core.interfaces import UntrainedHaltingWarning
from tests.conftest import toy_split

SIZES = (64, 128)


def resnet10t(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone("resnet10t", num_classes=10, **kwargs).eval()


def stage_flops(model: nn.Module, size: int) -> tuple[int, list[int], int]:
    """FlopCounterMode on the whole resnet at ``size``: total, per block (stem, layer1..4) and head FLOPs."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    total = counts["Global"]
    layers = [counts[f"ResNet.layer{i}"] for i in range(1, 5)]
    head = counts["ResNet.fc"]
    return total, [total - sum(layers) - head, *layers], head


@pytest.fixture(scope="module")
def tree():
    """A resnet10t tree of depth 4: 5 blocks, 1 + 2 + 4 + 8 + 16 nodes, 16 members."""
    model = resnet10t()
    ens = ek.wrap(model, "tree", depth=4).eval()
    assert [len(level) for level in ens.graph.levels] == [1, 2, 4, 8, 16]
    return model, ens


@pytest.mark.parametrize("size", SIZES)
def test_tree_flops_are_the_whole_backbone_at_that_size_times_the_node_multiplicities(tree, size):
    model, ens = tree
    total, blocks, head = stage_flops(model, size)
    table = ens.cost_table(input_size=size)
    assert table[0].flops == total  # member 0 is one path: the whole backbone
    nodes = [len(level) for level in ens.graph.levels]
    assert table[-1].flops == sum(n * f for n, f in zip(nodes, blocks)) + ens.num_members * head
    for row in table:  # every prefix: its distinct nodes per level, plus one head per member
        per_level = [0] * len(nodes)
        for i in ens.graph.prefix_nodes(row.members):
            per_level[ens.graph.nodes[i].block] += 1
        assert row.flops == sum(n * f for n, f in zip(per_level, blocks)) + row.members * head
        assert row.macs == row.flops / 2



def test_cost_table_prints_as_a_table_and_gives_records_to_code(tree):
    _, ens = tree
    table = ens.cost_table(input_size=64)
    assert isinstance(table, CostTable) and isinstance(table, list)
    rows = list(table)  # records, as before: indexing, iteration, len, comparison with a list
    assert len(table) == ens.num_members == 16 and all(isinstance(r, PrefixCost) for r in rows)
    assert table[0] is rows[0] and table[-1].members == 16 and [r.members for r in table] == list(range(1, 17))
    assert table == rows and rows == table and table == ens.cost_table(input_size=(3, 64, 64))
    assert isinstance(table[:4], CostTable) and table[:4] == rows[:4] and table[:4].input_size == (3, 64, 64)
    text = str(table)
    assert repr(table) == text  # what the REPL shows
    lines = text.splitlines()
    assert lines[0] == f"Cost of the first k members per 3x64x64 image; {FLOPS_NOTE}"
    assert lines[1].split() == ["members", "FLOPs", "MACs", "params", "FLOPs", "vs", "1", "member"]
    assert len(lines) == 2 + 16 and len({len(line) for line in lines[1:]}) == 1  # aligned columns
    for line, row in zip(lines[2:], table):
        assert line.split() == [str(row.members), format_si(row.flops), format_si(row.macs), format_si(row.params),
                                f"{row.flops / table[0].flops:.2f}x"]
    assert "PrefixCost(" not in text
    assert str(CostTable()).splitlines()[1].split()[0] == "members"  # an empty table prints its header

@pytest.mark.parametrize("size", SIZES)
def test_independent_members_cost_the_whole_backbone_each(size):
    model = resnet10t()
    ens = ek.wrap(model, "independent", members=3)
    assert [r.flops for r in ens.cost_table(input_size=(size, size))] == [k * stage_flops(model, size)[0]
                                                                          for k in (1, 2, 3)]


def test_cost_table_follows_the_pixel_ratio_of_a_cnn(tree):
    _, ens = tree
    small, large = ens.costs(64), ens.costs((3, 128, 128))
    assert large.node_flops == [4 * f for f in small.node_flops]  # 4x the pixels, 4x every convolution
    assert large.head_flops == small.head_flops  # a linear layer after global pooling
    assert (small.input_size, large.input_size) == ((64, 64), (128, 128))


def test_default_size_is_the_backbones_own(tree):
    model, ens = tree
    assert model.pretrained_cfg["input_size"] == (3, 176, 176)
    assert ek.split(model).native_size == ens.native_size == (176, 176)
    assert ens.costs().input_size == (176, 176)
    assert ens.cost_table()[0].flops == stage_flops(model, 176)[0]
    hand_made = ek.wrap(toy_split(2), "tree", depth=1)  # no native size: its example size
    assert hand_made.costs().input_size == (8, 8)


@pytest.mark.parametrize("size", SIZES)
def test_predict_and_anytime_report_the_cost_at_the_inputs_size(tree, size):
    model, ens = tree
    x = torch.randn(2, 3, size, size)
    table = [r.flops for r in ens.cost_table(input_size=size)]
    assert [step.flops for step in ens.anytime(x, max_members=3)] == table[:3]
    first = ens.predict(x, halting=Fixed(1))
    assert first.flops.tolist() == [stage_flops(model, size)[0]] * 2  # 716M at 128x128, not the 32x32 44.8M
    assert ens.predict(x, halting=Fixed(ens.num_members)).flops.tolist() == [table[-1]] * 2
    budget = table[1]
    assert [s.members for s in ens.anytime(x, max_flops=budget)] == [1, 2]


@given(st.integers(0, 2), st.integers(1, 24), st.integers(1, 24))
def test_every_shape_is_counted_as_the_blocks_run_on_it(depth, h, w):
    split = toy_split(depth + 1)
    ens = ek.wrap(split, "tree", depth=depth)
    x = torch.zeros(1, 3, h, w)
    block, head = count_flops(split.blocks[0].eval(), x), count_flops(split.head, x)
    costs = ens.costs((h, w))
    assert costs.node_flops == [block] * ens.graph.num_nodes
    assert costs.head_flops == [head] * ens.num_members


def test_costs_are_measured_once_per_shape(monkeypatch):
    ens = ek.wrap(toy_split(2), "tree", depth=1)
    calls = []
    monkeypatch.setattr("ensemblekit.core.ensemble.measure_costs", lambda e, s: calls.append(s) or measure_costs(e, s))
    assert ens.costs(16) is ens.costs((16, 16)) is ens.costs((3, 16, 16))
    assert ens.costs(8) is not ens.costs(16)
    assert calls == [(3, 16, 16), (3, 8, 8)]


class _Attention(nn.Module):
    """Self-attention over the pixels, through PyTorch's fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)[:, None].contiguous()  # [B, 1 head, L, C]
        return F.scaled_dot_product_attention(tokens, tokens, tokens)[:, 0].transpose(1, 2).reshape(b, c, h, w)


class _PlainTensor(nn.Module):
    """A block holding a plain tensor (neither parameter nor buffer): it cannot run on the meta device."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.scale = torch.ones(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale


def _split(block: nn.Module) -> BlockSplit:
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    return BlockSplit([block], head, 4, [None], ["NCHW"], in_chans=3, example_size=(8, 8))


def test_attention_counts_its_matrix_products_on_every_device():
    ens = ek.wrap(_split(_Attention()), "independent", members=2)
    tokens, channels = 8 * 8, 3
    assert ens.costs(8).node_flops == [2 * (2 * tokens * tokens * channels)] * 2  # q k^T and (attention) v
    assert count_flops(_Attention(), torch.zeros(1, 3, 8, 8)) == 0  # the CPU's fused kernel hides them


def test_a_block_that_cannot_run_on_meta_is_counted_on_its_device():
    block = _PlainTensor()
    ens = ek.wrap(_split(block), "independent", members=2)
    assert ens.costs(16).node_flops == [count_flops(block, torch.zeros(1, 3, 16, 16))] * 2


@pytest.mark.parametrize("size", [0, -3, "64", (64,), (3, 64, 64, 1), (1.5, 2)])
def test_a_malformed_input_size_is_an_ensemblekit_error(size):
    ens = ek.wrap(toy_split(2), "tree", depth=1)
    with pytest.raises(CostError, match="input_size must be"):
        ens.cost_table(input_size=size)
    assert issubclass(CostError, ek.EnsembleKitError) and issubclass(CostError, ValueError)


def test_an_input_size_the_backbone_cannot_take_is_an_error():
    split = toy_split(2)
    split.input_size = (8, 8)  # a fixed-size backbone
    ens = ek.wrap(split, "tree", depth=1)
    assert ens.costs().input_size == (8, 8)
    with pytest.raises(CostError, match="only accepts"):
        ens.cost_table(input_size=16)
    with pytest.raises(CostError, match="1 channels but the backbone takes 3"):
        ens.cost_table(input_size=(1, 8, 8))


# ------------------------------------------------------------------ budgets and reports
def held_out(size: int, n: int = 40):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_a_flops_budget_is_at_the_held_out_images_size():
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(3), "tree", depth=2).eval()
    at_16 = [float(r.flops) for r in ens.cost_table(input_size=16)]
    policy = Budgeted(flops=at_16[2])
    policy.calibrate(ens, held_out(16))
    assert policy.input_size == (16, 16) and "per 16x16 image" in repr(policy)
    assert policy.expected_flops == pytest.approx(sum(f * c for f, c in zip(policy.fractions, at_16)))
    assert policy.expected_flops <= at_16[2]
    x, y = held_out(16)
    mixed = [(x[:20], y[:20]), (F.interpolate(x[20:], size=12), y[20:])]
    with pytest.raises(CostError, match="several sizes"):
        Budgeted(q=1.0).calibrate(ens, mixed)


def test_trainer_and_budget_reports_count_at_the_evaluated_size():
    from ensemblekit.evaluation.budget import budget_sweep
    from ensemblekit.training.trainer import evaluate

    torch.manual_seed(0)
    ens = ek.wrap(toy_split(2), "tree", depth=1).eval()
    x, y = held_out(16)
    at_16 = [float(r.flops) for r in ens.cost_table(input_size=16)]
    assert at_16 != [float(r.flops) for r in ens.cost_table()]  # the default (8x8) differs
    report = evaluate(ens, TensorDataset(x, y), device="cpu")
    assert report.prefix_flops == at_16
    assert FLOPS_NOTE in report.table()
    sweep = budget_sweep(ens, (x, y), (x, y), qs=(1.0,), repeats=1)
    assert sweep.full_flops == at_16[-1] and sweep.anytime.prefix_flops == at_16
    assert FLOPS_NOTE in sweep.table()


def test_report_headers_say_how_flops_are_counted():
    from ensemblekit.components.aggregators import MeanLogits
    from ensemblekit.evaluation.reports import anytime_report

    members, labels = torch.randn(6, 2, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    assert FLOPS_NOTE in anytime_report(members, labels, MeanLogits(), costs=[(2.0, 1), (4.0, 2)]).table()
    assert FLOPS_NOTE not in anytime_report(members, labels, MeanLogits()).table()  # no FLOPs, no note
    assert "multiply-add as 2" in FLOPS_NOTE and "MACs" in FLOPS_NOTE


def test_inspect_counts_at_the_given_size_and_shows_macs(capsys, monkeypatch):
    from ensemblekit.cli.main import main

    monkeypatch.setenv("COLUMNS", "250")
    assert main(["inspect", "resnet10t", "--depth", "1", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "FLOPs per 64x64 image" in out and FLOPS_NOTE in out and "MACs" in out
    first = stage_flops(resnet10t(), 64)[0]
    assert f"{first / 1e6:.2f}M" in out and f"{first / 2e6:.2f}M" in out  # member 0: FLOPs, then MACs
    assert main(["inspect", "resnet10t", "--depth", "1"]) == 0
    assert "FLOPs per 176x176 image" in capsys.readouterr().out  # resnet10t's own input size
    assert main(["inspect", "resnet10t", "--image-size", "1", "2", "3"]) == 2
    assert "--image-size takes S or H W" in capsys.readouterr().err


# ------------------------------------------------------------------ dtypes
def _cpu_supports(dtype: torch.dtype) -> bool:
    """Whether this PyTorch runs a conv, BatchNorm and pooling in ``dtype`` on the CPU."""
    block = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1)).eval()
    try:
        with torch.no_grad():
            block.to(dtype)(torch.zeros(1, 3, 8, 8, dtype=dtype))
    except (RuntimeError, NotImplementedError):
        return False
    return True


DTYPES = [
    pytest.param(dtype, marks=pytest.mark.skipif(not _cpu_supports(dtype),
                                                 reason=f"this PyTorch has no CPU kernels for {dtype}"))
    for dtype in (torch.bfloat16, torch.float16, torch.float64)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("halting", ["confidence", "budgeted", "deadline", "learned"])
def test_every_dtype_end_to_end(dtype, halting):
    torch.manual_seed(0)
    model = resnet10t(channels=(8, 8, 8, 8), stem_width=8)
    reference = ek.wrap(model, "tree", depth=2, halting="learned" if halting == "learned" else None)
    ens = reference.to(dtype).eval()
    x, y = held_out(32, n=8)
    x = x.to(dtype)
    policy = {"confidence": Confidence(0.5), "budgeted": Budgeted(q=1.0), "deadline": Deadline(3600.0),
              "learned": None}[halting]
    if halting == "budgeted":
        policy.calibrate(ens, (x.float(), y))  # images are cast to the ensemble's dtype
    table = ens.cost_table(input_size=32)
    assert table == ek.wrap(model, "tree", depth=2).cost_table(input_size=32)  # the dtype changes no count
    steps = list(ens.anytime(x))
    assert [s.flops for s in steps] == [r.flops for r in table]
    assert all(s.prediction.dtype == dtype for s in steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedHaltingWarning)
        result = ens.predict(x, halting=policy)
    assert result.prediction.dtype == dtype and bool(torch.isfinite(result.prediction).all())
    assert result.flops.tolist() == [table[m - 1].flops for m in result.members_used.tolist()]


@given(st.sampled_from([torch.bfloat16, torch.float64]), st.integers(4, 16), st.integers(4, 16))
def test_every_dtype_at_every_shape(dtype, h, w):
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(2), "tree", depth=1).to(dtype).eval()
    x = torch.randn(3, 3, h, w).to(dtype)
    table = [r.flops for r in ek.wrap(toy_split(2), "tree", depth=1).cost_table(input_size=(h, w))]
    assert [s.flops for s in ens.anytime(x)] == table
    result = ens.predict(x, halting=Confidence(0.6))
    assert result.prediction.dtype == dtype
    assert result.flops.tolist() == [table[m - 1] for m in result.members_used.tolist()]
