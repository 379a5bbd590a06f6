"""FLOPs and parameters of every prefix of members, each shared node counted once.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the
plain per-node modules (one image, eval mode), never from formulas, and a
multiply-add counts as 2 FLOPs (the papers' FLOPs are MACs, half of these:
[`PrefixCost.macs`][ensemblekit.core.cost.PrefixCost.macs]). The count depends on the input shape, so costs are
measured per ``(channels, H, W)``, when first asked for, and cached by the
ensemble; the dtype does not change a count.

The nodes run on the meta device ([`count_flops_meta()`][ensemblekit.core.flops.count_flops_meta]):
nothing is computed, and fused kernels such as the CPU's attention count as
the matrix products they perform. A block that cannot run there (one that
holds a plain tensor, or reads a value with ``.item()``) is counted by
running the ensemble on a zero image on its own device instead.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, SupportsIndex, overload

import torch
from torch import nn

from ensemblekit.core.blocks import State, call_block
from ensemblekit.core.flops import FLOPS_NOTE, count_flops, count_flops_meta, flops_to_macs
from ensemblekit.core.formatting import format_si
from ensemblekit.errors import EnsembleKitError

__all__ = ["CostError", "CostTable", "EnsembleCosts", "PrefixCost", "Shape", "cost_shape", "measure_costs"]

Shape = tuple[int, int, int]


class CostError(EnsembleKitError, ValueError):
    """An input size at which costs cannot be measured (malformed, or one the backbone does not accept)."""


@dataclass(frozen=True)
class PrefixCost:
    """Cost of the first ``members`` members: forward FLOPs per image and parameters.

    ``flops`` counts a multiply-add as 2; ``macs`` is the papers' unit (half).
    """

    members: int
    flops: int
    params: int

    @property
    def macs(self) -> float:
        """Multiply-accumulates per image (what HNE, MSDNet and IMTA call FLOPs)."""
        return flops_to_macs(self.flops)


class CostTable(list[PrefixCost]):
    """The cost of the first ``k`` members for ``k = 1..M``: a list of [`PrefixCost`][ensemblekit.core.cost.PrefixCost].

    Code reads it as the list it is (``table[0].flops``, ``len(table)``,
    iteration, comparison with a list); printed, it is an aligned table with
    FLOPs, MACs and parameters in SI units (``35.6M``) and each prefix's FLOPs
    relative to one member's. A slice is a `CostTable` too.

    Args:
        rows: the prefix costs, in member order.
        input_size: ``(C, H, W)`` of the image the FLOPs are counted on, for
            the title line; ``None`` leaves the size out.

    Examples:
        >>> table = CostTable([PrefixCost(1, 2_000_000, 11_000), PrefixCost(2, 3_000_000, 20_500)], (3, 32, 32))
        >>> table[1].flops, len(table)
        (3000000, 2)
        >>> print(table)  # doctest: +ELLIPSIS
        Cost of the first k members per 3x32x32 image; FLOPs count a multiply-add as 2 ...
        members  FLOPs   MACs  params  FLOPs vs 1 member
              1  2.00M  1.00M  11.00k              1.00x
              2  3.00M  1.50M  20.50k              1.50x
    """

    def __init__(self, rows: Iterable[PrefixCost] = (), input_size: Sequence[int] | None = None) -> None:
        super().__init__(rows)
        self.input_size = None if input_size is None else tuple(input_size)

    @overload
    def __getitem__(self, index: SupportsIndex) -> PrefixCost: ...

    @overload
    def __getitem__(self, index: slice) -> CostTable: ...

    def __getitem__(self, index: SupportsIndex | slice) -> PrefixCost | CostTable:
        if isinstance(index, slice):
            return CostTable(super().__getitem__(index), self.input_size)
        return super().__getitem__(index)

    def __str__(self) -> str:
        size = "" if self.input_size is None else " per " + "x".join(str(s) for s in self.input_size) + " image"
        title = f"Cost of the first k members{size}; {FLOPS_NOTE}"
        header = ("members", "FLOPs", "MACs", "params", "FLOPs vs 1 member")
        base = self[0].flops if len(self) and self[0].flops else None
        rows = [(str(r.members), format_si(r.flops), format_si(r.macs), format_si(r.params),
                 "-" if base is None else f"{r.flops / base:.2f}x") for r in self]
        widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in (header, *rows)]
        return "\n".join([title, *lines])

    __repr__ = __str__


@dataclass
class EnsembleCosts:
    """Per-node and per-head FLOPs (one image of ``input_size``) and parameter counts of an ensemble."""

    node_flops: list[int]
    node_params: list[int]
    head_flops: list[int]
    head_params: list[int]
    member_paths: list[tuple[int, ...]]
    input_size: tuple[int, int]
    in_chans: int

    def prefix(self, k: int) -> PrefixCost:
        """Cost of the first ``k`` members: the union of their nodes plus their heads."""
        nodes = {i for path in self.member_paths[:k] for i in path}
        flops = sum(self.node_flops[i] for i in nodes) + sum(self.head_flops[:k])
        params = sum(self.node_params[i] for i in nodes) + sum(self.head_params[:k])
        return PrefixCost(k, flops, params)

    def prefix_table(self) -> CostTable:
        """[`prefix`][ensemblekit.core.cost.EnsembleCosts.prefix] of ``k = 1..M``, as a table that prints aligned."""
        rows = (self.prefix(k) for k in range(1, len(self.member_paths) + 1))
        return CostTable(rows, (self.in_chans, *self.input_size))


def cost_shape(ensemble: Any, input_size: int | Sequence[int] | None = None) -> Shape:
    """``(channels, H, W)`` of the image costs are measured on.

    Args:
        input_size: ``S`` (a square image), ``(H, W)`` or ``(C, H, W)``
            (timm's ``pretrained_cfg["input_size"]``); ``None`` is the
            backbone's own size: the only one it accepts, else the one it was
            made for (timm's ``pretrained_cfg``), else the split's example size.

    Raises:
        CostError: for a malformed size, a channel count other than the
            backbone's, or a size a fixed-size backbone does not accept.
    """
    if input_size is None:
        input_size = ensemble.input_size or ensemble.native_size or ensemble.example_size
    if isinstance(input_size, (tuple, list)):
        sizes = tuple(input_size)
    else:
        sizes = (input_size,) * 2
    try:
        values = tuple(operator.index(s) for s in sizes)
    except TypeError:
        values = ()
    if len(values) not in (2, 3) or min(values) < 1:
        raise CostError(f"input_size must be S, (H, W) or (C, H, W) of positive integers, got {input_size!r}")
    c = values[0] if len(values) == 3 else ensemble.in_chans or 3
    h, w = values[-2:]
    if ensemble.in_chans is not None and c != ensemble.in_chans:
        raise CostError(f"input_size has {c} channels but the backbone takes {ensemble.in_chans}")
    if ensemble.input_size is not None and (h, w) != tuple(ensemble.input_size):
        raise CostError(f"input_size is {(h, w)} but the backbone only accepts {tuple(ensemble.input_size)}")
    return c, h, w


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _signature(module: nn.Module, state: State) -> tuple:
    shapes = tuple(tuple(p.shape) for p in module.parameters())
    flat = state if isinstance(state, tuple) else (state,)
    inputs = tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else repr(v) for v in flat)
    return type(module).__name__, shapes, inputs


def _dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the first floating-point parameter (what the example image must be)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())


@torch.no_grad()
def measure_costs(ensemble: Any, shape: Shape) -> EnsembleCosts:
    """Count FLOPs of every node and head of ``ensemble`` on one image of ``shape`` ``(C, H, W)``."""
    modes = {module: module.training for module in ensemble.modules()}
    ensemble.eval()
    try:
        try:
            node_flops, head_flops = _count(ensemble, torch.zeros(1, *shape, dtype=_dtype(ensemble), device="meta"))
        except (RuntimeError, NotImplementedError):  # a block that needs real values or holds a plain tensor
            device = next(ensemble.parameters()).device
            node_flops, head_flops = _count(ensemble, torch.zeros(1, *shape, dtype=_dtype(ensemble), device=device))
    finally:
        for module, mode in modes.items():  # not train(): frozen parts keep their own mode
            module.training = mode
    return EnsembleCosts(
        node_flops=node_flops,
        node_params=[_params(n) for n in ensemble.nodes],
        head_flops=head_flops,
        head_params=[_params(h) for h in ensemble.heads],
        member_paths=[m.path for m in ensemble.graph.members],
        input_size=(shape[1], shape[2]),
        in_chans=shape[0],
    )


def _count(ensemble: Any, x: torch.Tensor) -> tuple[list[int], list[int]]:
    """FLOPs of every node and head on ``x``; modules of one structure and input shape are run once."""
    memo: dict[tuple, tuple[int, Any]] = {}

    def run(module: nn.Module, state: State) -> tuple[int, Any]:
        key = _signature(module, state)
        if key not in memo:
            if x.device.type == "meta":
                memo[key] = count_flops_meta(module, *(state if isinstance(state, tuple) else (state,)))
            else:
                out: list[Any] = []
                memo[key] = count_flops(lambda: out.append(call_block(module, state))), out[0]
        return memo[key]

    states: dict[int, State] = {}
    node_flops = []
    for node in ensemble.graph.nodes:
        flops, states[node.index] = run(ensemble.nodes[node.index], x if node.parent is None else states[node.parent])
        node_flops.append(flops)
    exits = [member.exit_node for member in ensemble.graph.members]
    head_flops = [run(head, states[node])[0] for head, node in zip(ensemble.heads, exits)]
    return node_flops, head_flops
