"""Losses of the HNE (Ruiz & Verbeek) and EnsembleNet (Lee et al.) papers.

Notation: ``z_1..z_N`` member logits in anytime order, ``y`` labels,
``ybar_k`` the ensemble's aggregator applied to the first ``k`` members,
``sg`` stop-gradient, ``CE`` cross-entropy averaged over the batch and
``KD_T(s, t) = T^2 * mean_batch KL(softmax(t / T) || softmax(s / T))``
([`ensemblekit.functional.kd_loss()`][ensemblekit.functional.kd_loss]; ``T`` is the ``temperature`` option).

The nested losses use the topology's nested sub-ensemble sizes
(`nested_sizes`): ``1, k, k^2,
.., k^B`` for a tree of branching ``k`` (HNE's sub-trees), ``1..N`` for
chains, cascades and independent members (every prefix is a nested
ensemble), ``1`` and ``N`` for a multi-branch network.

KD uses the KL divergence; the papers write a cross-entropy against the soft
targets, which differs by the targets' entropy, a constant under the
stop-gradient: gradients are the same.

``alpha`` is the weight of the distillation term in every loss that has one
(here and in [`MultiExitLoss`][ensemblekit.components.losses.MultiExitLoss]).
"""

from __future__ import annotations

import warnings
from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from ensemblekit.core.interfaces import EnsembleOutput, LossResult, LossStrategy
from ensemblekit.errors import InvalidValueError
from ensemblekit.functional import kd_loss
from ensemblekit.functional import member_cross_entropy as member_ce

__all__ = [
    "CoDistillation",
    "EnsembleNetCoDistillation",
    "EnsembleNetEnsembling",
    "HierarchicalDistillation",
    "IndependentCE",
    "IndependentNestedCE",
    "NestedCE",
    "kd_loss",
    "member_ce",
]


def _renamed_keyword(old: str, new: str, value: float, owner: str) -> float:
    """``value``, given under the deprecated keyword ``old``, with a ``DeprecationWarning`` naming ``new``."""
    warnings.warn(f"{owner}({old}=...) is deprecated; pass {new}=... instead", DeprecationWarning, stacklevel=3)
    return value


def _nested_predictions(output: EnsembleOutput, sizes: tuple[int, ...]) -> list[Tensor]:
    """``[ybar_s for s in sizes]`` from one pass over the prefixes."""
    prefixes = output.prefixes()
    return [prefixes[:, s - 1] for s in sizes]


def _check_unit(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise InvalidValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_positive(name: str, value: float) -> float:
    if not value > 0:
        raise InvalidValueError(f"{name} must be > 0, got {value}")
    return float(value)


class IndependentCE(LossStrategy):
    """L_I: every member trained on the labels alone (HNE AAAI Eq. 3, arXiv Eq. 9).

    ``L_I = sum_n CE(z_n, y)``.
    """

    def forward(self, output: EnsembleOutput, target: Tensor) -> LossResult:
        total = member_ce(output.members, target).sum()
        return LossResult(total, {"independent": total.detach()})


class NestedCE(LossStrategy):
    """L_S / L_H: cross-entropy of every nested sub-ensemble (HNE AAAI Eq. 4, arXiv Eq. 10).

    ``L_S = sum_{s in nested sizes} CE(ybar_s, y)``; for a tree the sizes are
    ``1, k, .., k^B`` (one term per sub-tree level ``b = 0..B``); chains,
    cascades and independent members use every prefix ``1..N``, a
    multi-branch network ``1`` and ``N``.
    """

    trains_through_aggregate = True

    def forward(self, output: EnsembleOutput, target: Tensor) -> LossResult:
        sizes = output.nested_sizes
        terms = [F.cross_entropy(p, target) for p in _nested_predictions(output, sizes)]
        total = torch.stack(terms).sum()
        parts = {"nested": total.detach()}
        parts.update({f"nested_{s}": t.detach() for s, t in zip(sizes, terms)})
        return LossResult(total, parts)


class IndependentNestedCE(LossStrategy):
    """L_I + L_S: the sum of both (HNE arXiv Table 1, row "L_I + L_H").

    ``L = sum_n CE(z_n, y) + sum_{s in nested sizes} CE(ybar_s, y)``.
    """

    trains_through_aggregate = True

    def __init__(self) -> None:
        super().__init__()
        self.independent = IndependentCE()
        self.nested = NestedCE()

    def forward(self, output: EnsembleOutput, target: Tensor) -> LossResult:
        a = self.independent(output, target)
        b = self.nested(output, target)
        return LossResult(a.total + b.total, {**a.parts, **b.parts})


class _Distillation(LossStrategy):
    """``L = (1 - alpha) L_I + alpha * distillation``, the form of HNE's L_D and L_HD.

    Args:
        alpha: weight of the distillation term, in [0, 1] (paper: 0.5).
        temperature: softmax temperature ``T`` of student and teacher (paper: 2).
        T: deprecated name of ``temperature`` (a ``DeprecationWarning``; it wins over ``temperature``).
    """

    part = "distillation"

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0, *, T: float | None = None):
        super().__init__()
        if T is not None:
            temperature = _renamed_keyword("T", "temperature", T, type(self).__name__)
        self.alpha = _check_unit("alpha", alpha)
        self.temperature = _check_positive("temperature", temperature)

    @property
    def T(self) -> float:  # noqa: N802  (the deprecated name)
        """Deprecated name of `temperature`."""
        warnings.warn(f"{type(self).__name__}.T is deprecated; use .temperature", DeprecationWarning, stacklevel=2)
        return self.temperature

    def forward(self, output: EnsembleOutput, target: Tensor) -> LossResult:
        independent = member_ce(output.members, target).sum()
        distill = self.distillation(output)
        total = (1 - self.alpha) * independent + self.alpha * distill
        return LossResult(total, {"independent": independent.detach(), self.part: distill.detach()})

    @abstractmethod
    def distillation(self, output: EnsembleOutput) -> Tensor:
        """The distillation term (a scalar)."""


