"""Dropping samples from everything that carries a batch dimension."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def select_batch(value: Any, keep: Tensor, batch_size: int) -> Any:
    """Keep the samples where ``keep`` (bool ``[B]`` or indices) selects them.

    Tensors whose first dimension is ``batch_size`` are indexed; tuples, lists
    and dicts are walked; anything else (side inputs, sizes, scalars) passes
    through unchanged.
    """
    if isinstance(value, Tensor):
        return value[keep] if value.ndim >= 1 and value.shape[0] == batch_size else value
    if isinstance(value, tuple):
        return tuple(select_batch(v, keep, batch_size) for v in value)
    if isinstance(value, list):
        return [select_batch(v, keep, batch_size) for v in value]
    if isinstance(value, dict):
        return {k: select_batch(v, keep, batch_size) for k, v in value.items()}
    return value
