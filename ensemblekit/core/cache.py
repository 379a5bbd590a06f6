"""The states computed so far for one batch, so that no node runs twice."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ensemblekit.core.batching import BatchLayoutError, StateLayout, concat_state, select_state
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

    def select(self, keep: Tensor | slice, layouts: Sequence[StateLayout | None]) -> NodeCache:
        """A cache holding only the samples selected by ``keep``.

        Args:
            keep: bool ``[B]``, indices or a slice of the samples kept.
            layouts: per node, which values of its state are per-sample
                ([`select_state()`][ensemblekit.core.batching.select_state]); the rest,
                side inputs and sizes, are kept whole.
        """
        b = self.batch_size
        out = NodeCache(self.input[keep])
        out.states = {i: select_state(s, keep, b, layouts[i], f"the state of node {i}") for i, s in self.states.items()}
        out.logits = {m: z[keep] for m, z in self.logits.items()}
        return out

    @classmethod
    def concat(cls, caches: Sequence[NodeCache], layouts: Sequence[StateLayout | None]) -> NodeCache:
        """One cache holding the samples of every cache in turn (the inverse of
        [`select()`][ensemblekit.core.cache.NodeCache.select]).

        Every cache must hold the same nodes and member logits (samples at
        the same point of the ensemble); values of a state that are not
        per-sample (``layouts``) must be the same in all of them and are kept once.
        """
        if len(caches) == 1:
            return caches[0]
        first = caches[0]
        for cache in caches[1:]:
            if cache.states.keys() != first.states.keys() or cache.logits.keys() != first.logits.keys():
                raise BatchLayoutError(f"caches holding nodes {sorted(first.states)} and {sorted(cache.states)} "
                                       "cannot be joined: their samples are at different points of the ensemble")
        sizes = [c.batch_size for c in caches]
        out = cls(torch.cat([c.input for c in caches]))
        out.states = {i: concat_state([c.states[i] for c in caches], sizes, layouts[i], f"the state of node {i}")
                      for i in first.states}
        out.logits = {m: torch.cat([c.logits[m] for c in caches]) for m in first.logits}
        return out
