"""Losses of the HNE (Ruiz & Verbeek) and EnsembleNet papers."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ensemblekit.interfaces import EnsembleOutput, LossResult, LossStrategy


class IndependentCE(LossStrategy):
    """L_I: every member trained on the labels alone (HNE Eq. 3).

    ``L_I = sum_n CE(z_n, y)``, CE averaged over the batch.
    """

    def forward(self, output: EnsembleOutput, target: Tensor) -> LossResult:
        members = output.members
        per_member = F.cross_entropy(members.flatten(0, 1), target.repeat_interleave(members.shape[1]),
                                     reduction="none").view(members.shape[:2]).mean(0)
        total = per_member.sum()
        return LossResult(total, {"independent": total.detach()})
