"""The hooks a plugin implements to add components to ensemblekit.

A plugin is a module (or object) with functions marked ``@ensemblekit.hookimpl``
and named like the specs below, found through the ``ensemblekit`` entry-point
group. Each hook is called once, the first time a component is looked up, with
a ``register(name, factory)`` callable; ``factory(**options)`` must return an
instance of the kind's base class.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("ensemblekit")
hookimpl = pluggy.HookimplMarker("ensemblekit")

Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def register_topologies(register: Register) -> None:
    """Register :class:`~ensemblekit.topologies.SharingTopology` factories."""


@hookspec
def register_aggregators(register: Register) -> None:
    """Register :class:`~ensemblekit.interfaces.Aggregator` factories."""


@hookspec
def register_losses(register: Register) -> None:
    """Register :class:`~ensemblekit.interfaces.LossStrategy` factories."""


@hookspec
def register_halting_policies(register: Register) -> None:
    """Register :class:`~ensemblekit.interfaces.HaltingPolicy` factories."""


@hookspec
def register_backbone_splitters(register: Register) -> None:
    """Register splitters ``(model, num_blocks, example_input) -> BlockSplit | None``.

    A splitter returns ``None`` for models it does not handle; the first one
    that returns a split wins, plugins before the built-in timm splitter.
    """
