"""One halting decision after a member: the step shared by ``predict()`` and the streaming engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ensemblekit.core.interfaces import HaltingPolicy, HaltingStep

if TYPE_CHECKING:
    from ensemblekit.core.ensemble import Ensemble

__all__ = ["Decision", "decide"]

Decision = tuple[Tensor, Tensor, Any, Any]
"""``(stop, aggregate, aggregator state, policy state)``: what `decide()` returns."""


def decide(ensemble: Ensemble, policy: HaltingPolicy, k: int, logits: Tensor, aggregator_state: Any,
           policy_state: Any, flops: int, head_input: Callable[[], Any], seconds: Callable[[], Tensor]) -> Decision:
    """Fold member ``k``'s logits into the aggregate and let ``policy`` decide, per sample, whether to stop.

    Every sample stops after the last member. ``head_input`` and ``seconds``
    are called only when the policy's ``step_inputs`` ask for them (member
    ``k``'s head input, and each sample's seconds since its arrival).

    Returns:
        ``stop`` (bool per sample), the aggregate after member ``k`` (the
        prediction of those that stop) and the new aggregator and policy states.
    """
    aggregator_state = ensemble.aggregator.update(aggregator_state, logits, k)
    aggregate = ensemble.aggregator.value(aggregator_state)
    extras = {}
    if "head_input" in policy.step_inputs:
        extras["head_input"] = head_input()
    if "seconds" in policy.step_inputs:
        extras["seconds"] = seconds()
    step = HaltingStep(k, ensemble.num_members, logits, aggregate, flops, extras)
    stop, policy_state = policy.step(step, policy_state)
    if k == ensemble.num_members - 1:
        stop = torch.ones_like(stop)
    return stop, aggregate, aggregator_state, policy_state
