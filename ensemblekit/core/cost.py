"""FLOPs and parameters of every prefix of members, each shared node counted once.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the
plain per-node modules (one image, eval mode), never from formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ensemblekit.core.blocks import State, call_block
from ensemblekit.core.cache import NodeCache
from ensemblekit.core.flops import count_flops


@dataclass(frozen=True)
class PrefixCost:
    """Cost of the first ``members`` members: forward FLOPs per image and parameters."""

    members: int
    flops: int
    params: int


@dataclass
class EnsembleCosts:
    """Per-node and per-head FLOPs (one image) and parameter counts of an ensemble."""

    node_flops: list[int]
    node_params: list[int]
    head_flops: list[int]
    head_params: list[int]
    member_paths: list[tuple[int, ...]]

    def prefix(self, k: int) -> PrefixCost:
        """Cost of the first ``k`` members: the union of their nodes plus their heads."""
        nodes = {i for path in self.member_paths[:k] for i in path}
        flops = sum(self.node_flops[i] for i in nodes) + sum(self.head_flops[:k])
        params = sum(self.node_params[i] for i in nodes) + sum(self.head_params[:k])
        return PrefixCost(k, flops, params)

    def prefix_table(self) -> list[PrefixCost]:
        return [self.prefix(k) for k in range(1, len(self.member_paths) + 1)]


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _signature(module: nn.Module, state: State) -> tuple:
    shapes = tuple(tuple(p.shape) for p in module.parameters())
    flat = state if isinstance(state, tuple) else (state,)
    inputs = tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else repr(v) for v in flat)
    return type(module).__name__, shapes, inputs


@torch.no_grad()
def measure_costs(ensemble) -> EnsembleCosts:
    """Count FLOPs of every node and head of ``ensemble`` on one example image."""
    h, w = ensemble.input_size or ensemble.example_size
    device = next(ensemble.parameters()).device
    x = torch.zeros(1, ensemble.in_chans or 3, h, w, device=device)
    modes = {module: module.training for module in ensemble.modules()}
    ensemble.eval()
    memo: dict[tuple, int] = {}

    def flops_of(module: nn.Module, state: State) -> int:
        key = _signature(module, state)
        if key not in memo:
            memo[key] = count_flops(lambda: call_block(module, state))
        return memo[key]

    try:
        cache = NodeCache(x)
        node_flops = []
        for node in ensemble.graph.nodes:
            state = cache.output_of(node.parent)
            node_flops.append(flops_of(ensemble.nodes[node.index], state))
            cache.states[node.index] = call_block(ensemble.nodes[node.index], state)
        head_flops = [
            flops_of(head, cache.states[member.exit_node])
            for head, member in zip(ensemble.heads, ensemble.graph.members)
        ]
    finally:
        for module, mode in modes.items():  # not train(): frozen parts keep their own mode
            module.training = mode
    return EnsembleCosts(
        node_flops=node_flops,
        node_params=[_params(n) for n in ensemble.nodes],
        head_flops=head_flops,
        head_params=[_params(h) for h in ensemble.heads],
        member_paths=[m.path for m in ensemble.graph.members],
    )
