"""Grouping consecutive pieces of a network into blocks of balanced cost."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ensemblekit.splitting.errors import SplitError

__all__ = ["balance"]


def balance(costs: Sequence[float], num_blocks: int, *, min_share: float = 0.02) -> list[int]:
    """Group consecutive pieces into ``num_blocks`` blocks of balanced cost.

    A dynamic programme first finds the smallest possible cost of the largest
    block, then, among the groupings that reach it, the one with the smallest
    sum of squared block costs. Blocks costing less than ``min_share`` of the
    total are avoided when possible (if not, the threshold is lowered step by
    step, and blocks without any cost come last).

    Args:
        costs: cost (e.g. FLOPs) of each piece, in order.
        num_blocks: number of blocks, between 1 and ``len(costs)``.
        min_share: blocks below this fraction of the total cost are avoided.

    Returns:
        The end (exclusive piece index) of each block; the last one is ``len(costs)``.

    Raises:
        SplitError: when ``num_blocks`` is not between 1 and ``len(costs)``.

    Examples:
        >>> balance([4, 1, 1, 1, 1], 2)
        [1, 5]
    """
    m = len(costs)
    if not 1 <= num_blocks <= m:
        raise SplitError(f"cannot make {num_blocks} blocks from {m} pieces: at most {m} blocks are possible")
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=np.float64))])
    total = prefix[-1]
    for floor in (min_share * total, min_share * total / 4, min_share * total / 16, min(total, 1.0) * 1e-12, 0.0):
        largest = _min_largest(prefix, num_blocks, floor)
        if np.isfinite(largest):
            break
    limit = largest * (1 + 1e-9) + 1e-9
    return _min_squares(prefix, num_blocks, floor, limit)


def _block_costs(prefix: np.ndarray, start: int, end: int) -> np.ndarray:
    """Costs of the blocks ``(t, end]`` for ``t`` in ``start..end-1``."""
    return prefix[end] - prefix[start:end]


def _min_largest(prefix: np.ndarray, k: int, floor: float) -> float:
    """Smallest possible cost of the largest block, with every block costing at least ``floor``."""
    m = len(prefix) - 1
    best = np.full((k + 1, m + 1), np.inf)
    best[0, 0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, m + 1):
            cost = _block_costs(prefix, j - 1, i)
            value = np.maximum(best[j - 1, j - 1:i], cost)
            value[cost < floor] = np.inf
            best[j, i] = value.min()
    return float(best[k, m])


def _min_squares(prefix: np.ndarray, k: int, floor: float, limit: float) -> list[int]:
    """Block ends minimising the sum of squared costs, each block between ``floor`` and ``limit``."""
    m = len(prefix) - 1
    best = np.full((k + 1, m + 1), np.inf)
    best[0, 0] = 0.0
    choice = np.zeros((k + 1, m + 1), dtype=np.int64)
    for j in range(1, k + 1):
        for i in range(j, m + 1):
            cost = _block_costs(prefix, j - 1, i)
            value = best[j - 1, j - 1:i] + cost**2
            value[(cost > limit) | (cost < floor)] = np.inf
            t = int(np.argmin(value))
            best[j, i], choice[j, i] = value[t], t + j - 1
    ends, i = [], m
    for j in range(k, 0, -1):
        ends.append(i)
        i = int(choice[j, i])
    return ends[::-1]
