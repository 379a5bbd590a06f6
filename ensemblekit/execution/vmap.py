"""``vmap``: ``torch.func.vmap`` over the nodes' parameters, stacked on the fly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ensemblekit.core.blocks import State
from ensemblekit.core.interfaces import Executor
from ensemblekit.errors import InvalidValueError
from ensemblekit.execution.common import PackCache, as_tuple, distinct, mismatch, packed_base, write_back

__all__ = ["VmapExecutor"]


class VmapExecutor(Executor):
    """``torch.func.vmap`` over the nodes' parameters and buffers, stacked on the fly.

    Works for any block whose forward has no data-dependent Python control
    flow. Inputs shared by all nodes are passed once (not stacked); random ops
    draw different numbers per node.
    """

    name = "vmap"

    def __init__(self) -> None:
        self._packs = PackCache()

    def forget(self, modules: Sequence[nn.Module]) -> None:
        self._packs.forget(modules)

    def unsupported(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> str | None:
        if modules[0].training:
            for m in modules[0].modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum is None:
                    return "BatchNorm with momentum=None (cumulative average) needs a per-node Python float"
        return mismatch(modules, inputs)

    def run(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> list[State]:
        reason = self.unsupported(modules, inputs)
        if reason is not None:
            raise InvalidValueError(f"execution 'vmap' cannot run these nodes: {reason}")
        n = len(modules)
        params, buffers = self._packs.get(modules, lambda ts: torch.stack(ts, 0))
        flat_inputs = [tree_flatten(as_tuple(s)) for s in inputs]
        spec = flat_inputs[0][1]
        leaves = list(zip(*(leaves for leaves, _ in flat_inputs)))
        batched, shared, positions = [], [], []
        for j, column in enumerate(leaves):
            first = column[0]
            if isinstance(first, Tensor) and not all(v is first for v in column):
                positions.append(j)
                batched.append(_stack(column, 0))
            else:
                shared.append((j, first))
        template = modules[0]
        out_spec: list[Any] = []

        def one_node(p: dict[str, Tensor], b: dict[str, Tensor], *tensors: Tensor) -> tuple[Tensor, ...]:
            values: list[Any] = [None] * len(leaves)
            for j, v in shared:
                values[j] = v
            for j, v in zip(positions, tensors):
                values[j] = v
            out = functional_call(template, (p, b), tree_unflatten(values, spec), strict=True)
            flat, out_tree = tree_flatten(out)
            out_spec[:] = [out_tree, [None if isinstance(v, Tensor) else v for v in flat]]
            return tuple(v for v in flat if isinstance(v, Tensor))

        stacked_out = vmap(one_node, in_dims=(0, 0) + (0,) * len(batched), randomness="different")(
            params, buffers, *batched)
        if modules[0].training:
            write_back(modules, buffers, lambda t, i: t[i])
        out_tree, constants = out_spec
        outputs = []
        for i in range(n):
            it = iter(stacked_out)
            flat = [next(it)[i] if c is None else c for c in constants]
            outputs.append(tree_unflatten(flat, out_tree))
        return outputs


def _stack(column: Sequence[Tensor], dim: int) -> Tensor:
    """``torch.stack(column, dim)`` of distinct tensors, reusing a packed base when possible."""
    unique, index = distinct(column)
    base = packed_base(unique, dim, stacked=True)
    if base is None:
        base = torch.stack(unique, dim)
    if index == list(range(len(unique))):
        return base
    return base.index_select(dim, torch.tensor(index, device=base.device))
