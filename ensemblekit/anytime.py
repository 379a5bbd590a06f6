"""Anytime inference: prefix ensembles of 1, 2, ... members in depth-first order.

Moving from member ``k`` to ``k+1`` computes only the nodes member ``k+1``
adds (HNE, Sec. 3: "the first evaluated leaf model is always the same"); the
caller may stop at any step, and the iterator stops by itself at a wall-clock
deadline, a FLOPs budget or a member count.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AnytimeStep:
    """One step of anytime inference.

    Attributes:
        prediction: aggregated prediction ``[B, C]`` of the members so far.
        members: how many members it uses.
        flops: FLOPs per image spent so far (shared nodes once).
        seconds: wall-clock seconds since the iteration started.
    """

    prediction: Tensor
    members: int
    flops: int
    seconds: float


def anytime(ensemble, x: Tensor, deadline: float | None = None, max_flops: float | None = None,
            max_members: int | None = None) -> Iterator[AnytimeStep]:
    """Yield :class:`AnytimeStep` for ``k = 1, 2, ...`` members until a limit is reached.

    Args:
        ensemble: an :class:`~ensemblekit.Ensemble`.
        x: images ``[B, C, H, W]``.
        deadline: stop once this many seconds have passed (the step in flight
            finishes; the first step is always produced).
        max_flops: do not start a member whose prefix would exceed this many
            FLOPs per image (the first member always runs).
        max_members: stop after this many members.
    """
    from ensemblekit.ensemble import NodeCache

    ensemble.check_input(x)
    costs = ensemble.cost_table()
    limit = ensemble.num_members if max_members is None else min(max_members, ensemble.num_members)
    start = time.perf_counter()
    cache, state = NodeCache(x), None
    with torch.no_grad():
        for k in range(limit):
            if k > 0 and max_flops is not None and costs[k].flops > max_flops:
                return
            logits = ensemble.member_logits(cache, k)
            state = ensemble.aggregator.update(state, logits, k)
            elapsed = time.perf_counter() - start
            yield AnytimeStep(ensemble.aggregator.value(state), k + 1, costs[k].flops, elapsed)
            if deadline is not None and time.perf_counter() - start >= deadline:
                return
