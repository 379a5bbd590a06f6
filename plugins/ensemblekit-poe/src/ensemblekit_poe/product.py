"""The product of the members' predictive distributions, and halting once it is sharp.

A product of experts (Hinton, 2002) multiplies the members' class
distributions and renormalises: a class survives only if every member gives
it mass, so members veto each other's mistakes. In log space it is a sum:
``log p(y) = sum_n log_softmax(z_n)_y - log Z``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ensemblekit.core.interfaces import Aggregator, AggregatorState, HaltingPolicy, HaltingStep
from ensemblekit.errors import InvalidValueError


class ProductOfExperts(Aggregator):
    """Product of the members' distributions: ``log_softmax(sum_n log_softmax(z_n))``.

    The prediction is the product's log-probabilities (its softmax is the
    product). The incremental form keeps the running sum, so the prediction
    of the first ``k`` members is exact at every step.

    Args:
        geometric: average the log-probabilities instead of summing them (the
            renormalised geometric mean): as sharp as one member, not ``N``
            times sharper, which keeps the product calibrated with many members.

    Example:
        >>> import torch
        >>> poe = ProductOfExperts()
        >>> members = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])  # 1 sample, 2 members, 2 classes
        >>> poe(members).softmax(-1)
        tensor([[0.8808, 0.1192]])
    """

    def __init__(self, geometric: bool = False):
        super().__init__()
        self.geometric = geometric

    def update(self, state: AggregatorState | None, logits: Tensor, index: int) -> AggregatorState:
        log_probs = logits.log_softmax(dim=-1)
        if state is None:
            return {"sum": log_probs, "count": logits.new_ones(())}
        return {"sum": state["sum"] + log_probs, "count": state["count"] + 1}

    def value(self, state: AggregatorState) -> Tensor:
        total = state["sum"] / state["count"] if self.geometric else state["sum"]
        return total.log_softmax(dim=-1)


def support_size(probs: Tensor, mass: float) -> Tensor:
    """The fewest classes whose probabilities add up to ``mass``: ``[..., C] -> [...]`` (long).

    Example:
        >>> import torch
        >>> support_size(torch.tensor([[0.7, 0.2, 0.1], [0.96, 0.02, 0.02]]), 0.9)
        tensor([2, 1])
    """
    cumulative = probs.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return ((cumulative < mass).sum(dim=-1) + 1).clamp_max(probs.shape[-1])


class ProductSupportHalting(HaltingPolicy):
    """Stop a sample once the product of its members' distributions concentrates.

    The policy keeps its own running product (so it works next to any
    aggregator; with ``aggregator="poe"`` it is the prediction itself) and
    stops a sample when

    * ``criterion="support"``: the fewest classes that hold ``mass`` of the
      product's probability number at most ``threshold`` (default 1: a
      single class holds ``mass``), or
    * ``criterion="entropy"``: the product's entropy is at most ``threshold``
      nats (default 0.5).

    Args:
        criterion: "support" or "entropy".
        threshold: stop at or below this (a class count, or nats).
        mass: probability mass the support must cover, in (0, 1].
        min_members: never stop before this many members.
        geometric: track the geometric mean instead of the product
            (see :class:`ProductOfExperts`).

    Example:
        >>> import ensemblekit as ek
        >>> ens = ek.wrap(model, aggregator="poe", halting={"name": "poe_support", "mass": 0.8})  # doctest: +SKIP
        >>> ens.predict(images).members_used  # doctest: +SKIP
    """

    def __init__(self, criterion: Literal["support", "entropy"] = "support", threshold: float | None = None,
                 mass: float = 0.9, min_members: int = 1, geometric: bool = False):
        super().__init__()
        if criterion not in ("support", "entropy"):
            raise InvalidValueError(f"criterion must be 'support' or 'entropy', got {criterion!r}")
        if not 0.0 < mass <= 1.0:
            raise InvalidValueError(f"mass must be in (0, 1], got {mass}")
        if not isinstance(min_members, int) or min_members < 1:
            raise InvalidValueError(f"min_members must be an integer >= 1, got {min_members!r}")
        self.criterion = criterion
        self.threshold = float(threshold if threshold is not None else 1 if criterion == "support" else 0.5)
        if self.threshold < 0:
            raise InvalidValueError(f"threshold must be >= 0, got {threshold}")
        self.mass = mass
        self.min_members = min_members
        self.product = ProductOfExperts(geometric=geometric)

    def step(self, step: HaltingStep, state: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        state = self.product.update(state, step.member_logits, step.index)
        log_probs = self.product.value(state)
        if self.criterion == "support":
            score = support_size(log_probs.exp(), self.mass).to(log_probs.dtype)
        else:
            score = -(log_probs.exp() * log_probs).sum(dim=-1)
        stop = score <= self.threshold
        if step.index + 1 < self.min_members:
            stop = torch.zeros_like(stop)
        return stop, state
