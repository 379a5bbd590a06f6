"""Anytime inference: prefix ensembles of 1, 2, ... members in depth-first order.

Moving from member ``k`` to ``k+1`` computes only the nodes member ``k+1``
adds (HNE, Sec. 3: "the first evaluated leaf model is always the same"), so
iterating over all members costs one evaluation of every node plus one
aggregation update per member. The caller may stop at any step; the iterator
stops by itself at a FLOPs budget, a member count or a wall-clock deadline.

Deadline semantics (one rule, [`ensemblekit.core.timing`][ensemblekit.core.timing], shared with
[`ensemblekit.components.halting.Deadline`][ensemblekit.components.halting.Deadline]):

* the clock starts when work starts (the first ``next()``), after the
  ensemble's cost table is measured (once per input shape, cached);
* the first member always runs, so there is always a prediction;
* member ``k+1`` starts only if it is predicted to finish in time:
  ``elapsed + rate * flops(k+1) <= deadline``, where ``flops(k+1)`` is what
  member ``k+1`` adds to the prefix (a tree leaf after the first member adds
  one block, not a whole path) and ``rate`` is the seconds per FLOP measured
  on the members evaluated so far in this call;
* ``elapsed`` is wall-clock time since the start, including what the caller
  does between steps; ``rate`` counts compute time only.

On CUDA or MPS the clock waits for queued work before reading the time, so
``seconds`` is the time at which the prediction is ready.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ensemblekit.core.cache import NodeCache
from ensemblekit.core.timing import Clock, DeadlineTimer, overruns

__all__ = ["AnytimeStep", "Clock", "anytime", "overruns"]


@dataclass
class AnytimeStep:
    """One step of anytime inference.

    Attributes:
        prediction: aggregated prediction ``[B, C]`` of the members so far.
        member_logits: logits ``[B, C]`` of the member this step added.
        members: how many members the prediction uses.
        flops: FLOPs per image of ``x``'s size spent so far (shared nodes
            counted once; a multiply-add is 2 FLOPs).
        seconds: wall-clock seconds from the start until this prediction was ready.
    """

    prediction: Tensor
    member_logits: Tensor
    members: int
    flops: int
    seconds: float


def anytime(ensemble, x: Tensor, deadline: float | None = None, max_flops: float | None = None,
            max_members: int | None = None) -> Iterator[AnytimeStep]:
    """Yield [`AnytimeStep`][ensemblekit.core.anytime.AnytimeStep] for ``k = 1, 2, ...`` members until a limit
    is reached.

    Each step runs under ``torch.no_grad()``; grad mode is restored between
    steps, so the caller's own code is unaffected. The ensemble is used in
    its current mode (call ``ensemble.eval()`` first for inference).

    Args:
        ensemble: an [`Ensemble`][ensemblekit.Ensemble].
        x: images ``[B, C, H, W]``.
        deadline: wall-clock seconds; a member predicted to finish later is
            not started (see the module docstring). The first member always runs.
        max_flops: do not start a member whose prefix would exceed this many
            FLOPs per image of ``x``'s size (the first member always runs).
        max_members: stop after this many members.

    Examples:
        >>> for step in ens.anytime(x, deadline=0.05):  # doctest: +SKIP
        ...     show(step.prediction.argmax(-1), step.members, step.seconds)
    """
    for name, value in (("deadline", deadline), ("max_flops", max_flops)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if max_members is not None and (not isinstance(max_members, int) or max_members < 1):
        raise ValueError(f"max_members must be an integer >= 1, got {max_members!r}")
    ensemble.check_input(x)
    prefix_flops = [row.flops for row in ensemble.cost_table(input_size=tuple(x.shape[1:]))]
    limit = ensemble.num_members if max_members is None else min(max_members, ensemble.num_members)
    return _steps(ensemble, NodeCache(x), prefix_flops, limit, deadline, max_flops)


def _steps(ensemble, cache, prefix_flops: list[int], limit: int, deadline: float | None,
           max_flops: float | None) -> Iterator[AnytimeStep]:
    timer = DeadlineTimer(deadline, cache.input.device)
    state = None
    for k in range(limit):
        begun = timer.begin()
        if k > 0:
            if max_flops is not None and prefix_flops[k] > max_flops:
                return
            if timer.overruns(begun, prefix_flops[k - 1], prefix_flops[k] - prefix_flops[k - 1]):
                return
        with torch.no_grad():
            logits = ensemble.member_logits(cache, k)
            state = ensemble.aggregator.update(state, logits, k)
            prediction = ensemble.aggregator.value(state)
        done = timer.end()
        yield AnytimeStep(prediction, logits, k + 1, prefix_flops[k], done)
