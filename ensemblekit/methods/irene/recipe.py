"""IRENE (Li et al., AAAI 2023): a sequential ensemble with a learned halting selector."""

from __future__ import annotations

from typing import Any

from torch import nn

from ensemblekit.build import recorded_recipe, wrap
from ensemblekit.components.halting.learned import Learned
from ensemblekit.components.losses.learned_halting import IreneLoss
from ensemblekit.core.blocks import BlockSplit
from ensemblekit.core.ensemble import Ensemble
from ensemblekit.errors import InvalidTypeError, InvalidValueError

__all__ = ["MEMBER_OPTION", "irene"]

MEMBER_OPTION = {"cascade": "members", "independent": "members", "multi_branch": "branches"}
"""The option that sets the number of members, per topology (a tree has ``branching^depth``)."""


@recorded_recipe
def irene(
    backbone: nn.Module | BlockSplit | str,
    members: int | None = 3,
    *,
    topology: str = "cascade",
    ens_weight: float = 0.1,
    cost_weight: float = 0.01,
    rank_weight: float = 0.1,
    aux_weight: float = 1.0,
    discrepancy_weight: float = 0.1,
    cost: str | None = None,
    schedule: str = "sequential",
    hidden: int = 16,
    cell: str = "lstm",
    threshold: float = 0.5,
    temperature: float = 1.0,
    aux_head: bool = True,
    halting: Any = None,
    **options: Any,
) -> Ensemble:
    """An IRENE ensemble: ``members`` base models, an LSTM selector, the paper's objective.

    Members are averaged in probability (Eq. 7, ``aggregator="mean_probs"``);
    the selector is [`Learned`][ensemblekit.components.halting.Learned] and the loss
    [`IreneLoss`][ensemblekit.components.losses.IreneLoss] (Eq. 13). Train with
    [`ensemblekit.training.trainer.train()`][ensemblekit.training.trainer.train] (it runs Algorithm 1,
    [`ensemblekit.methods.irene.schedule`][ensemblekit.methods.irene.schedule], when ``schedule`` is
    "sequential"); predict with ``ens.predict(x)``.

    Args:
        backbone: a timm model (or its name, created with ``pretrained=False``),
            a module sequence or a ready BlockSplit.
        members: number of base models ``T`` (the paper: 3); None for a tree,
            whose size is set by ``depth`` and ``branching``.
        topology: "cascade" (the paper), "independent", "multi_branch" or "tree".
        ens_weight: omega_1 of ``L_ens``.
        cost_weight: omega_2 of ``L_cost``.
        rank_weight: omega_3 of ``L_rank``.
        aux_weight: weight of the auxiliary heads' cross-entropy.
        discrepancy_weight: weight of the auxiliary heads' discrepancy term.
        cost: "members" or "flops"; default "members" for a cascade or
            independent members (all equal), "flops" when members share nodes.
        schedule: "sequential" (Algorithm 1) or "joint".
        hidden: width of the selector's recurrent state.
        cell: "lstm" or "gru".
        threshold: inference halts where ``h_t >= threshold``.
        temperature: Gumbel-softmax temperature in training.
        aux_head: give each member an auxiliary head (uncertainty feature).
        halting: another policy providing ``halting_probabilities``
            (default: a [`Learned`][ensemblekit.components.halting.Learned] from the options above).
        **options: passed to [`wrap()`][ensemblekit.build.wrap] (``num_classes``,
            ``init``, ``depth``, ``branching``, ``fork``, ``example_input``, ...).

    Examples:
        >>> import timm
        >>> ens = irene(timm.create_model("resnet10t", num_classes=10))
        >>> ens.num_members, type(ens.halting).__name__
        (3, 'Learned')
    """
    if isinstance(backbone, str):
        from ensemblekit.backbones import create_backbone

        backbone = create_backbone(backbone, num_classes=options.pop("num_classes", 1000))
    for key in ("aggregator", "loss"):
        if key in options:
            raise InvalidTypeError(f"irene() fixes the {key} (mean of probabilities, IRENE's loss); to choose your "
                                   "own, build the cascade with ensemblekit.wrap()")
    if members is not None:
        if topology not in MEMBER_OPTION:
            raise InvalidValueError(f"a {topology} has no member count option: pass members=None and its own options")
        options[MEMBER_OPTION[topology]] = members
    if cost is None:
        cost = "members" if topology in ("cascade", "independent") else "flops"
    if halting is None:
        halting = Learned(hidden=hidden, cell=cell, threshold=threshold, temperature=temperature, aux_head=aux_head,
                          ens_weight=ens_weight, cost_weight=cost_weight, rank_weight=rank_weight,
                          aux_weight=aux_weight, discrepancy_weight=discrepancy_weight)
    loss = IreneLoss(ens_weight=ens_weight, cost_weight=cost_weight, rank_weight=rank_weight, aux_weight=aux_weight,
                     discrepancy_weight=discrepancy_weight, cost=cost, schedule=schedule)
    return wrap(backbone, topology, aggregator="mean_probs", loss=loss, halting=halting, **options)


# **options go to wrap(): the option checks (configs, the registry) accept its keywords
irene.passes_kwargs_to = wrap  # type: ignore[attr-defined]
