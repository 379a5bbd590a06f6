"""Mixture of experts: a small learned gate weights each member per sample.

``p(y | x) = sum_n w_n(x) softmax(z_n)_y`` with ``w = softmax_n(s_n)`` over the
members evaluated so far, and a score ``s_n = g(phi(z_n)) + b_n`` from member
``n``'s own logits: ``phi`` are class-count-free confidence features,
``g`` a two-layer MLP shared by all members and ``b_n`` a learned bias per
member (how much it is trusted overall).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ensemblekit.core.interfaces import Aggregator, AggregatorState
from ensemblekit.errors import InvalidValueError


def confidence_features(logits: Tensor) -> Tensor:
    """``[B, C] -> [B, 3]``: top probability, top-2 margin and entropy / log(C), each in [0, 1].

    Example:
        >>> import torch
        >>> confidence_features(torch.zeros(1, 4))
        tensor([[0.2500, 0.0000, 1.0000]])
    """
    log_probs = logits.log_softmax(dim=-1)
    probs = log_probs.exp()
    top = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    margin = top[:, 0] - top[:, 1] if top.shape[-1] > 1 else torch.zeros_like(top[:, 0])
    num_classes = logits.shape[-1]
    entropy = -(probs * log_probs).sum(dim=-1) / (math.log(num_classes) if num_classes > 1 else 1.0)
    return torch.stack([top[:, 0], margin, entropy], dim=-1)


class GatedMixture(Aggregator):
    """Mixture of the members' distributions, weighted per sample by a learned gate.

    The prediction is the mixture's log-probabilities. The incremental form
    renormalises the weights over the members seen so far (a running
    log-sum-exp), so every prefix is a proper mixture and the first member
    alone predicts exactly its own distribution. The gate's output layer
    starts at zero: untrained, the mixture is the mean of probabilities.
    Train it with a loss on the ensemble's prediction (``"nested"`` trains
    every prefix, ``"ensemblenet_ensembling"`` the full mixture); a loss on
    the members alone (``"independent"``) never reaches the gate.

    Args:
        num_members: members in the ensemble (one learned bias each); given
            by ``ensemblekit.build`` when the aggregator is chosen by name.
        hidden: width of the gate's hidden layer.

    Example:
        >>> import torch
        >>> moe = GatedMixture(num_members=3)
        >>> moe(torch.randn(2, 3, 10)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_members: int, hidden: int = 16):
        super().__init__()
        if not isinstance(num_members, int) or num_members < 1:
            raise InvalidValueError(f"num_members must be an integer >= 1, got {num_members!r}")
        if not isinstance(hidden, int) or hidden < 1:
            raise InvalidValueError(f"hidden must be an integer >= 1, got {hidden!r}")
        self.gate = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.gate[-1].weight)
        nn.init.zeros_(self.gate[-1].bias)
        self.member_bias = nn.Parameter(torch.zeros(num_members))

    def score(self, logits: Tensor, index: int) -> Tensor:
        """The gate's unnormalised log-weight ``[B]`` of member ``index`` with ``logits`` ``[B, C]``."""
        if index >= self.member_bias.numel():
            raise InvalidValueError(
                f"GatedMixture was built for {self.member_bias.numel()} members but member {index} was added"
            )
        features = confidence_features(logits).to(self.member_bias.dtype)
        return (self.gate(features).squeeze(-1) + self.member_bias[index]).to(logits.dtype)

    def update(self, state: AggregatorState | None, logits: Tensor, index: int) -> AggregatorState:
        score = self.score(logits, index)
        weighted = score.unsqueeze(-1) + logits.log_softmax(dim=-1)
        if state is None:
            return {"log_norm": score, "log_mix": weighted}
        return {"log_norm": torch.logaddexp(state["log_norm"], score),
                "log_mix": torch.logaddexp(state["log_mix"], weighted)}

    def value(self, state: AggregatorState) -> Tensor:
        return state["log_mix"] - state["log_norm"].unsqueeze(-1)
