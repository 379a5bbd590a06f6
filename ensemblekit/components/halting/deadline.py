"""Stop the whole batch before a member that would pass a wall-clock deadline."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ensemblekit.core.anytime import overruns
from ensemblekit.core.interfaces import HaltingPolicy, HaltingStep


class Deadline(HaltingPolicy):
    """Anytime inference with a deadline, for a whole batch, as a halting policy.

    Same semantics as ``ensemble.anytime(x, deadline=seconds)`` (see
    :mod:`ensemblekit.core.anytime`): after member ``k`` the batch goes on only
    if member ``k+1`` is predicted to finish in time, its time being the
    seconds per FLOP measured on this batch times the FLOPs it adds. Every
    sample stops at the same step, so :meth:`Ensemble.predict` drops no sample
    before the end.

    Args:
        seconds: wall-clock budget per batch, counted from the start of
            :meth:`~ensemblekit.Ensemble.predict`'s first member.

    Examples:
        >>> result = ens.predict(x, halting=ek.halting.Deadline(0.05))  # doctest: +SKIP
    """

    step_inputs: ClassVar[frozenset[str]] = frozenset({"seconds"})

    def __init__(self, seconds: float):
        super().__init__()
        if not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise ValueError(f"seconds must be a number >= 0, got {seconds!r}")
        self.seconds = float(seconds)
        self.prefix_flops: list[int] = []

    @classmethod
    def example_options(cls) -> dict[str, Any]:
        """Options for :mod:`ensemblekit.testing`: a budget no test reaches (deterministic)."""
        return {"seconds": 3600.0}

    def bind(self, ensemble) -> None:
        """Read the FLOPs of every prefix of ``ensemble`` (cached by the ensemble)."""
        self.prefix_flops = [row.flops for row in ensemble.cost_table()]

    def step(self, step: HaltingStep, state: dict[str, Tensor] | None) -> tuple[Tensor, None]:
        if len(self.prefix_flops) != step.num_members:
            raise ValueError("Deadline was not bound to this ensemble; use it through Ensemble.predict")
        batch = step.prediction.shape[0]
        last = step.index + 1 >= step.num_members
        stop = last
        if not last:
            elapsed = float(step.extras["seconds"].max())
            flops = self.prefix_flops
            stop = overruns(self.seconds, elapsed, elapsed, flops[step.index],
                            flops[step.index + 1] - flops[step.index])
        return torch.full((batch,), stop, dtype=torch.bool, device=step.prediction.device), None
