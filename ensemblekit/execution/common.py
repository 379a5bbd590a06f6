"""Helpers the batching executors share: input layouts, packed tensors, packed parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ensemblekit.core.blocks import State

__all__ = ["PackCache", "as_channels_last", "as_tuple", "distinct", "mismatch", "packed_base", "write_back"]


def as_tuple(state: State) -> tuple[Any, ...]:
    """A state as a tuple of values (a plain tensor becomes a 1-tuple)."""
    return state if isinstance(state, tuple) else (state,)


def as_channels_last(state: State) -> State:
    """The state with every 4-D floating-point tensor given channels-last strides."""
    def convert(v: Any) -> Any:
        if isinstance(v, Tensor) and v.ndim == 4 and v.is_floating_point():
            return v.contiguous(memory_format=torch.channels_last)
        return v

    return tuple(convert(v) for v in state) if isinstance(state, tuple) else convert(state)


def mismatch(modules: Sequence[nn.Module], inputs: Sequence[State]) -> str | None:
    """Why the nodes cannot be batched together (different structure or input layout)."""
    shapes = [[(k, p.shape) for k, p in m.named_parameters()] for m in modules]
    if any(s != shapes[0] for s in shapes[1:]) or any(type(m) is not type(modules[0]) for m in modules):
        return "the nodes are not copies of one block"
    specs = [tree_flatten(as_tuple(s))[1] for s in inputs]
    if any(s != specs[0] for s in specs[1:]):
        return "the input states differ in structure"
    return None


def distinct(values: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """Distinct objects (by identity) in first-seen order, and each value's position among them."""
    position: dict[int, int] = {}
    unique: list[Any] = []
    index = []
    for v in values:
        if id(v) not in position:
            position[id(v)] = len(unique)
            unique.append(v)
        index.append(position[id(v)])
    return unique, index


def packed_base(chunks: Sequence[Tensor], dim: int, stacked: bool) -> Tensor | None:
    """The tensor that ``chunks`` are consecutive slices of along ``dim``, if any.

    ``stacked``: the chunks are ``base[i]`` along ``dim`` (a stack), else equal
    slices of ``base`` along ``dim`` (a concatenation).
    """
    base = chunks[0]._base
    if base is None or len(chunks) < 2 or not all(c._base is base for c in chunks):
        return None
    size = 1 if stacked else chunks[0].shape[dim]
    expected = list(chunks[0].shape)
    if stacked:
        expected.insert(dim, len(chunks))
    else:
        expected[dim] = size * len(chunks)
    if list(base.shape) != expected:
        return None
    step = base.stride(dim) * size
    strides = [s for d, s in enumerate(base.stride()) if not (stacked and d == dim)]
    for i, c in enumerate(chunks):
        if list(c.stride()) != strides or c.storage_offset() != base.storage_offset() + i * step:
            return None
    return base


class PackCache:
    """Parameters and buffers of the nodes combined into one tensor per name.

    Combined anew on every call that may need gradients or changes buffers;
    reused in inference (no grad, eval mode) while no node tensor changed
    (same data pointers and version counters).
    """

    def __init__(self) -> None:
        # ids -> (the nodes, kept alive so their ids stay theirs; stamp; packed tensors)
        self._entries: dict[tuple[int, ...], tuple[tuple[nn.Module, ...], tuple, tuple[dict, dict]]] = {}

    def get(self, modules: Sequence[nn.Module],
            combine: Callable[[list[Tensor]], Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        named = [(dict(m.named_parameters()), dict(m.named_buffers())) for m in modules]
        reuse = not torch.is_grad_enabled() and not modules[0].training and not torch.compiler.is_compiling()
        if reuse:
            key = tuple(id(m) for m in modules)
            stamp = tuple((t.data_ptr(), t._version) for p, b in named for t in (*p.values(), *b.values()))
            entry = self._entries.get(key)
            if entry is not None and entry[1] == stamp:
                return entry[2]
        params, buffers = ({k: combine([n[part][k] for n in named]) for k in named[0][part]} for part in (0, 1))
        packed = (params, buffers)
        if reuse:
            self._entries[key] = (tuple(modules), stamp, packed)
        return packed

    def forget(self, modules: Sequence[nn.Module]) -> None:
        self._entries.pop(tuple(id(m) for m in modules), None)


@torch.no_grad()
def write_back(modules: Sequence[nn.Module], packed: dict[str, Tensor],
                part: Callable[[Tensor, int], Tensor]) -> None:
    """Copy updated running statistics into each node; add counter increments."""
    increments = {k: packed[k] - b for k, b in modules[0].named_buffers() if packed[k].ndim == 0}
    for i, m in enumerate(modules):
        for k, buf in m.named_buffers():
            if k in increments:  # one counter shared by the packed nodes
                buf.add_(increments[k])
            else:
                buf.copy_(part(packed[k], i))
