"""Every registered component obeys its interface, and the checks catch those that do not.

The parametrisation reads the registries, so components added later (built-in
or from an installed plugin) are checked without editing this file.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ensemblekit import hookimpl
from ensemblekit.components.aggregators import MeanLogits
from ensemblekit.components.topologies import Tree
from ensemblekit.core.interfaces import AggregatorState, HaltingPolicy, HaltingStep, LossResult, LossStrategy
from ensemblekit.core.registry import REGISTRIES
from ensemblekit.execution import LoopExecutor
from ensemblekit.plugins.manager import register_plugin
from ensemblekit.testing import (
    ConformanceError,
    build,
    check_aggregator,
    check_component,
    check_executor,
    check_halting_policy,
    check_loss,
    check_splitter,
    isolated_plugins,
    registered_components,
)

COMPONENTS = registered_components()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors are tiny: one thread beats two competing for a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind, name", COMPONENTS, ids=[f"{k.replace(' ', '_')}:{n}" for k, n in COMPONENTS])
def test_registered_component_obeys_its_interface(kind, name):
    check_component(kind, name)


def test_every_kind_is_covered():
    assert {kind for kind, _ in COMPONENTS} == {registry.kind for registry in REGISTRIES.values()}
    assert {"topology", "aggregator", "loss", "halting policy", "splitter", "execution strategy", "recipe"} <= {
        kind for kind, _ in COMPONENTS}


class Drifting(MeanLogits):
    """Batch form (overridden) disagrees with the incremental form."""

    def forward(self, members: Tensor) -> Tensor:
        return super().forward(members) + 1.0


class SharedState(MeanLogits):
    """Keeps a per-class tensor in its state: breaks when samples are dropped."""

    def update(self, state: AggregatorState | None, logits: Tensor, index: int) -> AggregatorState:
        state = super().update(state, logits, index)
        return {**state, "class_max": logits.amax(dim=0)}


class ByPosition(HaltingPolicy):
    """Stops the first half of the batch: decided by position, not by the sample."""

    def step(self, step: HaltingStep, state):
        n = step.prediction.shape[0]
        return torch.arange(n) < n // 2, None


class FloatMask(HaltingPolicy):
    def step(self, step: HaltingStep, state):
        return torch.zeros(step.prediction.shape[0]), None


class PerMember(LossStrategy):
    def forward(self, output, target):
        return LossResult(output.members.mean(dim=(0, 2)), {})


@pytest.mark.parametrize("check, component, message", [
    (check_aggregator, Drifting(), "incremental vs batch"),
    (check_aggregator, SharedState(), "batch-first"),
    (check_halting_policy, ByPosition(), "not per sample"),
    (check_halting_policy, FloatMask(), "bool mask"),
    (check_loss, PerMember(), "0-dim float tensor"),
    (check_aggregator, Tree(), "not an Aggregator"),
])
def test_checks_catch_contract_violations(check, component, message):
    with pytest.raises(ConformanceError, match=message):
        check(component)


class Reversed(LoopExecutor):
    """Gives each node the input of the node after it: not what the loop computes."""

    def run(self, modules, inputs):
        return super().run(modules, list(reversed(inputs)))


def test_executor_check_compares_with_the_loop():
    check_executor(LoopExecutor(channels_last=True))
    with pytest.raises(ConformanceError, match="member logits in eval mode vs the loop's"):
        check_executor(Reversed())


def test_splitter_must_decline_models_it_does_not_handle():
    with pytest.raises(ConformanceError, match="must return None"):
        check_splitter(lambda model, num_blocks, example_input: "a split")


class NeedsTemperature(MeanLogits):
    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature


class Tempered(NeedsTemperature):
    @classmethod
    def example_options(cls) -> dict:
        return {"temperature": 2.0}


class Example:
    @hookimpl
    def register_aggregators(self, register):
        register("needs_temperature", NeedsTemperature)
        register("tempered", Tempered)


def test_required_options_come_from_example_options():
    with isolated_plugins():
        register_plugin(Example(), "example")
        assert build("aggregator", "tempered").temperature == 2.0
        check_component("aggregator", "tempered")
        with pytest.raises(ConformanceError, match="needs temperature.*example_options"):
            check_component("aggregator", "needs_temperature")
