"""Always the same number of members."""

from __future__ import annotations

import torch
from torch import Tensor

from ensemblekit.core.interfaces import HaltingPolicy, HaltingStep

__all__ = ["Fixed"]


class Fixed(HaltingPolicy):
    """Stop every sample after ``members`` members.

    Args:
        members: how many members to evaluate (at least 1).
    """

    def __init__(self, members: int = 1):
        super().__init__()
        if not isinstance(members, int) or members < 1:
            raise ValueError(f"members must be an integer >= 1, got {members!r}")
        self.members = members

    def step(self, step: HaltingStep, state: dict[str, Tensor] | None) -> tuple[Tensor, None]:
        stop = step.index + 1 >= self.members
        return torch.full(step.prediction.shape[:1], stop, dtype=torch.bool, device=step.prediction.device), None
