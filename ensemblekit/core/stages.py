"""Training stages: what one part of a training schedule trains, on which members, how.

A [`Stage`][ensemblekit.core.stages.Stage] says what is trainable (modules, or a predicate on the
parameters), which members are evaluated, which loss and which optimizer
and learning-rate schedule are used, for how many epochs, and what is done
to the ensemble when the stage starts. A *schedule* is a function
``schedule(ensemble, settings, **options) -> list[Stage]`` registered under
a name (`SCHEDULES`, hook
``register_schedules``); [`ensemblekit.training.trainer.train()`][ensemblekit.training.trainer.train] runs the
stages one after the other with its one loop.

Built in: ``"joint"`` ([`joint()`][ensemblekit.core.stages.joint]: everything, one stage),
``"sequential"`` and ``"irene"`` (IRENE's Algorithm 1,
[`ensemblekit.methods.irene.schedule`][ensemblekit.methods.irene.schedule]) and ``"two_phase"`` (IMTA's two
phases, [`ensemblekit.methods.imta.schedule`][ensemblekit.methods.imta.schedule]). Without a schedule named
in the training settings, the loss's ``schedule`` attribute decides, then
the topology (a cascade trains "sequential"; [`default_schedule()`][ensemblekit.core.stages.default_schedule]).

Examples:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 2))
    >>> stage = Stage("last layer", epochs=1, trainable=[net[2]])
    >>> with frozen_except(net, stage.trainable) as freeze:
    ...     [p.requires_grad for p in net.parameters()], net[1].training, len(freeze.parameters)
    ([False, False, False, False, True, True], False, 2)
    >>> [p.requires_grad for p in net.parameters()]  # restored
    [True, True, True, True, True, True]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ensemblekit.core.interfaces import LossStrategy
from ensemblekit.errors import InvalidValueError

__all__ = [
    "Freeze",
    "LRScheduleFactory",
    "OptimizerFactory",
    "Schedule",
    "ScheduleSettings",
    "Stage",
    "Trainable",
    "default_schedule",
    "frozen_except",
    "joint",
    "trainable_parameters",
]

Trainable = nn.Module | Sequence[nn.Module] | Callable[[str, nn.Parameter], bool] | None
"""What a stage trains: ``None`` (everything, flags left as they are), a module or modules (their
parameters), or a predicate ``(qualified parameter name, parameter) -> bool``."""
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer | Sequence[torch.optim.Optimizer]]
"""``(trainable parameters) -> optimizer(s)``: a stage that needs two (IRENE: SGD and Adam) returns both."""
LRScheduleFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler | None]
"""``(optimizer, steps per epoch) -> scheduler or None``; the scheduler is stepped after every batch."""


class ScheduleSettings(Protocol):
    """What a schedule reads from the training settings
    ([`ensemblekit.training.config.TrainConfig`][ensemblekit.training.config.TrainConfig])."""

    epochs: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float


Schedule = Callable[..., list["Stage"]]
"""``schedule(ensemble, settings, **options) -> list[Stage]``, registered in ``SCHEDULES``."""


@dataclass
class Stage:
    """One part of a training schedule, run by
    [`ensemblekit.training.trainer.train()`][ensemblekit.training.trainer.train].

    Attributes:
        name: shown in progress and history, and stored in checkpoints (a
            resume checks that the schedule's stage names are unchanged).
        epochs: passes over the training split in this stage.
        trainable: ``None`` (every parameter, ``requires_grad`` left as it
            is), a module or modules, or a predicate ``(name, parameter) ->
            bool`` evaluated after `prepare` (so it sees modules the
            preparation added). Everything else is frozen for the stage, and
            a module none of whose parameters is trainable is in eval mode
            (BatchNorm statistics and dropout fixed); see [`frozen_except()`][ensemblekit.core.stages.frozen_except].
        members: indices of the members evaluated in the forward pass (the
            loss sees only these); ``None``: all.
        loss: the loss from this stage on (it replaces the ensemble's
            ``loss_strategy``, and stays after the stage); ``None``: keep it.
        optimizer: ``(trainable parameters) -> optimizer(s)``; ``None``: the
            trainer's (``TrainConfig.optimizer``, ``lr``, ...). Optimizers are
            created anew at the start of every stage.
        lr_schedule: ``(optimizer, steps per epoch) -> scheduler or None``,
            called for each optimizer and stepped after every batch; ``None``:
            the trainer's (``TrainConfig.schedule`` over this stage's epochs)
            when ``optimizer`` is ``None`` too, else a constant rate.
        prepare: ``(ensemble) -> None``, run when the stage starts (before
            anything is frozen), e.g. to add modules. A resumed run calls the
            preparations of the stages before the checkpoint again, on the
            freshly built ensemble, before loading the weights: a preparation
            must build the same modules whatever the weights.
    """

    name: str
    epochs: int
    trainable: Trainable = None
    members: Sequence[int] | None = None
    loss: LossStrategy | None = None
    optimizer: OptimizerFactory | None = None
    lr_schedule: LRScheduleFactory | None = None
    prepare: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InvalidValueError(f"a stage needs a non-empty name, got {self.name!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise InvalidValueError(f"stage {self.name!r}: epochs must be an integer >= 1, got {self.epochs!r}")
        if self.members is not None:
            self.members = list(self.members)


def trainable_parameters(module: nn.Module, trainable: Trainable) -> list[nn.Parameter]:
    """The parameters of ``module`` that ``trainable`` selects, in ``module.parameters()`` order."""
    if trainable is None:
        return list(module.parameters())
    if isinstance(trainable, nn.Module):
        trainable = [trainable]
    if callable(trainable):
        predicate = trainable
        return [p for name, p in module.named_parameters() if predicate(name, p)]
    ids = {id(p) for m in trainable for p in m.parameters()}
    return [p for p in module.parameters() if id(p) in ids]


class Freeze:
    """What [`frozen_except()`][ensemblekit.core.stages.frozen_except] yields: the trainable parameters, and
    [`train()`][ensemblekit.core.stages.Freeze.train] to re-apply the modes."""

    def __init__(self, module: nn.Module, parameters: list[nn.Parameter], everything: bool):
        self.module = module
        self.parameters = parameters
        self._ids = None if everything else {id(p) for p in parameters}

    def train(self) -> None:
        """Train mode for the module, eval mode for every submodule none of whose parameters trains."""
        self.module.train()
        if self._ids is None:
            return
        for m in self.module.modules():
            params = list(m.parameters())
            if params and not any(id(p) in self._ids for p in params):
                m.eval()


@contextmanager
def frozen_except(module: nn.Module, trainable: Trainable) -> Iterator[Freeze]:
    """Freeze every parameter of ``module`` but those ``trainable`` selects (IRENE Algorithm 1's freezing).

    Frozen parameters get ``requires_grad=False``; a submodule none of
    whose parameters trains is put in eval mode (batch-norm statistics stay
    as they are); the rest is in train mode. ``trainable=None`` freezes
    nothing and leaves the flags as they are. Flags and modes are restored
    on exit.

    Args:
        module: the ensemble (any module).
        trainable: see `Stage.trainable`.

    Yields:
        A [`Freeze`][ensemblekit.core.stages.Freeze] with the trainable parameters; its ``train()``
        re-applies the modes (after something called ``module.train()``).
    """
    parameters = trainable_parameters(module, trainable)
    everything = trainable is None
    flags = {p: p.requires_grad for p in module.parameters()}
    modes = {m: m.training for m in module.modules()}
    freeze = Freeze(module, parameters, everything)
    try:
        if not everything:
            chosen = {id(p) for p in parameters}
            for p in module.parameters():
                p.requires_grad_(id(p) in chosen)
        freeze.train()
        yield freeze
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode


def joint(ensemble: Any, settings: ScheduleSettings) -> list[Stage]:
    """The plain schedule: every member and parameter trained together for ``settings.epochs`` epochs.

    One stage with the ensemble's loss and the trainer's optimizer and
    learning-rate schedule: what [`ensemblekit.training.trainer.train()`][ensemblekit.training.trainer.train]
    always did.
    """
    return [Stage("joint", settings.epochs)]


def default_schedule(ensemble: Any) -> str:
    """The schedule a model trains with when the settings name none.

    Its loss's ``schedule`` ([`IreneLoss`][ensemblekit.components.losses.IreneLoss]
    says ``"sequential"``, IRENE's Algorithm 1, unless it was built with
    ``schedule="joint"``); else ``"sequential"`` for a ``sequential``
    topology (a cascade, trained member by member whatever the loss); else ``"joint"``.
    """
    schedule = getattr(getattr(ensemble, "loss_strategy", None), "schedule", None)
    if isinstance(schedule, str) and schedule:
        return schedule
    return "sequential" if getattr(getattr(ensemble, "topology", None), "sequential", False) else "joint"
