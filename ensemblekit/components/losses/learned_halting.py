"""IRENE's objective (Li et al., AAAI 2023, Eq. 8-13) for a learned halting policy.

[`IreneLoss`][ensemblekit.components.losses.learned_halting.IreneLoss] is the whole objective;
[`halting_terms()`][ensemblekit.components.losses.learned_halting.halting_terms] its part that trains the
selector, which [`Learned.loss`][ensemblekit.components.halting.learned.Learned.loss] adds to any other task
loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ensemblekit.core.interfaces import EnsembleOutput, LossResult, LossStrategy
from ensemblekit.errors import InvalidValueError
from ensemblekit.functional import expected_cost, halting_distribution, survival, survival_weighted_cross_entropy

__all__ = ["COSTS", "SCHEDULES", "IreneLoss", "halting_terms", "member_cross_entropy"]

SCHEDULES = ("sequential", "joint")
COSTS = ("members", "flops")


def halting_terms(output: EnsembleOutput, target: Tensor, steps: list[int], cost: str,
                  ce: Tensor | None = None) -> dict[str, Tensor]:
    """IRENE's selector terms ``L_ens``, ``L_cost``, ``L_rank`` (Eq. 9-12) and the auxiliary heads' two.

    Unweighted, each averaged over the batch, summed over the 1-based
    ``steps`` (``L_cost`` once, over every member of ``output``); see
    [`IreneLoss`][ensemblekit.components.losses.learned_halting.IreneLoss] for each term. ``ce`` is the members'
    cross-entropy ``[B, T]`` when the caller has it already.
    """
    logits, extras = output.members, output.extras
    count = logits.shape[1]
    h = extras["halting_probabilities"]
    s = survival(h)
    if ce is None:
        ce = member_cross_entropy(logits, target)
    ens = survival_weighted_cross_entropy(logits.detach().float().softmax(-1), s, target)
    t = torch.tensor(steps, device=logits.device) - 1
    parts = {
        "ens": ens[:, t].sum(1).mean(),
        "cost": _expected_cost(h, extras, count, cost).mean(),
        "rank": _rank(ce, s, ens, steps).mean(),
    }
    if "aux_logits" in extras:
        aux = extras["aux_logits"][:, t]
        parts["aux"] = F.cross_entropy(aux.flatten(0, 1), target.repeat_interleave(len(steps))) * len(steps)
        distance = (aux.softmax(-1) - logits[:, t].detach().softmax(-1)).abs().sum(-1)
        parts["discrepancy"] = -distance.sum(1).mean()
    return parts


def member_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """``CE(y, y_t)`` per sample and member: ``[B, T, C] -> [B, T]``."""
    return F.cross_entropy(logits.flatten(0, 1), target.repeat_interleave(logits.shape[1]),
                           reduction="none").view(logits.shape[:2])


def _expected_cost(h: Tensor, extras: dict, count: int, cost: str) -> Tensor:
    """``sum_i c_i p_i`` per sample (Eq. 11), ``h`` of the last member set to 1."""
    h = torch.cat([h[:, :-1], torch.ones_like(h[:, -1:])], dim=1)
    if cost == "members":
        c = torch.arange(1, count + 1, dtype=h.dtype, device=h.device)
    else:
        c = extras["prefix_costs"]
    return expected_cost(halting_distribution(h), c)


def _rank(ce: Tensor, s: Tensor, ens: Tensor, steps: list[int]) -> Tensor:
    """``sum_t max(0, S(t) (CE_t - CE^ens_{t-1}.detach()))`` over ``steps`` (Eq. 12), per sample."""
    total = torch.zeros_like(ce[:, 0])
    for t in steps:
        if t > 1:
            total = total + (s[:, t - 1] * (ce[:, t - 1] - ens[:, t - 2].detach())).clamp_min(0)
    return total


class IreneLoss(LossStrategy):
    """``L_t = L_base + w_ens L_ens + w_cost L_cost + w_rank L_rank`` (Eq. 13), per step ``t``.

    With ``h`` from the halting policy (``h_t`` of the last computed member
    is 1), ``S(i) = prod_{j<i}(1-h_j)`` and ``p_i = h_i S(i)``; ``y_i`` is
    member ``i``'s softmax and ``CE`` the cross-entropy, per sample, averaged
    over the batch:

    * ``L_base_t = CE(y, y_t)`` (Eq. 8): member ``t`` only.
    * ``L_ens_t = CE(y, sum_{i<=t} S(i) y_i / sum_{i<=t} S(i))`` (Eq. 9-10):
      the members' outputs are detached, so it trains the selector only.
    * ``L_cost = sum_i c_i p_i`` (Eq. 11): the expected number of members
      (``c_i = i``, cost "members") or the expected prefix FLOPs in units of
      the first member (cost "flops", for members that share or differ in
      computation); it trains the selector only.
    * ``L_rank_t = max(0, S(t) (CE(y, y_t) - CE(y, y^ens_{t-1})))`` (Eq. 12)
      with the previous prefix ensemble's loss detached: trains member ``t``
      and, through ``S(t)``, the selector; 0 for ``t = 1``.

    Schedules: "sequential" (Algorithm 1) is the objective of step ``t``,
    the number of members in the output (forward the first ``t`` members with
    the earlier ones frozen, as the "sequential" training schedule does); ``L_cost``
    then covers those ``t`` members. "joint" sums ``L_base_t``, ``L_ens_t``
    and ``L_rank_t`` over every ``t`` and adds ``L_cost`` over all members once.

    With auxiliary heads (``aux_logits`` in the extras) two terms train them
    alone (App. A.1.2): their cross-entropy, and the L1 distance between the
    two heads' softmax outputs, maximised (its weight multiplies ``-L1``).

    The loss holds the selector's terms itself (``trains_halting``), so
    [`Ensemble.loss`][ensemblekit.core.ensemble.Ensemble.loss] adds no halting terms
    on top of it; [`halting_terms()`][ensemblekit.components.losses.learned_halting.halting_terms] computes them
    for both.

    The paper tunes ``w_ens``, ``w_cost``, ``w_rank`` by search in
    [1e-4, 0.1], [1e-5, 0.1], [1e-4, 0.1] (Table 3) without reporting the
    values; the defaults are ours, inside those ranges. The authors' released
    defaults set ``w_ens = w_rank = 0``.

    Args:
        ens_weight: ``w_ens`` (omega_1).
        cost_weight: ``w_cost`` (omega_2).
        rank_weight: ``w_rank`` (omega_3).
        base_weight: weight of ``L_base``.
        aux_weight: weight of the auxiliary heads' cross-entropy.
        discrepancy_weight: weight of ``-L1`` between the two heads' outputs.
        cost: "members" or "flops".
        schedule: "sequential" or "joint".
    """

    requires = frozenset({"halting_probabilities"})
    trains_halting = True

    def __init__(self, ens_weight: float = 0.1, cost_weight: float = 0.01, rank_weight: float = 0.1,
                 base_weight: float = 1.0, aux_weight: float = 1.0, discrepancy_weight: float = 0.1,
                 cost: str = "members", schedule: str = "sequential"):
        super().__init__()
        if schedule not in SCHEDULES:
            raise InvalidValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if cost not in COSTS:
            raise InvalidValueError(f"cost must be one of {COSTS}, got {cost!r}")
        self.weights = {"base": base_weight, "ens": ens_weight, "cost": cost_weight, "rank": rank_weight,
                        "aux": aux_weight, "discrepancy": discrepancy_weight}
        self.cost = cost
        self.schedule = schedule
        if cost == "flops":
            self.requires = type(self).requires | {"prefix_costs"}

    @classmethod
    def example_options(cls) -> dict[str, Any]:
        """Options for [`ensemblekit.testing`][ensemblekit.testing], whose checks train every member at once."""
        return {"schedule": "joint"}

    def check(self, ensemble) -> None:
        """Fail at ``wrap()`` time unless the halting policy provides what the loss reads."""
        missing = self.requires - ensemble.provides
        if missing:
            policy = type(ensemble.halting).__name__ if ensemble.halting is not None else "no halting policy"
            raise InvalidValueError(
                f"loss 'irene' needs {sorted(missing)} from a learned halting policy, but the ensemble has "
                f"{policy}; pass halting='learned' to wrap() or build it with ensemblekit.methods.irene.recipe")

    def forward(self, output: EnsembleOutput, target: Tensor) -> LossResult:
        if self.schedule == "sequential" and self.training and torch.is_grad_enabled():
            _check_frozen(output)
        parts = self.terms(output, target)
        base, *rest = (self.weights[name] * value for name, value in parts.items())  # "base" always comes first
        total = sum(rest, base)
        return LossResult(total, {name: value.detach() for name, value in parts.items()})

    def terms(self, output: EnsembleOutput, target: Tensor) -> dict[str, Tensor]:
        """The unweighted terms of the schedule's objective, each averaged over the batch."""
        count = output.num_members
        ce = member_cross_entropy(output.members, target)
        steps = [count] if self.schedule == "sequential" else list(range(1, count + 1))
        t = torch.tensor(steps, device=ce.device) - 1
        return {"base": ce[:, t].sum(1).mean(), **halting_terms(output, target, steps, self.cost, ce)}


def _check_frozen(output: EnsembleOutput) -> None:
    """Algorithm 1 trains member ``t`` with members ``1..t-1`` frozen: refuse a graph through them."""
    inputs = output.extras.get("head_inputs", {})
    for member in range(output.num_members - 1):
        state = inputs.get(member)
        values = state if isinstance(state, tuple) else (state,)
        if any(isinstance(v, Tensor) and v.requires_grad for v in values):
            raise InvalidValueError(
                f"IRENE's sequential schedule trains the last member with the earlier ones frozen, but member "
                f"{member + 1} of {output.num_members} has gradients; train with ensemblekit.training.trainer.train "
                "(it runs the \"sequential\" schedule), or use schedule='joint'")
