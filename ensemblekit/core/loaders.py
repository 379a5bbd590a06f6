"""Draining data: the one way ensemblekit reads ``(images, labels)`` batches from what it is given."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor

__all__ = ["iter_batches"]


def iter_batches(data: Any, batch_size: int = 256) -> Iterator[tuple[Any, Any]]:
    """``(images, labels)`` batches of a loader, or of an ``(images, labels)`` pair cut into ``batch_size``.

    Args:
        data: an iterable of ``(images, labels, ...)`` batches (a ``DataLoader``,
            a list of tuples; extra items are ignored), or an ``(images, labels)``
            pair of tensors.
        batch_size: batch size used for a pair of tensors.

    Examples:
        >>> import torch
        >>> [tuple(x.shape) for x, _ in iter_batches((torch.zeros(5, 3), torch.zeros(5)), 2)]
        [(2, 3), (2, 3), (1, 3)]
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
        return
    for batch in data:
        yield batch[0], batch[1]
