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

Granularity. By default (``granularity="member"``) each step computes the
nodes its member adds, one node per level in a tree: many small calls where
a forward pass runs each level's nodes in one executor call (batched with
``vmap`` or grouped convolutions). With ``granularity="nested"`` the members
are computed a nested sub-ensemble at a time (``1, k, k^2, ...`` members of a
``k``-ary tree, the topology's ``nested_sizes``): the nodes the next
sub-ensemble adds are computed level by level, each level in one executor
call, and then every member of it is yielded in turn (its head and the
aggregation only), so every prefix is still yielded. The limits apply per
member as before, checked when a sub-ensemble starts: its members are cut to
those that fit ``max_members``, ``max_flops`` and the deadline (each
predicted from the FLOPs it adds to the prefix computed so far); between its
members only the time already past the deadline stops the iteration. A
caller that stops in the middle of a sub-ensemble has paid for all of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ensemblekit.core.cache import NodeCache
from ensemblekit.core.timing import Clock, DeadlineTimer, overruns
from ensemblekit.errors import InvalidValueError

__all__ = ["GRANULARITIES", "AnytimeStep", "Clock", "anytime", "overruns"]

GRANULARITIES = ("member", "nested")
"""What one step of computation covers: one member, or one nested sub-ensemble (see the module docstring)."""


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
            max_members: int | None = None, granularity: str = "member") -> Iterator[AnytimeStep]:
    """Yield [`AnytimeStep`][ensemblekit.core.anytime.AnytimeStep] for ``k = 1, 2, ...`` members until a limit
    is reached.

    Each step runs under ``torch.no_grad()``; grad mode is restored between
    steps, so the caller's own code is unaffected. The ensemble is used in
    its current mode (call ``ensemble.eval()`` first for inference).

    Args:
        ensemble: an [`Ensemble`][ensemblekit.core.ensemble.Ensemble].
        x: images ``[B, C, H, W]``.
        deadline: wall-clock seconds; a member predicted to finish later is
            not started (see the module docstring). The first member always runs.
        max_flops: do not start a member whose prefix would exceed this many
            FLOPs per image of ``x``'s size (the first member always runs).
        max_members: stop after this many members.
        granularity: "member" (compute one member at a time) or "nested"
            (the nodes of a nested sub-ensemble at a time, each level in one
            call; every prefix is still yielded): see the module docstring.

    Examples:
        >>> for step in ens.anytime(x, deadline=0.05):  # doctest: +SKIP
        ...     show(step.prediction.argmax(-1), step.members, step.seconds)
    """
    for name, value in (("deadline", deadline), ("max_flops", max_flops)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
            raise InvalidValueError(f"{name} must be a number >= 0, got {value!r}")
    if max_members is not None and (not isinstance(max_members, int) or max_members < 1):
        raise InvalidValueError(f"max_members must be an integer >= 1, got {max_members!r}")
    if granularity not in GRANULARITIES:
        raise InvalidValueError(f"granularity must be one of {', '.join(map(repr, GRANULARITIES))}, got "
                                f"{granularity!r}")
    ensemble.check_input(x)
    prefix_flops = [row.flops for row in ensemble.cost_table(input_size=tuple(x.shape[1:]))]
    limit = ensemble.num_members if max_members is None else min(max_members, ensemble.num_members)
    groups = _groups(ensemble.num_members, ensemble.nested_sizes if granularity == "nested" else ())
    return _steps(ensemble, NodeCache(x), prefix_flops, limit, deadline, max_flops, groups)


def _groups(num_members: int, nested_sizes: tuple[int, ...]) -> list[range]:
    """The members computed together: one each, or the members each nested size adds to the one before."""
    ends = sorted({n for n in nested_sizes if 0 < n < num_members} | {num_members}) if nested_sizes else \
        range(1, num_members + 1)
    starts = [0, *ends[:-1]]
    return [range(a, b) for a, b in zip(starts, ends)]


def _steps(ensemble, cache, prefix_flops: list[int], limit: int, deadline: float | None,
           max_flops: float | None, groups: list[range]) -> Iterator[AnytimeStep]:
    timer = DeadlineTimer(deadline, cache.input.device)
    state = None
    for group in groups:
        begun = timer.begin()
        done_flops = prefix_flops[group.start - 1] if group.start > 0 else 0
        members = []
        for k in group:  # the members of the group that fit every limit (a prefix: FLOPs grow with k)
            if k >= limit or (k > 0 and (
                    (max_flops is not None and prefix_flops[k] > max_flops)
                    or timer.overruns(begun, done_flops, prefix_flops[k] - done_flops))):
                break
            members.append(k)
        if not members:
            return
        if len(members) > 1:
            with torch.no_grad():
                ensemble.compute_nodes(cache, ensemble.graph.nodes_for(members))
        for k in members:
            if k > members[0]:  # the nodes are computed: only the time already past the deadline stops
                if timer.overruns(timer.begin(), prefix_flops[k - 1], 0):
                    return
            with torch.no_grad():
                logits = ensemble.member_logits(cache, k)
                state = ensemble.aggregator.update(state, logits, k)
                prediction = ensemble.aggregator.value(state)
            done = timer.end()
            yield AnytimeStep(prediction, logits, k + 1, prefix_flops[k], done)
        if len(members) < len(group):
            return
