"""IRENE's utility metric and the WoC baseline (Li et al., AAAI 2023).

IRENE's training (Algorithm 1) is a schedule of trainer stages:
[`ensemblekit.methods.irene.schedule`][ensemblekit.methods.irene.schedule].

* [`utility()`][ensemblekit.methods.irene.woc.utility]: the utility of Eq. 14 as Tables 1-2 report it.
* [`WoC`][ensemblekit.methods.irene.woc.WoC]: the confidence-threshold cascade on an average ensemble
  (Wang et al. 2021), threshold searched on a held-out split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ensemblekit.core.interfaces import Aggregator
from ensemblekit.errors import EnsembleKitError
from ensemblekit.functional import confidence, exit_indices

__all__ = ["TAU_C", "UtilityError", "WoC", "utility"]

TAU_C = 0.01
"""IRENE's cost exponent of Eq. 14 (App. C: "We set tau_c = 0.01")."""


class UtilityError(EnsembleKitError, ValueError):
    """Accuracies for which IRENE's utility (Eq. 14) is undefined."""


def utility(accuracy: float, cost: float, single_accuracy: float, ensemble_accuracy: float,
            members: int = 3) -> float:
    """Utility of a method relative to the single model, as in IRENE's Tables 1-2.

    Eq. 14 with ``v = c = 1``: ``U = V^tau_v / C^tau_c``. ``tau_c = 0.01``;
    ``tau_v`` makes the single model (cost 1) and the average ensemble of
    ``T`` members (cost ``T``) equally useful (App. C):
    ``tau_v = tau_c ln T / ln(V_T / V_1)``. The tables report
    ``exp((ln U - ln U_single) / tau_c) = (V / V_1)^(tau_v / tau_c) / C``;
    this reading reproduces 18 of the tables' 21 utilities within 0.02 from
    their accuracies and costs (all but three cost-3 baselines of CIFAR-100
    ResNet-32). ``tau_c`` cancels out.

    Args:
        accuracy: the method's top-1 accuracy ``V`` (any unit, same for all).
        cost: its average cost ``C`` (members used).
        single_accuracy: ``V_1`` of the single model.
        ensemble_accuracy: ``V_T`` of the average ensemble of ``members``.
        members: ``T``.
    """
    if not single_accuracy > 0:
        raise UtilityError(f"utility needs a single model with accuracy > 0, got {single_accuracy}: "
                           "tau_v = tau_c ln T / ln(V_T / V_1) is undefined otherwise")
    if not ensemble_accuracy > single_accuracy:
        raise UtilityError(
            f"utility needs an average ensemble more accurate than the single model "
            f"(got V_T = {ensemble_accuracy} vs V_1 = {single_accuracy}): tau_v is undefined otherwise")
    tau_v = TAU_C * math.log(members) / math.log(ensemble_accuracy / single_accuracy)
    log_u = tau_v * math.log(accuracy) - TAU_C * math.log(cost) if accuracy > 0 else -math.inf
    log_u_single = tau_v * math.log(single_accuracy)
    return math.exp((log_u - log_u_single) / TAU_C)


# --------------------------------------------------------------------- WoC
@dataclass
class WoC:
    """Wisdom of Committees: exit after member ``k`` once the average ensemble is confident.

    After member ``k`` (``k < T``) a sample stops if the maximum softmax
    probability of the aggregated prediction of members ``1..k`` is at least
    ``threshold``; the others go on, and member ``T`` takes the rest.

    Attributes:
        threshold: the confidence threshold.
    """

    threshold: float

    GRID = tuple(i / 100 for i in range(101))
    """IRENE App. A.2: "start at 0.0 and end at 1.0 with an interval of 0.01"."""

    def members_used(self, members: Tensor, aggregator: Aggregator) -> Tensor:
        """Members evaluated per sample ``[N]`` (1-based) for member logits ``[N, T, C]``."""
        return exit_indices(confidence(aggregator.prefixes(members)), torch.tensor(self.threshold)) + 1

    def predict(self, members: Tensor, aggregator: Aggregator) -> tuple[Tensor, Tensor]:
        """``(prediction [N, C] at each sample's exit, members used [N])``."""
        used = self.members_used(members, aggregator)
        prefixes = aggregator.prefixes(members)
        return prefixes[torch.arange(len(used)), used - 1], used

    @classmethod
    def fit(cls, members: Tensor, labels: Tensor, aggregator: Aggregator) -> WoC:
        """Search the threshold on held-out member logits ``[N, T, C]`` and labels ``[N]``.

        Every threshold of [`GRID`][ensemblekit.methods.irene.woc.WoC.GRID] is tried; the one of highest held-out
        [`utility()`][ensemblekit.methods.irene.woc.utility] wins (the lowest on ties, i.e. the cheapest), the
        metric the methods are compared by. If the held-out average ensemble
        is no more accurate than its first member, extra members cannot pay
        for themselves and the threshold is 0 (stop after one member). If
        the first member is never right on the held-out split, the utility
        is undefined (``tau_v`` needs ``ln(V_T / V_1)``) and nothing is
        traded against cost: the threshold of highest held-out accuracy
        wins (the lowest on ties).
        """
        prefixes = aggregator.prefixes(members)
        correct = (prefixes.argmax(-1) == labels[:, None]).float()
        single, full = correct[:, 0].mean().item(), correct[:, -1].mean().item()
        if not full > single:
            return cls(0.0)
        grid = torch.tensor(cls.GRID)
        exits = exit_indices(confidence(prefixes), grid[:, None, None])  # [G, N]: one row per threshold
        accuracy = correct.gather(1, exits.T).mean(0)
        cost = (exits + 1).float().mean(1)
        if single > 0:
            scores = [utility(a, c, single, full, members.shape[1]) for a, c in zip(accuracy.tolist(), cost.tolist())]
        else:
            scores = accuracy.tolist()
        return cls(float(grid[max(range(len(scores)), key=lambda i: (scores[i], -i))]))
