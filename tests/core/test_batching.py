"""Batch compaction drops stopped samples from the values declared per-sample, never by shape.

Every case has 4 classes and a batch of 4 (or a side input with as many rows
as the batch), where slicing "every tensor whose first dimension is the batch
size" silently cut a per-class tensor or a side input.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import ensemblekit as ek
from ensemblekit.core.batching import BatchLayoutError, select_running_state, select_state
from ensemblekit.core.blocks import BlockSplit
from ensemblekit.core.interfaces import HaltingPolicy, HaltingStep
from ensemblekit.functional import confidence
from ensemblekit.splitting.graph import (
    GraphIndex,
    PathTracer,
    build_blocks,
    locate_cuts,
    per_sample_layouts,
    profile_graph,
    trace_modes,
)

CLASSES = BATCH = 4


class WithPrototypes(nn.Module):
    """A block passing on per-class prototypes ``[C, D]`` next to the features ``[B, D]`` (a side input)."""

    def __init__(self, dim: int = 6):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: Tensor, prototypes: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(self.linear(x)) + prototypes.mean(0), prototypes


class Stem(nn.Module):
    def __init__(self, dim: int = 6):
        super().__init__()
        self.linear = nn.Linear(3 * 2 * 2, dim)
        self.prototypes = nn.Parameter(torch.randn(CLASSES, dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.linear(x.flatten(1)), self.prototypes * 1.0


class PrototypeHead(nn.Module):
    def forward(self, x: Tensor, prototypes: Tensor) -> Tensor:
        return x @ prototypes.T  # [B, C]


def prototype_split() -> BlockSplit:
    return BlockSplit(blocks=[Stem(), WithPrototypes()], head=PrototypeHead(), num_classes=CLASSES,
                      feature_index=[0, 0], feature_format=["NC", "NC"], in_chans=3, example_size=(2, 2),
                      per_sample=[(True, False), (True, False)])


def test_a_per_class_side_input_stays_whole_in_a_batch_of_as_many_samples():
    torch.manual_seed(0)
    ens = ek.wrap(prototype_split(), "chain").eval()
    x = torch.randn(BATCH, 3, 2, 2)
    with torch.no_grad():
        prefixes = ens.forward_output(x).prefixes()
    conf = confidence(prefixes)
    threshold = float(conf[:, 0].median())
    result = ens.predict(x, halting=ek.halting.Confidence([threshold, 0.0]))
    chosen = (conf[:, 0] < threshold).long()
    assert 0 < int(chosen.sum()) < BATCH  # some samples stopped, some went on
    assert torch.equal(result.members_used, chosen + 1)
    torch.testing.assert_close(result.prediction, prefixes[torch.arange(BATCH), chosen])


class CountsClasses(HaltingPolicy):
    """Keeps a per-class count ``[C]`` (shared) and a per-sample step count; stops the first half of the batch."""

    per_sample_state: ClassVar[frozenset[str]] = frozenset({"steps"})

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Tensor]] = []

    def step(self, step: HaltingStep, state: dict[str, Any] | None) -> tuple[Tensor, dict[str, Tensor]]:
        if state is not None:
            self.seen.append(state)
        b, c = step.prediction.shape
        counts = torch.bincount(step.prediction.argmax(-1), minlength=c).float()
        steps = torch.full((b,), float(step.index + 1))
        if state is not None:
            counts, steps = counts + state["class_counts"], steps + state["steps"] * 0
        stop = torch.arange(b) < b // 2 if step.index == 0 else torch.zeros(b, dtype=torch.bool)
        return stop, {"class_counts": counts, "steps": steps}


def test_a_policys_per_class_state_stays_whole():
    torch.manual_seed(0)
    ens = ek.wrap(prototype_split(), "chain").eval()
    policy = CountsClasses()
    ens.predict(torch.randn(BATCH, 3, 2, 2), halting=policy)
    state = policy.seen[0]  # what the policy got back after half the batch stopped
    assert state["class_counts"].shape == (CLASSES,) and state["class_counts"].sum() == BATCH
    assert state["steps"].shape == (BATCH // 2,)


def test_undeclared_state_tensors_must_be_batch_first():
    keep = torch.tensor([True, False, True, False])
    state = {"sum": torch.ones(BATCH, CLASSES), "count": torch.tensor(2.0), "timer": object()}
    out = select_running_state(state, keep, BATCH, None, "aggregator Mean")
    assert out["sum"].shape == (2, CLASSES) and out["count"] is state["count"] and out["timer"] is state["timer"]
    with pytest.raises(BatchLayoutError, match=r"\['prior'\] has shape \(3,\) for a batch of 4.*per_sample_state"):
        select_running_state({"prior": torch.ones(3)}, keep, BATCH, None, "aggregator Prior")
    with pytest.raises(BatchLayoutError, match=r"declared per-sample but has shape \(3,\)"):
        select_running_state({"prior": torch.ones(3)}, keep, BATCH, {"prior"}, "aggregator Prior")
    with pytest.raises(BatchLayoutError, match="did not declare which of them are per-sample"):
        select_state((torch.ones(BATCH, 2), torch.ones(BATCH, 2)), keep, BATCH, None, "the state of node 0")
    kept = select_state((torch.ones(BATCH, 2), torch.ones(BATCH, 2), (7, 7)), keep, BATCH, (True, False, False), "s")
    assert [tuple(v.shape) for v in kept[:2]] == [(2, 2), (BATCH, 2)] and kept[2] == (7, 7)


class RopeLike(nn.Module):
    """A model whose stages also read a table computed from a size and a parameter (as a RoPE table)."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 1)
        self.freq = nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.stage1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.stage2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        table = torch.arange(x.shape[1], dtype=x.dtype, device=x.device)[:, None] * self.freq  # [C, C]
        x = torch.relu(self.stage1(x)) * table.mean()
        x = torch.relu(self.stage2(x)) * table.mean()
        return self.head(x * table.mean())


def rope_split() -> BlockSplit:
    """:class:`RopeLike` split at its two stages by the graph splitter's own functions."""
    traced = trace_modes(RopeLike().eval(), PathTracer)
    profile = profile_graph(traced, [torch.zeros(1, 3, 4, 4)])
    indexes = {mode: GraphIndex(g) for mode, g in traced.graphs.items()}
    cuts = locate_cuts(indexes, ["stage1", "stage2"])
    layouts = per_sample_layouts(indexes[False], profile, cuts.live[False])
    assert layouts == [(False, True), (False, True)]  # the table is shared, the features are per-sample
    blocks, head = build_blocks(traced, cuts)
    return BlockSplit(blocks=blocks, head=head, num_classes=CLASSES, feature_index=[1, 1],
                      feature_format=["NCHW", "NCHW"], in_chans=3, example_size=(4, 4), per_sample=layouts)


def test_a_side_input_computed_from_sizes_is_shared_across_the_batch():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)  # as many samples as the table has rows
    ens = ek.wrap(rope_split(), "chain").eval()
    with torch.no_grad():
        prefixes = ens.forward_output(x).prefixes()
    conf = confidence(prefixes)
    threshold = float(conf[:, 0].median())
    result = ens.predict(x, halting=ek.halting.Confidence([threshold, 0.0]))
    chosen = (conf[:, 0] < threshold).long()
    assert 0 < int(chosen.sum()) < len(x)
    torch.testing.assert_close(result.prediction, prefixes[torch.arange(len(x)), chosen])
