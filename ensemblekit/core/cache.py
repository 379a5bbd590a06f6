"""The states computed so far for one batch, so that no node runs twice."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ensemblekit.core.batching import StateLayout, select_state
from ensemblekit.core.blocks import State

__all__ = ["NodeCache"]


class NodeCache:
    """States computed so far for one batch: node index -> output state.

    Anytime inference and halting keep one cache per batch, so moving from
    member ``k`` to ``k+1`` computes only the nodes member ``k+1`` adds.
    Member logits are kept too (member index -> ``[B, C]``), for heads that
    read the previous member's logits.
    """

    def __init__(self, x: Tensor):
        self.input = x
        self.states: dict[int, State] = {}
        self.logits: dict[int, Tensor] = {}

    @property
    def batch_size(self) -> int:
        return self.input.shape[0]

    def output_of(self, node: int | None) -> State:
        """The state of ``node``; ``None`` (a root's parent) is the input."""
        return self.input if node is None else self.states[node]

    def select(self, keep: Tensor, layouts: Sequence[StateLayout | None]) -> NodeCache:
        """A cache holding only the samples selected by ``keep``.

        Args:
            keep: bool ``[B]`` or indices of the samples kept.
            layouts: per node, which values of its state are per-sample
                ([`select_state()`][ensemblekit.core.batching.select_state]); the rest,
                side inputs and sizes, are kept whole.
        """
        b = self.batch_size
        out = NodeCache(self.input[keep])
        out.states = {i: select_state(s, keep, b, layouts[i], f"the state of node {i}") for i, s in self.states.items()}
        out.logits = {m: z[keep] for m, z in self.logits.items()}
        return out
