"""Losses of multi-exit networks: MSDNet's weighted sum (IMTA Eq. 1) and One-for-all KD (IMTA Eq. 7-8).

Notation: ``z_1..z_n`` the exits' logits in depth order, ``y`` labels,
``sg`` stop-gradient, ``CE`` cross-entropy averaged over the batch,
``KD_T(s, t) = T^2 * mean_batch KL(softmax(t / T) || softmax(s / T))``
([`ensemblekit.functional.kd_loss()`][ensemblekit.functional.kd_loss]).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from ensemblekit.core.interfaces import EnsembleOutput, LossResult, LossStrategy
from ensemblekit.errors import InvalidValueError
from ensemblekit.functional import kd_loss, member_cross_entropy

__all__ = ["MultiExitLoss"]


class MultiExitLoss(LossStrategy):
    """``L = sum_k w_k L_k`` over the exits, with ``L_k = CE(z_k, y)`` (IMTA Eq. 1, MSDNet).

    With ``ofa=True`` every exit but the last is also distilled from the last
    one (One-for-all KD, IMTA Eq. 7-8):
    ``L_k = (1 - alpha) CE(z_k, y) + alpha KD_T(z_k, sg(z_n))`` for ``k < n``;
    the last exit keeps ``L_n = CE(z_n, y)``. As in the HNE losses,
    ``alpha`` is the weight of the distillation term; the paper's Eq. 7
    writes ``L_i = a CE_i + (1 - a) KLD_i``, so its ``a`` is ``1 - alpha`` here.

    Args:
        weights: ``w_k``, one per exit (default all 1, as in MSDNet).
        ofa: add One-for-all knowledge distillation.
        alpha: weight of the distillation term in ``L_k`` (Eq. 7), in [0, 1].
            The default 0.1 is ``gamma = 0.1`` of the authors' released run script.
        temperature: ``T`` of the soft targets; the default 1.0 is the
            authors' released run script's.
        ce_weight: deprecated: the weight of the cross-entropy, what ``alpha``
            meant before (``alpha = 1 - ce_weight``; a ``DeprecationWarning``).
    """

    def __init__(self, weights: Sequence[float] | None = None, ofa: bool = False, alpha: float = 0.1,
                 temperature: float = 1.0, *, ce_weight: float | None = None):
        super().__init__()
        if ce_weight is not None:
            if not 0.0 <= ce_weight <= 1.0:
                raise InvalidValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
            warnings.warn("MultiExitLoss(ce_weight=w) is deprecated: alpha is now the weight of the distillation "
                          "term, as in the other losses; pass alpha=1 - w", DeprecationWarning, stacklevel=2)
            alpha = 1.0 - ce_weight
        if not 0.0 <= alpha <= 1.0:
            raise InvalidValueError(f"alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            raise InvalidValueError(f"temperature must be > 0, got {temperature}")
        if weights is not None and (len(weights) == 0 or min(weights) < 0):
            raise InvalidValueError(f"weights must be non-negative numbers, one per exit, got {weights}")
        self.weights = None if weights is None else [float(w) for w in weights]
        self.ofa = ofa
        self.alpha = float(alpha)
        self.temperature = float(temperature)

    def forward(self, output: EnsembleOutput, target: Tensor) -> LossResult:
        members = output.members
        n = members.shape[1]
        if self.weights is not None and len(self.weights) != n:
            raise InvalidValueError(f"MultiExitLoss has {len(self.weights)} weights but the ensemble has {n} exits")
        weights = members.new_tensor(self.weights if self.weights is not None else [1.0] * n)
        ce = member_cross_entropy(members, target)
        parts = {f"ce_{k}": ce[k].detach() for k in range(n)}
        per_exit = ce
        if self.ofa and n > 1:
            teacher = members[:, -1].detach()
            kd = torch.stack([kd_loss(members[:, k], teacher, self.temperature) for k in range(n - 1)])
            per_exit = torch.cat([(1 - self.alpha) * ce[:-1] + self.alpha * kd, ce[-1:]])
            parts.update({f"kd_{k}": kd[k].detach() for k in range(n - 1)})
        total = (weights * per_exit).sum()
        parts["multi_exit"] = total.detach()
        return LossResult(total, parts)
