"""Sharing topologies: which parameter copies of each block exist, and who uses them.

Every topology is one data structure, a :class:`NodeGraph`: a forest of
*nodes* (a node is one parameter copy of block ``b``; its parent is a node of
block ``b-1``) and a list of *members* (a member is a path from a root to the
node after which its head sits). Members are listed in anytime order: the
depth-first order of the tree, so the first ``k`` members are always the same
``k`` and, in a ``k``-ary tree, the first ``k^b`` members form one subtree.

| topology | copies of block b | members |
| --- | --- | --- |
| :class:`Independent` (deep ensemble) | N | N paths that share nothing |
| :class:`MultiBranch` (EnsembleNet) | 1 before the fork, N from it | N |
| :class:`Tree` (HNE) | k^b | k^B leaves |
| :class:`Chain` (multi-exit, MSDNet/IMTA) | 1 | one exit after each chosen block |
| :class:`Cascade` (IRENE) | N, evaluated strictly member by member | N |
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    """One parameter copy of block ``block``; ``parent`` is a node of ``block - 1``."""

    index: int
    block: int
    parent: int | None


@dataclass(frozen=True)
class Member:
    """A path of node indices from a root to the node its head follows."""

    index: int
    path: tuple[int, ...]

    @property
    def exit_node(self) -> int:
        return self.path[-1]


class NodeGraph:
    """Nodes and members of a topology, and what follows from them.

    The one question behind anytime evaluation, prefix costs and halting is
    :meth:`new_nodes`: which nodes member ``k`` adds to members ``0..k-1``.
    """

    def __init__(self, nodes: list[Node], members: list[Member], nested_sizes: tuple[int, ...]):
        self.nodes = nodes
        self.members = members
        self.nested_sizes = nested_sizes
        self._validate()
        self.levels = self._levels()
        """Node indices grouped by block, in node order (a plain attribute:
        ``functools.cached_property`` takes a lock that ``torch.compile`` cannot trace)."""

    def _validate(self) -> None:
        for i, node in enumerate(self.nodes):
            if node.index != i:
                raise ValueError(f"node {i} has index {node.index}")
            if node.parent is None:
                if node.block != 0:
                    raise ValueError(f"root node {i} must be a copy of block 0")
            elif self.nodes[node.parent].block != node.block - 1:
                raise ValueError(f"node {i} (block {node.block}) has a parent of another level")
        for member in self.members:
            for parent, child in zip(member.path, member.path[1:]):
                if self.nodes[child].parent != parent:
                    raise ValueError(f"member {member.index} path is not a chain of parent links")
        if not self.members:
            raise ValueError("a topology needs at least one member")

    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def _levels(self) -> list[list[int]]:
        depth = max(node.block for node in self.nodes) + 1
        levels: list[list[int]] = [[] for _ in range(depth)]
        for node in self.nodes:
            levels[node.block].append(node.index)
        return levels

    def prefix_nodes(self, k: int) -> list[int]:
        """Nodes used by the first ``k`` members, each once, in node order."""
        used = {i for member in self.members[:k] for i in member.path}
        return sorted(used)

    def new_nodes(self, k: int) -> list[int]:
        """Nodes member ``k`` (0-based) needs that members ``0..k-1`` did not."""
        seen = {i for member in self.members[:k] for i in member.path}
        return [i for i in self.members[k].path if i not in seen]

    def nodes_for(self, members: list[int]) -> list[int]:
        """Nodes needed to evaluate the given members, in node (level) order."""
        return sorted({i for m in members for i in self.members[m].path})


class SharingTopology(ABC):
    """Builds the :class:`NodeGraph` for a backbone cut into ``num_blocks`` blocks.

    ``num_blocks`` says how many blocks the topology wants from the splitter
    (``None``: the backbone's natural stages). ``sequential`` topologies are
    evaluated strictly member by member (a cascade), others level by level.
    """

    name: str = ""
    sequential: bool = False

    @property
    def num_blocks(self) -> int | None:
        return None

    @abstractmethod
    def build(self, num_blocks: int) -> NodeGraph:
        """The node graph for a backbone of ``num_blocks`` blocks."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k.lstrip('_')}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[Node] = []

    def add(self, block: int, parent: int | None) -> int:
        self.nodes.append(Node(len(self.nodes), block, parent))
        return len(self.nodes) - 1

    def chain(self, start_block: int, end_block: int, parent: int | None) -> list[int]:
        """Add one node per block in ``start_block..end_block-1`` below ``parent``."""
        path = []
        for block in range(start_block, end_block):
            parent = self.add(block, parent)
            path.append(parent)
        return path


class Independent(SharingTopology):
    """N separate networks (a deep ensemble): nothing is shared."""

    name = "independent"

    def __init__(self, members: int = 4):
        self.members = _positive("members", members)

    def build(self, num_blocks: int) -> NodeGraph:
        g = _GraphBuilder()
        members = [Member(m, tuple(g.chain(0, num_blocks, None))) for m in range(self.members)]
        return NodeGraph(g.nodes, members, tuple(range(1, self.members + 1)))


class Cascade(Independent):
    """IRENE's sequential ensemble: independent members, evaluated strictly in order."""

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
        self.branches = _positive("branches", branches)
        self.fork = fork
        self._num_blocks = None if num_blocks is None else _positive("num_blocks", num_blocks, 2)

    @property
    def num_blocks(self) -> int | None:
        return self._num_blocks

    def fork_block(self, num_blocks: int) -> int:
        fork = self.fork + num_blocks if self.fork < 0 else self.fork
        if not 1 <= fork < num_blocks:
            raise ValueError(
                f"fork={self.fork} is outside the backbone's {num_blocks} blocks: "
                f"use a fork in 1..{num_blocks - 1} (or -1..-{num_blocks - 1} from the end)"
            )
        return fork

    def build(self, num_blocks: int) -> NodeGraph:
        fork = self.fork_block(num_blocks)
        g = _GraphBuilder()
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
        self.depth = _positive("depth", depth, 0)
        self.branching = _positive("branching", branching, 2)

    @property
    def num_blocks(self) -> int:
        return self.depth + 1

    def build(self, num_blocks: int) -> NodeGraph:
        if num_blocks != self.depth + 1:
            raise ValueError(f"a tree of depth {self.depth} needs {self.depth + 1} blocks, got {num_blocks}")
        g = _GraphBuilder()
        # Breadth-first node creation keeps each level contiguous; depth-first
        # member order is then read off the leaves, which are created in it.
        level = [g.add(0, None)]
        for block in range(1, num_blocks):
            level = [g.add(block, parent) for parent in level for _ in range(self.branching)]
        members = []
        for leaf in level:
            path = [leaf]
            while g.nodes[path[0]].parent is not None:
                path.insert(0, g.nodes[path[0]].parent)
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
        self._num_blocks = None if num_blocks is None else _positive("num_blocks", num_blocks)

    @property
    def num_blocks(self) -> int | None:
        return self._num_blocks

    def exit_blocks(self, num_blocks: int) -> list[int]:
        exits = list(range(num_blocks)) if self.exits is None else self.exits
        if not exits or sorted(set(exits)) != exits or exits[0] < 0 or exits[-1] >= num_blocks:
            raise ValueError(
                f"exits must be increasing block indices in 0..{num_blocks - 1}, got {self.exits}"
            )
        return exits

    def build(self, num_blocks: int) -> NodeGraph:
        g = _GraphBuilder()
        path = g.chain(0, num_blocks, None)
        exits = self.exit_blocks(num_blocks)
        members = [Member(m, tuple(path[: e + 1])) for m, e in enumerate(exits)]
        return NodeGraph(g.nodes, members, tuple(range(1, len(exits) + 1)))
