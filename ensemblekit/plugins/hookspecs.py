"""The hooks a plugin implements to add components to ensemblekit.

A plugin is a module (or any object) with functions marked
``@ensemblekit.hookimpl`` and named like the hooks below. Installed plugins
are found through the ``ensemblekit`` entry-point group; ensemblekit's own
components are registered by [`ensemblekit.plugins.builtins`][ensemblekit.plugins.builtins] through the same
hooks.

Every hook receives one argument, ``register``, and is called exactly once
per process, when a component is first looked up by name (loading is lazy).
``register(name, factory)`` adds ``factory`` under ``name``; calling
``factory(**options)`` must return an instance of the kind's base class. A
name already taken (by the plugin itself or another one) is an error that
names both plugins. What a plugin registers takes effect only once all of
its hooks have returned; if one raises, nothing of that plugin is kept.

Examples:
    >>> import ensemblekit
    >>> from ensemblekit.components.aggregators import MeanProbs
    >>> @ensemblekit.hookimpl
    ... def register_aggregators(register):
    ...     register("my_mean_probs", MeanProbs)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import pluggy

__all__ = [
    "PROJECT",
    "Register",
    "hookimpl",
    "hookspec",
    "register_aggregators",
    "register_backbone_splitters",
    "register_executors",
    "register_halting_policies",
    "register_losses",
    "register_recipes",
    "register_schedules",
    "register_topologies",
]

PROJECT = "ensemblekit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """The ``register`` callable each hook receives."""

    def __call__(self, name: str, factory: Callable[..., Any]) -> None:
        """Add ``factory`` (a class or function) under ``name``."""


@hookspec
def register_topologies(register: Register) -> None:
    """Register [`SharingTopology`][ensemblekit.components.topologies.SharingTopology] factories.

    ``factory(**options)`` receives the topology options a user passes
    (``ek.wrap(model, "tree", depth=3)`` calls ``factory(depth=3)``).
    """


@hookspec
def register_aggregators(register: Register) -> None:
    """Register [`Aggregator`][ensemblekit.core.interfaces.Aggregator] factories.

    ``factory(**options)`` receives the user's options plus ``num_members``
    when the factory names that parameter.
    """


@hookspec
def register_losses(register: Register) -> None:
    """Register [`LossStrategy`][ensemblekit.core.interfaces.LossStrategy] factories.

    ``factory(**options)`` receives the user's options.
    """


@hookspec
def register_halting_policies(register: Register) -> None:
    """Register [`HaltingPolicy`][ensemblekit.core.interfaces.HaltingPolicy] factories.

    ``factory(**options)`` receives the user's options plus ``num_members``
    when the factory names that parameter.
    """


@hookspec
def register_backbone_splitters(register: Register) -> None:
    """Register backbone splitters ``(model, num_blocks, example_input) -> BlockSplit | None``.

    ``register(name, splitter)`` adds a function (not a factory) that cuts
    ``model`` into ``num_blocks`` blocks (``None``: its natural stages), or
    returns ``None`` for a model it does not handle. Plugins' splitters are
    tried before the built-in ones, so a plugin can take over a model.
    """


@hookspec
def register_executors(register: Register) -> None:
    """Register [`Executor`][ensemblekit.core.interfaces.Executor] factories.

    ``factory(**options)`` receives the user's options
    (``ek.wrap(model, execution={"name": "mine", "rounds": 2})`` calls ``factory(rounds=2)``).
    """


@hookspec
def register_recipes(register: Register) -> None:
    """Register recipes: functions ``recipe(backbone, **options) -> Ensemble``.

    A recipe configures an ensemble as a paper did and builds it with
    [`ensemblekit.wrap()`][ensemblekit.build.wrap]; configs resolve it by name (``recipe = "hne"``)
    and call ``recipe(backbone=..., init=..., halting=..., example_input=...,
    **recipe_options)``. A recipe that passes its ``**kwargs`` on to ``wrap``
    says so with ``recipe.passes_kwargs_to = ensemblekit.wrap``, so that the
    option checks accept wrap's keywords.
    """


@hookspec
def register_schedules(register: Register) -> None:
    """Register training schedules: functions ``schedule(ensemble, settings, **options) -> list[Stage]``.

    A schedule splits training into [`Stage`][ensemblekit.core.stages.Stage]
    objects (what trains, which members, which loss and optimizer, how many
    epochs, a preparation); [`ensemblekit.training.trainer.train()`][ensemblekit.training.trainer.train] runs
    them in order. ``settings`` is the run's
    [`TrainConfig`][ensemblekit.training.config.TrainConfig]; the options come from
    ``train.stages = {name = ..., **options}`` (``stages = "mine"`` for none).
    """
