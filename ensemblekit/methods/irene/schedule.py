"""IRENE's training schedule as trainer stages (Li et al., AAAI 2023, Algorithm 1 and App. A.1).

Algorithm 1 trains the ``T`` base models one after the other: step
``t = 1..T`` trains what member ``t`` adds ([`stage_modules()`][ensemblekit.methods.irene.schedule.stage_modules]: its
nodes, its head, its auxiliary head) and the selector, on the first ``t``
members, with members ``1..t-1`` frozen; [`IreneLoss`][ensemblekit.components.losses.IreneLoss]
(``schedule="sequential"``) is then the objective of step ``t``. Each step
is one [`Stage`][ensemblekit.core.stages.Stage] whose optimisers are created
anew (App. A.1.1): SGD with Nesterov momentum and weight decay for the
models, Adam for the selector (App. A.1), both with the learning rate
divided by 5 at 30%, 60% and 80% of the step's epochs (App. A.1.2: 200
epochs, steps at 60, 120 and 160).

Registered schedules: ``"sequential"`` ([`sequential()`][ensemblekit.methods.irene.schedule.sequential], what an
``IreneLoss`` with ``schedule="sequential"`` and a cascade with any loss
train with by default) and ``"irene"`` ([`irene_schedule()`][ensemblekit.methods.irene.schedule.irene_schedule]:
Algorithm 1 or, where the default schedule is not "sequential", all members at once with the same optimisers).

Examples:
    >>> import torch, ensemblekit as ek
    >>> from ensemblekit.training.config import TrainConfig
    >>> from ensemblekit.training.trainer import train
    >>> ens = ek.recipes.irene("resnet10t", members=2, num_classes=10)         # doctest: +SKIP
    >>> train(ens, train_set, TrainConfig(epochs=10))  # the loss asks for "sequential"  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ensemblekit.components.halting.learned import Learned
from ensemblekit.core.stages import LRScheduleFactory, OptimizerFactory, ScheduleSettings, Stage, default_schedule

__all__ = ["LR_DECAY", "LR_MILESTONES", "irene_schedule", "optimizers", "sequential", "stage_modules", "step_decay"]

LR_MILESTONES = (0.3, 0.6, 0.8)
"""Where the learning rate is divided by 5: IRENE trains 200 epochs with steps at 60, 120, 160 (App. A.1.2)."""
LR_DECAY = 0.2


def stage_modules(ensemble: Any, step: int) -> list[nn.Module]:
    """Modules trained at step ``step`` (1-based) of Algorithm 1.

    The nodes member ``step`` adds to the earlier members (its whole path in
    a cascade, its own branch in a tree or multi-branch ensemble), its head,
    its auxiliary head and the selector; everything else is frozen.
    """
    member = step - 1
    modules = [ensemble.nodes[i] for i in ensemble.graph.new_nodes(member)] + [ensemble.heads[member]]
    policy = ensemble.halting
    if isinstance(policy, Learned):
        if policy.aux_head:
            modules.append(policy.aux_heads[member])
        modules += [policy.cell, policy.out]
    return modules


def optimizers(ensemble: Any, lr: float, momentum: float, weight_decay: float,
               selector_lr: float) -> OptimizerFactory:
    """IRENE's optimisers (App. A.1): SGD (Nesterov) for the models' parameters, Adam for the selector's."""

    def make(params: list[nn.Parameter]) -> list[torch.optim.Optimizer]:
        policy = ensemble.halting
        selector = {id(p) for p in policy.selector_parameters()} if isinstance(policy, Learned) else set()
        base = [p for p in params if id(p) not in selector]
        chosen = [p for p in params if id(p) in selector]
        made: list[torch.optim.Optimizer] = []
        if base:
            made.append(torch.optim.SGD(base, lr=lr, momentum=momentum, nesterov=momentum > 0,
                                        weight_decay=weight_decay))
        if chosen:
            made.append(torch.optim.Adam(chosen, lr=selector_lr))
        return made

    return make


def step_decay(epochs: int) -> LRScheduleFactory:
    """The learning rate divided by 5 at 30%, 60% and 80% of ``epochs`` (App. A.1.2), stepped per batch."""
    milestones = sorted({max(1, round(f * epochs)) for f in LR_MILESTONES if round(f * epochs) < epochs})

    def make(optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [m * steps_per_epoch for m in milestones], LR_DECAY)

    return make


def _measure_costs(ensemble: Any) -> None:
    ensemble.cost_table()  # measured (and cached) before any member is frozen


def sequential(ensemble: Any, settings: ScheduleSettings, *, selector_lr: float = 1e-3) -> list[Stage]:
    """Algorithm 1: ``T`` stages, stage ``t`` trains
    [`stage_modules()`][ensemblekit.methods.irene.schedule.stage_modules] on members ``1..t``.

    With another loss than IRENE's, each step trains member ``t`` with that
    loss, and a learned selector with its own terms
    ([`Learned.loss`][ensemblekit.components.halting.learned.Learned.loss]).

    Args:
        ensemble: an ensemble with a loss (IRENE's: ``ek.recipes.irene``; any, for a cascade).
        settings: ``epochs`` per step, and the models' SGD ``lr``,
            ``momentum`` and ``weight_decay``.
        selector_lr: Adam learning rate of the selector.
    """
    make = optimizers(ensemble, settings.lr, settings.momentum, settings.weight_decay, selector_lr)
    return [Stage(f"step {t}", settings.epochs, trainable=stage_modules(ensemble, t), members=range(t),
                  optimizer=make, lr_schedule=step_decay(settings.epochs),
                  prepare=_measure_costs if t == 1 else None)
            for t in range(1, ensemble.num_members + 1)]


def irene_schedule(ensemble: Any, settings: ScheduleSettings, *, sequential_steps: bool | None = None,
                   selector_lr: float = 1e-3) -> list[Stage]:
    """IRENE's training for any ensemble: Algorithm 1, or every member at once, with IRENE's optimisers.

    Args:
        ensemble: an ensemble with a loss.
        settings: as [`sequential()`][ensemblekit.methods.irene.schedule.sequential]; ``epochs`` in all when joint.
        sequential_steps: Algorithm 1's steps; ``None``: when the default
            schedule is "sequential" (an ``IreneLoss`` or a cascade, see
            [`default_schedule()`][ensemblekit.core.stages.default_schedule]), else one joint
            stage (an average ensemble trained as IRENE's baselines are).
        selector_lr: Adam learning rate of the selector.
    """
    if sequential_steps is None:
        sequential_steps = default_schedule(ensemble) == "sequential"
    if sequential_steps:
        return sequential(ensemble, settings, selector_lr=selector_lr)
    make = optimizers(ensemble, settings.lr, settings.momentum, settings.weight_decay, selector_lr)
    return [Stage("joint", settings.epochs, trainable=ensemble, optimizer=make,
                  lr_schedule=step_decay(settings.epochs), prepare=_measure_costs)]
