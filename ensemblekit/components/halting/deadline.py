"""Stop the whole batch before a member that would pass a wall-clock deadline."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ensemblekit.core.interfaces import HaltingPolicy, HaltingStep
from ensemblekit.core.timing import DeadlineTimer
from ensemblekit.errors import InvalidValueError

__all__ = ["Deadline"]


class Deadline(HaltingPolicy):
    """Anytime inference with a deadline, for a whole batch, as a halting policy.

    The rule of ``ensemble.anytime(x, deadline=seconds)``, applied by the
    same [`DeadlineTimer`][ensemblekit.core.timing.DeadlineTimer]: after member ``k``
    the batch goes on only if ``elapsed + rate * flops(k+1) <= seconds``,
    ``flops(k+1)`` the FLOPs member ``k+1`` adds and ``rate`` the seconds per
    FLOP of the members computed so far on this batch. As in anytime
    inference, ``rate`` counts compute time only (from a member's start to
    its prediction), while ``elapsed`` also counts the time between members
    (this policy's own steps). Every sample stops at the same step, so
    [`Ensemble.predict()`][ensemblekit.core.ensemble.Ensemble.predict] drops no sample before the end.

    Args:
        seconds: wall-clock budget per batch, counted from the start of
            [`predict()`][ensemblekit.core.ensemble.Ensemble.predict]'s first member.

    Examples:
        >>> result = ens.predict(x, halting=ek.halting.Deadline(0.05))  # doctest: +SKIP
    """

    step_inputs: ClassVar[frozenset[str]] = frozenset({"seconds"})

    def __init__(self, seconds: float):
        super().__init__()
        if not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise InvalidValueError(f"seconds must be a number >= 0, got {seconds!r}")
        self.seconds = float(seconds)
        self.prefix_flops: list[int] = []

    @classmethod
    def example_options(cls) -> dict[str, Any]:
        """Options for [`ensemblekit.testing`][ensemblekit.testing]: a budget no test reaches (deterministic)."""
        return {"seconds": 3600.0}

    def bind(self, ensemble) -> None:
        """Read the FLOPs of every prefix of ``ensemble`` (cached by the ensemble)."""
        self.prefix_flops = [row.flops for row in ensemble.cost_table()]

    def step(self, step: HaltingStep, state: dict[str, Any] | None) -> tuple[Tensor, dict[str, Any]]:
        if len(self.prefix_flops) != step.num_members:
            raise InvalidValueError("Deadline was not bound to this ensemble; use it through Ensemble.predict")
        device = step.prediction.device
        ready = float(step.extras["seconds"].max())  # member `index` is ready, on predict's clock
        if state is None:  # the first member: it began when predict's clock started
            timer = DeadlineTimer(self.seconds, device, elapsed=ready)
        else:
            timer = state["timer"]
        timer.end(ready)
        stop = step.index + 1 >= step.num_members
        if not stop:
            flops = self.prefix_flops
            stop = timer.overruns(timer.begin(), flops[step.index], flops[step.index + 1] - flops[step.index])
        batch = step.prediction.shape[0]
        return torch.full((batch,), stop, dtype=torch.bool, device=device), {"timer": timer}
