"""Sharing topologies: which parameter copies of each block exist, and who uses them.

Each builds a [`NodeGraph`][ensemblekit.core.graph.NodeGraph] (nodes = parameter
copies of blocks, members = root-to-exit paths, in depth-first anytime order).

| topology | copies of block b | members |
| --- | --- | --- |
| [`Independent`][ensemblekit.components.topologies.Independent] (deep ensemble) | N | N paths that share nothing |
| [`MultiBranch`][ensemblekit.components.topologies.MultiBranch] (EnsembleNet) | 1 before the fork, N from it | N |
| [`Tree`][ensemblekit.components.topologies.Tree] (HNE) | k^b | k^B leaves |
| [`Chain`][ensemblekit.components.topologies.Chain] (multi-exit, MSDNet/IMTA) | 1 | one exit after each chosen block |
| [`Cascade`][ensemblekit.components.topologies.Cascade] (IRENE) | N, run member by member, trained stage by stage | N |
"""

from __future__ import annotations

from ensemblekit.core.graph import GraphBuilder, Member, NodeGraph, SharingTopology, positive_int
from ensemblekit.errors import InvalidValueError

__all__ = ["Cascade", "Chain", "Independent", "MultiBranch", "SharingTopology", "Tree"]


class Independent(SharingTopology):
    """N separate networks (a deep ensemble): nothing is shared."""

    name = "independent"

    def __init__(self, members: int = 4):
        self.members = positive_int("members", members)

    def build(self, num_blocks: int) -> NodeGraph:
        g = GraphBuilder()
        members = [Member(m, tuple(g.chain(0, num_blocks, None))) for m in range(self.members)]
        return NodeGraph(g.nodes, members, tuple(range(1, self.members + 1)))


class Cascade(Independent):
    """IRENE's sequential ensemble: independent members, evaluated and trained one after another.

    The nodes are those of [`Independent`][ensemblekit.components.topologies.Independent]; what differs is the order
    (Li et al., AAAI 2023, Sec. 3 and Algorithm 1):

    * evaluated strictly member by member: a forward pass has member ``k``'s
      logits before it runs any node of member ``k + 1`` (``sequential``);
    * trained stage by stage: the trainer's default schedule for a cascade is
      IRENE's "sequential" one
      ([`ensemblekit.methods.irene.schedule.sequential()`][ensemblekit.methods.irene.schedule.sequential]),
      member ``t`` trained at step ``t`` with members ``1..t-1`` frozen, whatever the loss.
    """

    name = "cascade"
    sequential = True


class MultiBranch(SharingTopology):
    """A shared trunk up to block ``fork``, then N branches (EnsembleNet, Lee et al.).

    Args:
        branches: number of branches (members).
        fork: first block that is copied per branch; negative counts from the
            end (``-1``: only the last block is branched).
        num_blocks: blocks to cut the backbone into (``None``: natural stages).
    """

    name = "multi_branch"

    def __init__(self, branches: int = 2, fork: int = -1, num_blocks: int | None = None):
        self.branches = positive_int("branches", branches)
        self.fork = fork
        self._num_blocks = None if num_blocks is None else positive_int("num_blocks", num_blocks, 2)

    @property
    def num_blocks(self) -> int | None:
        return self._num_blocks

    def fork_block(self, num_blocks: int) -> int:
        fork = self.fork + num_blocks if self.fork < 0 else self.fork
        if not 1 <= fork < num_blocks:
            raise InvalidValueError(
                f"fork={self.fork} is outside the backbone's {num_blocks} blocks: "
                f"use a fork in 1..{num_blocks - 1} (or -1..-{num_blocks - 1} from the end)"
            )
        return fork

    def build(self, num_blocks: int) -> NodeGraph:
        fork = self.fork_block(num_blocks)
        g = GraphBuilder()
        trunk = g.chain(0, fork, None)
        members = [
            Member(m, tuple(trunk + g.chain(fork, num_blocks, trunk[-1]))) for m in range(self.branches)
        ]
        sizes = (1, self.branches) if self.branches > 1 else (1,)
        return NodeGraph(g.nodes, members, sizes)


class Tree(SharingTopology):
    """HNE's hierarchy: block ``b`` has ``branching^b`` copies, ``branching^depth`` members.

    The backbone is cut into ``depth + 1`` blocks; after every block but the
    last each path splits into ``branching`` children (Ruiz & Verbeek, Sec. 3).
    Members are the leaves in depth-first order, so the first ``branching^b``
    members are exactly one subtree (Eq. 1).
    """

    name = "tree"

    def __init__(self, depth: int = 4, branching: int = 2):
        self.depth = positive_int("depth", depth, 0)
        self.branching = positive_int("branching", branching, 2)

    @property
    def num_blocks(self) -> int:
        return self.depth + 1

    def build(self, num_blocks: int) -> NodeGraph:
        if num_blocks != self.depth + 1:
            raise InvalidValueError(f"a tree of depth {self.depth} needs {self.depth + 1} blocks, got {num_blocks}")
        g = GraphBuilder()
        # Breadth-first node creation keeps each level contiguous; depth-first
        # member order is then read off the leaves, which are created in it.
        level = [g.add(0, None)]
        for block in range(1, num_blocks):
            level = [g.add(block, parent) for parent in level for _ in range(self.branching)]
        members: list[Member] = []
        for leaf in level:
            path = [leaf]
            while (parent := g.nodes[path[0]].parent) is not None:
                path.insert(0, parent)
            members.append(Member(len(members), tuple(path)))
        sizes = tuple(self.branching**b for b in range(self.depth + 1))
        return NodeGraph(g.nodes, members, sizes)


class Chain(SharingTopology):
    """One network with an exit head after each chosen block (MSDNet / IMTA).

    Args:
        exits: 0-based block indices followed by an exit, in increasing order
            (``None``: after every block). The last block's exit uses the
            backbone's own head; the others get an exit head.
        num_blocks: blocks to cut the backbone into (``None``: natural stages).
    """

    name = "chain"

    def __init__(self, exits: list[int] | None = None, num_blocks: int | None = None):
        self.exits = None if exits is None else [int(e) for e in exits]
        self._num_blocks = None if num_blocks is None else positive_int("num_blocks", num_blocks)

    @property
    def num_blocks(self) -> int | None:
        return self._num_blocks

    def exit_blocks(self, num_blocks: int) -> list[int]:
        exits = list(range(num_blocks)) if self.exits is None else self.exits
        if not exits or sorted(set(exits)) != exits or exits[0] < 0 or exits[-1] >= num_blocks:
            raise InvalidValueError(
                f"exits must be increasing block indices in 0..{num_blocks - 1}, got {self.exits}"
            )
        return exits

    def build(self, num_blocks: int) -> NodeGraph:
        g = GraphBuilder()
        path = g.chain(0, num_blocks, None)
        exits = self.exit_blocks(num_blocks)
        members = [Member(m, tuple(path[: e + 1])) for m, e in enumerate(exits)]
        return NodeGraph(g.nodes, members, tuple(range(1, len(exits) + 1)))
