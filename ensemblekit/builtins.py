"""ensemblekit's own components, registered through the same hooks a plugin uses."""

from __future__ import annotations

from ensemblekit import aggregators, topologies
from ensemblekit.hookspecs import Register, hookimpl


@hookimpl
def register_topologies(register: Register) -> None:
    for cls in (topologies.Independent, topologies.MultiBranch, topologies.Tree, topologies.Chain,
                topologies.Cascade):
        register(cls.name, cls)


@hookimpl
def register_aggregators(register: Register) -> None:
    register("mean", aggregators.MeanLogits)
    register("mean_probs", aggregators.MeanProbs)
    register("vote", aggregators.Vote)
    register("weighted", aggregators.WeightedMean)


@hookimpl
def register_losses(register: Register) -> None:
    from ensemblekit.losses import BUILTIN_LOSSES

    for name, factory in BUILTIN_LOSSES.items():
        register(name, factory)


@hookimpl
def register_halting_policies(register: Register) -> None:
    from ensemblekit.halting import BUILTIN_HALTING_POLICIES

    for name, factory in BUILTIN_HALTING_POLICIES.items():
        register(name, factory)
