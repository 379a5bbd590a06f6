"""Always the same number of members."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ensemblekit.core.interfaces import HaltingPolicy, HaltingStep
from ensemblekit.errors import InvalidValueError

__all__ = ["Fixed"]


class Fixed(HaltingPolicy):
    """Stop every sample after ``members`` members.

    Args:
        members: how many members to evaluate (at least 1).
    """

    def __init__(self, members: int = 1):
        super().__init__()
        if isinstance(members, bool) or not isinstance(members, int) or members < 1:
            raise InvalidValueError(f"members must be an integer >= 1, got {members!r}")
        self.members = members

    def bind(self, ensemble: Any) -> None:
        """Refuse more members than the ensemble has."""
        if self.members > ensemble.num_members:
            raise InvalidValueError(f"Fixed(members={self.members}) asks for more members than the ensemble's "
                                    f"{ensemble.num_members}")

    def step(self, step: HaltingStep, state: dict[str, Tensor] | None) -> tuple[Tensor, None]:
        stop = step.index + 1 >= self.members
        return torch.full(step.prediction.shape[:1], stop, dtype=torch.bool, device=step.prediction.device), None
