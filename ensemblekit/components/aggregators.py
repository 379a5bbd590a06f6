"""Aggregators: member logits -> one prediction, member by member.

Each keeps a running state so that anytime inference and halting add one
member at a time; the batch form (``aggregator(members)``) folds the same
updates, so both agree exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ensemblekit.core.interfaces import Aggregator, AggregatorState
from ensemblekit.errors import InvalidValueError

__all__ = ["LastExit", "MeanLogits", "MeanProbs", "Vote", "WeightedMean"]


class MeanLogits(Aggregator):
    """Mean of logits, HNE's ensemble output: ``y^b = 1/2^b sum_n F_n(x)`` (Eq. 1)."""

    def update(self, state: AggregatorState | None, logits: Tensor, index: int) -> AggregatorState:
        if state is None:
            return {"sum": logits, "count": logits.new_ones(())}
        return {"sum": state["sum"] + logits, "count": state["count"] + 1}

    def value(self, state: AggregatorState) -> Tensor:
        return state["sum"] / state["count"]


class MeanProbs(Aggregator):
    """Mean of softmax probabilities; the prediction is their log (so softmax gives the mean)."""

    def update(self, state: AggregatorState | None, logits: Tensor, index: int) -> AggregatorState:
        probs = logits.softmax(dim=-1)
        if state is None:
            return {"sum": probs, "count": logits.new_ones(())}
        return {"sum": state["sum"] + probs, "count": state["count"] + 1}

    def value(self, state: AggregatorState) -> Tensor:
        return (state["sum"] / state["count"]).clamp_min(torch.finfo(state["sum"].dtype).tiny).log()


class Vote(Aggregator):
    """Majority vote; the prediction is the log of the vote shares (ties: lowest class wins)."""

    differentiable = False

    def update(self, state: AggregatorState | None, logits: Tensor, index: int) -> AggregatorState:
        votes = F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
        if state is None:
            return {"votes": votes, "count": logits.new_ones(())}
        return {"votes": state["votes"] + votes, "count": state["count"] + 1}

    def value(self, state: AggregatorState) -> Tensor:
        shares = state["votes"] / state["count"]
        return shares.clamp_min(torch.finfo(shares.dtype).tiny).log()


class WeightedMean(Aggregator):
    """Weighted mean of logits, renormalised over the members evaluated so far.

    ``y^k = sum_{n<=k} w_n z_n / sum_{n<=k} w_n`` with ``w = softmax(v)``.

    Args:
        num_members: number of members (length of the weight vector).
        weights: initial weights (positive); uniform when omitted.
        learnable: train the weights (as logits ``v``) with the rest of the model.
    """

    def __init__(self, num_members: int, weights: list[float] | None = None, learnable: bool = False):
        super().__init__()
        if weights is None:
            weights = [1.0] * num_members
        if len(weights) != num_members or min(weights) <= 0:
            raise InvalidValueError(f"weights must be {num_members} positive numbers, got {weights}")
        log_weights = torch.tensor(weights, dtype=torch.float32).log()
        self.learnable = learnable
        if learnable:
            self.log_weights = nn.Parameter(log_weights)
        else:
            self.register_buffer("log_weights", log_weights)

    def _weight(self, index: int) -> Tensor:
        if index >= self.log_weights.numel():
            raise InvalidValueError(
                f"WeightedMean has {self.log_weights.numel()} weights but member {index} was added"
            )
        return self.log_weights.softmax(dim=0)[index]

    def update(self, state: AggregatorState | None, logits: Tensor, index: int) -> AggregatorState:
        w = self._weight(index).to(logits.dtype)
        if state is None:
            return {"sum": w * logits, "weight": w}
        return {"sum": state["sum"] + w * logits, "weight": state["weight"] + w}

    def value(self, state: AggregatorState) -> Tensor:
        return state["sum"] / state["weight"]


class LastExit(Aggregator):
    """The newest member alone: a multi-exit network's prediction after exit ``k`` is exit ``k``'s logits."""

    def update(self, state: AggregatorState | None, logits: Tensor, index: int) -> AggregatorState:
        return {"logits": logits}

    def value(self, state: AggregatorState) -> Tensor:
        return state["logits"]