class CoDistillation(_Distillation):
    """L_D: every member distilled from the full ensemble (HNE AAAI Eq. 5, arXiv Eq. 11).

    ``L = (1 - alpha) L_I + alpha sum_n KD_T(z_n, sg(ybar_N))``.

    Args:
        alpha: weight of the distillation term, in [0, 1] (paper: 0.5).
        temperature: softmax temperature ``T`` of student and teacher (paper: 2).
        T: deprecated name of ``temperature``.
    """

    def distillation(self, output: EnsembleOutput) -> Tensor:
        teacher = output.ensemble().detach()
        terms = [kd_loss(output.members[:, n], teacher, self.temperature) for n in range(output.num_members)]
        return torch.stack(terms).sum()


class HierarchicalDistillation(_Distillation):
    """L_HD: every smaller nested ensemble distilled from the full one (HNE AAAI Eq. 6, arXiv Eq. 12).

    ``L = (1 - alpha) L_I + alpha sum_{s in nested sizes, s < N} KD_T(ybar_s, sg(ybar_N))``;
    for a tree that is one term per sub-tree level ``b = 0..B-1``.

    Args:
        alpha: weight of the distillation term, in [0, 1] (paper: 0.5).
        temperature: softmax temperature ``T`` of student and teacher (paper: 2).
        T: deprecated name of ``temperature``.
    """

    part = "hierarchical_distillation"

    def distillation(self, output: EnsembleOutput) -> Tensor:
        n = output.num_members
        prefixes = output.prefixes()
        teacher = prefixes[:, n - 1].detach()
        terms = [kd_loss(prefixes[:, s - 1], teacher, self.temperature) for s in output.nested_sizes if s < n]
        return torch.stack(terms).sum() if terms else prefixes.new_zeros(())


class EnsembleNetEnsembling(LossStrategy):
    """EnsembleNet's ensembling loss (Lee et al., Eq. 2).

    ``L = sum_i (1 - lambda) CE(z_i, y) + N lambda CE(ybar_N, y)``. ``lambda = 0``
    is conventional ensembling, ``lambda = 1`` trains only the ensemble; the
    paper finds negative values best on ImageNet (-1.5).

    Args:
        lam: ``lambda``, any real number (paper: -1.5).
    """

    trains_through_aggregate = True

    def __init__(self, lam: float = -1.5):
        super().__init__()
        self.lam = float(lam)

    def forward(self, output: EnsembleOutput, target: Tensor) -> LossResult:
        n = output.num_members
        members = member_ce(output.members, target).sum()
        ensemble = F.cross_entropy(output.ensemble(), target)
        total = (1 - self.lam) * members + n * self.lam * ensemble
        return LossResult(total, {"members": members.detach(), "ensemble": ensemble.detach()})


class EnsembleNetCoDistillation(LossStrategy):
    """EnsembleNet's co-distillation loss (Lee et al., Eq. 3).

    ``L = mu sum_i KD_1(z_i, sg(ybar_N)) + N CE(ybar_N, y)``: the members learn
    only from the ensemble, the ensemble from the labels (stop-gradient on the
    ensemble inside the distillation term, as in the paper).

    Args:
        mu: weight of the distillation terms, >= 0 (paper: 3 on ImageNet).
    """

    trains_through_aggregate = True

    def __init__(self, mu: float = 3.0):
        super().__init__()
        if mu < 0:
            raise InvalidValueError(f"mu must be >= 0, got {mu}")
        self.mu = float(mu)

    def forward(self, output: EnsembleOutput, target: Tensor) -> LossResult:
        n = output.num_members
        ensemble = output.ensemble()
        teacher = ensemble.detach()
        distill = torch.stack([kd_loss(output.members[:, i], teacher, 1.0) for i in range(n)]).sum()
        ce = F.cross_entropy(ensemble, target)
        total = self.mu * distill + n * ce
        return LossResult(total, {"distillation": distill.detach(), "ensemble": ce.detach()})
