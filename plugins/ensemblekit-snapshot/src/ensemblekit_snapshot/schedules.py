"""Snapshot Ensembles and FGE as ensemblekit training schedules: one network trained, one member per cycle.

Both methods train a single network with a cyclic learning rate and keep a
copy of its weights (a *snapshot*) once per cycle, where the rate is lowest;
the snapshots are the ensemble's members:

* Snapshot Ensembles (Huang et al., "Snapshot Ensembles: Train 1, get M for
  free", ICLR 2017): cyclic cosine annealing, Eq. 2,
  ``alpha(t) = alpha0 / 2 * (cos(pi * mod(t - 1, ceil(T / M)) / ceil(T / M)) + 1)``
  for iteration ``t = 1..T`` of ``M`` cycles; a snapshot at the end of every cycle
  ([`snapshot_lr()`][ensemblekit_snapshot.schedules.snapshot_lr]).
* Fast Geometric Ensembling (Garipov et al., "Loss Surfaces, Mode
  Connectivity, and Fast Ensembling of DNNs", NeurIPS 2018, Sec. 5): from a
  network trained as usual, a piecewise-linear cyclic rate with
  ``t(i) = (mod(i - 1, c) + 1) / c``,
  ``alpha(i) = (1 - 2 t(i)) alpha1 + 2 t(i) alpha2`` for ``t(i) <= 1/2`` and
  ``(2 - 2 t(i)) alpha2 + (2 t(i) - 1) alpha1`` after, cycle length ``c`` (even)
  in iterations; a snapshot at the middle of every cycle, where the rate is
  ``alpha2`` ([`fge_lr()`][ensemblekit_snapshot.schedules.fge_lr]).

The ensemble is an ordinary one whose members share nothing (``topology =
"independent"``). The schedule has one [`Stage`][ensemblekit.core.stages.Stage]
per snapshot: stage ``s`` trains member ``p(s)`` alone (its nodes and head;
only it is evaluated, so a step costs one network) and ends at snapshot
``s``; stage ``s > 0`` first copies member ``p(s - 1)`` into member ``p(s)``
(weights and BatchNorm statistics), so training goes on from the previous
snapshot and member ``p(s)`` holds snapshot ``s`` when the run ends. The
learning rate of every stage is the paper's, computed from the iteration
counted over the whole cyclic run ([`CyclicLR`][ensemblekit_snapshot.schedules.CyclicLR]).

``order`` decides ``p``: ``"newest_first"`` (default) puts the last snapshot
in member 0, so that every anytime prefix of ``k`` members is the ensemble of
the last ``k`` snapshots, the ensembles the Snapshot paper reports;
``"oldest_first"`` puts snapshot ``k`` in member ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from ensemblekit.core.stages import LRScheduleFactory, ScheduleSettings, Stage
from ensemblekit.errors import InvalidValueError

__all__ = [
    "FGE_LOW_RATIO",
    "ORDERS",
    "CyclicLR",
    "copy_member",
    "fge",
    "fge_lr",
    "member_modules",
    "snapshot",
    "snapshot_lr",
    "training_order",
]

ORDERS = ("newest_first", "oldest_first")
"""Where the snapshots go: the last one in member 0 (``newest_first``), or snapshot ``k`` in member ``k``."""
FGE_LOW_RATIO = 0.002
"""FGE's default ``alpha2 / alpha1``: the authors' code defaults, ``lr_1 = 0.05`` and ``lr_2 = 0.0001``."""


# ------------------------------------------------------------------ learning rates
def snapshot_lr(t: int, lr: float, total: int, cycles: int) -> float:
    """Snapshot Ensembles' Eq. 2: the learning rate of iteration ``t`` (1-based).

    ``alpha(t) = alpha0 / 2 * (cos(pi * mod(t - 1, ceil(T / M)) / ceil(T / M)) + 1)``
    with ``alpha0 = lr``, ``T = total`` iterations and ``M = cycles``.

    Example:
        >>> [round(snapshot_lr(t, 0.2, total=8, cycles=2), 4) for t in range(1, 9)]
        [0.2, 0.1707, 0.1, 0.0293, 0.2, 0.1707, 0.1, 0.0293]
    """
    length = math.ceil(total / cycles)
    return lr / 2 * (math.cos(math.pi * ((t - 1) % length) / length) + 1)


def fge_lr(i: int, lr_high: float, lr_low: float, cycle: int) -> float:
    """FGE's cyclic learning rate (Garipov et al., 2018, Sec. 5) at iteration ``i`` (1-based).

    ``t(i) = (mod(i - 1, c) + 1) / c``; ``alpha(i) = (1 - 2 t(i)) alpha1 + 2 t(i) alpha2``
    for ``0 < t(i) <= 1/2``, else ``(2 - 2 t(i)) alpha2 + (2 t(i) - 1) alpha1``, with
    ``alpha1 = lr_high``, ``alpha2 = lr_low`` and ``c = cycle`` iterations. The rate
    reaches ``alpha2`` at ``t(i) = 1/2``, the middle of a cycle, and ``alpha1`` at its end.

    Example:
        >>> [fge_lr(i, 1.0, 0.0, cycle=4) for i in range(1, 9)]
        [0.5, 0.0, 0.5, 1.0, 0.5, 0.0, 0.5, 1.0]
    """
    t = ((i - 1) % cycle + 1) / cycle
    if t <= 0.5:
        return (1 - 2 * t) * lr_high + 2 * t * lr_low
    return (2 - 2 * t) * lr_low + (2 * t - 1) * lr_high


RATES: dict[str, Callable[..., float]] = {"snapshot": snapshot_lr, "fge": fge_lr}


class CyclicLR(torch.optim.lr_scheduler.LRScheduler):
    """Sets every parameter group's rate to ``snapshot_lr`` or ``fge_lr`` of the run-wide iteration.

    Stepped after every batch (as the trainer does): the ``j``-th optimizer
    step (0-based) after construction uses the rate of iteration
    ``offset + j + 1``. The state is a few plain numbers, so the trainer's
    JSON checkpoints hold it and a resumed run continues the same curve.

    Args:
        optimizer: the stage's optimizer.
        shape: "snapshot" ([`snapshot_lr()`][ensemblekit_snapshot.schedules.snapshot_lr]) or "fge"
            ([`fge_lr()`][ensemblekit_snapshot.schedules.fge_lr]).
        offset: iterations of the cyclic run before this scheduler's first step.
        **params: the other arguments of the rate function (``lr``, ``total``,
            ``cycles``; or ``lr_high``, ``lr_low``, ``cycle``).

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> sched = CyclicLR(opt, "fge", offset=1, lr_high=1.0, lr_low=0.0, cycle=4)
        >>> opt.param_groups[0]["lr"]  # iteration 2: the middle of the first cycle
        0.0
    """

    def __init__(self, optimizer: torch.optim.Optimizer, shape: str, offset: int = 0, **params: Any):
        if shape not in RATES:
            raise InvalidValueError(f"shape must be one of {', '.join(RATES)}, got {shape!r}")
        self.shape = shape
        self.offset = int(offset)
        self.params = dict(params)
        super().__init__(optimizer)

    def rate(self, iteration: int) -> float:
        """The learning rate of ``iteration`` (1-based, counted over the whole cyclic run)."""
        return RATES[self.shape](iteration, **self.params)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        rate = self.rate(self.offset + self.last_epoch + 1)
        return [rate for _ in self.optimizer.param_groups]


# ------------------------------------------------------------------ members
def training_order(ensemble: Any, order: str = "newest_first") -> list[int]:
    """The member trained in each stage: ``p(0), p(1), ...`` (see the module's docstring).

    Raises:
        ValueError: ``order`` is unknown, or two members share a node (a tree or
            a multi-branch ensemble): each snapshot needs weights of its own.
    """
    if order not in ORDERS:
        raise InvalidValueError(f"order must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")
    graph = ensemble.graph
    owner: dict[int, int] = {}
    for member in graph.members:
        for node in member.path:
            if node in owner:
                raise InvalidValueError(
                    f"members {owner[node]} and {member.index} share node {node}: snapshot and FGE schedules need "
                    "members that share nothing, one per snapshot (topology 'independent', e.g. "
                    "ek.wrap(model, 'independent', members=5) or topology = { name = \"independent\", members = 5 })")
            owner[node] = member.index
    members = list(range(graph.num_members))
    return members[::-1] if order == "newest_first" else members


def member_modules(ensemble: Any, member: int) -> list[nn.Module]:
    """The modules that hold member ``member``'s weights: the nodes on its path and its head."""
    path = ensemble.graph.members[member].path
    return [ensemble.nodes[i] for i in path] + [ensemble.heads[member]]


@torch.no_grad()
def copy_member(ensemble: Any, source: int, target: int) -> None:
    """Copy member ``source``'s weights and buffers (BatchNorm statistics) into member ``target``.

    Raises:
        ValueError: the two members are not built alike (the copy would not fit).
    """
    sources, targets = member_modules(ensemble, source), member_modules(ensemble, target)
    if len(sources) != len(targets):
        raise InvalidValueError(f"members {source} and {target} have paths of different lengths: they cannot hold the "
                                "same network")
    for src, dst in zip(sources, targets):
        try:
            dst.load_state_dict(src.state_dict())
        except RuntimeError as err:
            raise InvalidValueError(f"member {source} cannot be copied into member {target}: they are not built alike "
                                    f"({' '.join(str(err).split())[:300]})") from err


# ------------------------------------------------------------------ schedules
def snapshot(ensemble: Any, settings: ScheduleSettings, *, lr: float | None = None,
             order: Literal["newest_first", "oldest_first"] = "newest_first") -> list[Stage]:
    """Snapshot Ensembles: ``M`` cosine cycles of ``settings.epochs`` epochs each, a member per cycle.

    ``M`` is the number of members. Stage ``s`` ("cycle s+1") trains member
    ``p(s)`` for ``settings.epochs`` epochs with Eq. 2's rate
    ([`snapshot_lr()`][ensemblekit_snapshot.schedules.snapshot_lr]) of the run's iterations ``t``,
    ``T = M * settings.epochs * steps per epoch``, so each cycle is
    ``ceil(T / M)`` iterations and ends at a snapshot. Stage ``s > 0`` starts
    from member ``p(s - 1)``'s weights. The optimizer is the trainer's
    (``train.optimizer``, ``momentum``, ``nesterov``, ``weight_decay``), made
    anew at each cycle; the loss is the ensemble's, on member ``p(s)`` alone
    (``"independent"``: the cross-entropy the paper trains with).

    Args:
        ensemble: an ensemble whose members share nothing (``"independent"``).
        settings: ``epochs`` per cycle (the paper's ``T / M`` in epochs: a
            budget of ``B`` epochs is ``epochs = B / M``), and the optimizer's settings.
        lr: ``alpha0``, the rate at the start of every cycle (default ``settings.lr``;
            the paper: 0.1 or 0.2).
        order: ``"newest_first"`` (member 0 is the last snapshot) or
            ``"oldest_first"`` (member ``k`` is snapshot ``k``).
    """
    members = training_order(ensemble, order)
    alpha0 = _rate("lr", settings.lr if lr is None else lr)
    cycles, epochs = len(members), settings.epochs

    def rates(cycle: int) -> LRScheduleFactory:
        def make(optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> CyclicLR:
            length = epochs * steps_per_epoch  # ceil(T / M) iterations, T = M * length
            return CyclicLR(optimizer, "snapshot", offset=cycle * length, lr=alpha0, total=cycles * length,
                            cycles=cycles)

        return make

    return [Stage(f"cycle {s + 1}", epochs, trainable=member_modules(ensemble, m), members=[m],
                  lr_schedule=rates(s), prepare=_continue_from(members, s))
            for s, m in enumerate(members)]


def fge(ensemble: Any, settings: ScheduleSettings, *, cycle_epochs: int = 4, lr_high: float | None = None,
        lr_low: float | None = None, order: Literal["newest_first", "oldest_first"] = "newest_first") -> list[Stage]:
    """Fast Geometric Ensembling: a first training, then ``M`` cyclic-rate snapshots, one per cycle.

    Stage "pretrain" trains member ``p(0)`` for ``settings.epochs`` epochs with
    the trainer's optimizer and learning-rate schedule (``train.schedule``):
    FGE starts from a network trained as usual. Then the cyclic rate
    ([`fge_lr()`][ensemblekit_snapshot.schedules.fge_lr]) with ``c = cycle_epochs * steps per
    epoch`` iterations, counted from the end of the first training: stage
    "cycle 1" trains member ``p(0)`` for the first half cycle, down to
    ``alpha2`` (snapshot 0); stage "cycle s+1" copies member ``p(s - 1)`` into
    member ``p(s)`` and trains it for a whole cycle, from ``alpha2`` up to
    ``alpha1`` and down to ``alpha2`` again (snapshot ``s``). In all,
    ``settings.epochs + cycle_epochs / 2 + (M - 1) * cycle_epochs`` epochs (the
    paper runs the last half cycle too, which makes no snapshot). The
    optimizer is the trainer's, made anew at each stage; the loss is the
    ensemble's, on the trained member alone.

    Args:
        ensemble: an ensemble whose members share nothing (``"independent"``).
        settings: ``epochs`` of the first training, its optimizer and schedule.
        cycle_epochs: ``c`` in epochs, even (the snapshots fall at the middle
            of cycles, on epoch ends); the paper: 2 to 4, the authors' code 4.
        lr_high: ``alpha1`` (default ``settings.lr``).
        lr_low: ``alpha2 < alpha1`` (default ``alpha1 * 0.002``, the ratio of the
            authors' code defaults 0.05 and 0.0001).
        order: ``"newest_first"`` or ``"oldest_first"`` (see ``snapshot``).
    """
    members = training_order(ensemble, order)
    if isinstance(cycle_epochs, bool) or not isinstance(cycle_epochs, int) or cycle_epochs < 2 or cycle_epochs % 2:
        raise InvalidValueError(f"cycle_epochs must be an even integer >= 2 (a snapshot falls at the middle of every "
                                f"cycle, on an epoch end), got {cycle_epochs!r}")
    alpha1 = _rate("lr_high", settings.lr if lr_high is None else lr_high)
    alpha2 = alpha1 * FGE_LOW_RATIO if lr_low is None else lr_low
    if not (isinstance(alpha2, (int, float)) and 0 <= alpha2 < alpha1):
        raise InvalidValueError(f"lr_low (alpha2) must be >= 0 and below lr_high (alpha1 = {alpha1}), got {lr_low!r}")
    half = cycle_epochs // 2

    def rates(start_epoch: int) -> LRScheduleFactory:
        def make(optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> CyclicLR:
            return CyclicLR(optimizer, "fge", offset=start_epoch * steps_per_epoch, lr_high=alpha1,
                            lr_low=float(alpha2), cycle=cycle_epochs * steps_per_epoch)

        return make

    first = members[0]
    stages = [Stage("pretrain", settings.epochs, trainable=member_modules(ensemble, first), members=[first])]
    for s, m in enumerate(members):
        start = 0 if s == 0 else half + (s - 1) * cycle_epochs  # epochs of the cyclic run before this stage
        stages.append(Stage(f"cycle {s + 1}", half if s == 0 else cycle_epochs,
                            trainable=member_modules(ensemble, m), members=[m], lr_schedule=rates(start),
                            prepare=_continue_from(members, s)))
    return stages


def _continue_from(members: list[int], stage: int) -> Callable[[Any], None] | None:
    """Stage ``stage``'s preparation: start from the member the previous stage trained (none for the first)."""
    if stage == 0:
        return None
    return partial(copy_member, source=members[stage - 1], target=members[stage])


def _rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise InvalidValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _example_options() -> dict[str, Any]:
    """An ensemble the conformance checks (``ensemblekit.testing.check_schedule``) run the schedules on."""
    from ensemblekit.build import wrap
    from ensemblekit.testing import toy_split

    return {"ensemble": wrap(toy_split(2), "independent", members=3, aggregator="mean_probs", loss="independent")}


snapshot.example_options = _example_options  # type: ignore[attr-defined]
fge.example_options = lambda: {**_example_options(), "cycle_epochs": 2}  # type: ignore[attr-defined]
