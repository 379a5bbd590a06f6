"""Counting forward FLOPs with PyTorch's own counter."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn_or_module: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Forward FLOPs of one call ``fn_or_module(*args, **kwargs)``.

    The call runs under ``torch.no_grad()`` inside
    ``torch.utils.flop_counter.FlopCounterMode``, so only the forward pass is
    counted (a multiply-add counts as 2 FLOPs). Operators the counter does not
    know (element-wise ops, pooling, normalisation) count as 0.

    Args:
        fn_or_module: a module or any callable.
        *args: positional arguments of the call.
        **kwargs: keyword arguments of the call.

    Returns:
        The total FLOPs of the call, for the whole batch.

    Examples:
        >>> import torch
        >>> count_flops(torch.nn.Linear(4, 3), torch.zeros(2, 4))
        48
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn_or_module(*args, **kwargs)
    return int(counter.get_total_flops())
