"""Counting forward FLOPs with PyTorch's own counter.

ensemblekit counts a multiply-add as **2 FLOPs** (PyTorch's
``FlopCounterMode`` convention). The papers it reproduces (HNE, MSDNet/IMTA,
EnsembleNet) count a multiply-add as one FLOP, i.e. they report MACs:
divide by 2 ([`flops_to_macs()`][ensemblekit.core.flops.flops_to_macs]) to compare.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FLOPS_NOTE", "count_flops", "count_flops_meta", "flops_to_macs"]

FLOPS_NOTE = "FLOPs count a multiply-add as 2 (the papers' FLOPs are MACs: half of these)"
"""The one line every report header carries about how FLOPs are counted."""


def flops_to_macs(flops: float) -> float:
    """Multiply-accumulates of ``flops`` counted by [`count_flops()`][ensemblekit.core.flops.count_flops] (a
    multiply-add is 2 FLOPs, 1 MAC).

    Exact: the counter only counts matrix products and convolutions, each
    multiply-add as 2.

    Examples:
        >>> flops_to_macs(48)
        24.0
    """
    return flops / 2


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


def count_flops_meta(module: nn.Module, *args: Any) -> tuple[int, Any]:
    """Forward FLOPs and output of ``module(*args)`` on the meta device, ``args`` already there.

    The module's parameters and buffers are swapped for meta tensors of the
    same shape and dtype (``torch.func.functional_call``): nothing is
    computed or allocated, and the count is the same on every device. Fused
    kernels the counter does not know (the CPU's attention and LSTM, which
    would count 0) run as their decomposition into matrix products, which it
    counts.

    Examples:
        >>> flops, out = count_flops_meta(torch.nn.Linear(4, 3), torch.zeros(2, 4, device="meta"))
        >>> flops, out.device.type
        (48, 'meta')
    """
    tensors = {name: torch.empty_like(t, device="meta")
               for name, t in (*module.named_parameters(), *module.named_buffers())}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = functional_call(module, tensors, args)
    return int(counter.get_total_flops()), out
