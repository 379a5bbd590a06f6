"""ensemblekit's own components, registered through the same hooks a plugin uses."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from ensemblekit.components import aggregators, topologies
from ensemblekit.execution import AutoExecutor, GroupedExecutor, LoopExecutor, VmapExecutor
from ensemblekit.methods import ensemblenet, hne, irene, multi_exit
from ensemblekit.plugins.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    from torch import Tensor

    from ensemblekit.core.blocks import BlockSplit

__all__ = [
    "register_aggregators",
    "register_backbone_splitters",
    "register_executors",
    "register_halting_policies",
    "register_losses",
    "register_recipes",
    "register_schedules",
    "register_topologies",
    "sequential_splitter",
    "timm_splitter",
]


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
    register("last", aggregators.LastExit)


@hookimpl
def register_losses(register: Register) -> None:
    from ensemblekit.components.losses import BUILTIN_LOSSES

    for name, factory in BUILTIN_LOSSES.items():
        register(name, factory)


@hookimpl
def register_halting_policies(register: Register) -> None:
    from ensemblekit.components.halting import BUILTIN_HALTING_POLICIES

    for name, factory in BUILTIN_HALTING_POLICIES.items():
        register(name, factory)


def sequential_splitter(model: Any, num_blocks: int | None, example_input: Tensor | None) -> BlockSplit | None:
    """Splits an ``nn.Sequential`` or a list ``[block0, ..., head]``; ``None`` for anything else."""
    from ensemblekit.splitting import split_sequential

    return split_sequential(model, num_blocks, example_input=example_input)


def _sequential_example() -> dict[str, Any]:
    import torch
    from torch import nn

    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    blocks = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)]
    return {"model": [*blocks, head], "num_blocks": 2, "example_input": torch.randn(2, 3, 8, 8)}


def timm_splitter(model: Any, num_blocks: int | None, example_input: Tensor | None) -> BlockSplit | None:
    """Splits a timm model at its stages (``None`` for a model that is not from timm)."""
    from ensemblekit.splitting import split_timm

    return split_timm(model, num_blocks, example_input=example_input)


def _timm_example() -> dict[str, Any]:
    import torch

    from ensemblekit.backbones import create_backbone

    model = create_backbone("resnet10t", num_classes=5)
    return {"model": model, "num_blocks": 3, "example_input": torch.randn(2, 3, 32, 32)}


sequential_splitter.example_options = _sequential_example  # type: ignore[attr-defined]  # for check_splitter
timm_splitter.example_options = _timm_example  # type: ignore[attr-defined]


@hookimpl
def register_backbone_splitters(register: Register) -> None:
    register("sequential", sequential_splitter)
    register("timm", timm_splitter)


@hookimpl
def register_executors(register: Register) -> None:
    register("loop", LoopExecutor)
    register("loop_nhwc", partial(LoopExecutor, channels_last=True))
    register("vmap", VmapExecutor)
    register("grouped", GroupedExecutor)
    register("grouped_nhwc", partial(GroupedExecutor, channels_last=True))
    register("auto", AutoExecutor)


@hookimpl
def register_recipes(register: Register) -> None:
    for recipe in (hne, ensemblenet, multi_exit, irene):
        register(recipe.__name__, recipe)


@hookimpl
def register_schedules(register: Register) -> None:
    from ensemblekit.core.stages import joint
    from ensemblekit.methods.imta.schedule import two_phase
    from ensemblekit.methods.irene.schedule import irene_schedule, sequential

    register("joint", joint)
    register("sequential", sequential)
    register("irene", irene_schedule)
    register("two_phase", two_phase)
