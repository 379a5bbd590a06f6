"""The node graph: one representation for every sharing topology.

Every topology is one data structure, a [`NodeGraph`][ensemblekit.core.graph.NodeGraph]: a forest of
*nodes* (a node is one parameter copy of block ``b``; its parent is a node of
block ``b-1``) and a list of *members* (a member is a path from a root to the
node after which its head sits). Members are listed in anytime order: the
depth-first order of the tree, so the first ``k`` members are always the same
``k`` and, in a ``k``-ary tree, the first ``k^b`` members form one subtree.
[`SharingTopology`][ensemblekit.core.graph.SharingTopology] is the interface that builds one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ensemblekit.errors import InvalidValueError


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
    [`new_nodes()`][ensemblekit.core.graph.NodeGraph.new_nodes]: which nodes member ``k`` adds to members ``0..k-1``.
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
                raise InvalidValueError(f"node {i} has index {node.index}")
            if node.parent is None:
                if node.block != 0:
                    raise InvalidValueError(f"root node {i} must be a copy of block 0")
            elif self.nodes[node.parent].block != node.block - 1:
                raise InvalidValueError(f"node {i} (block {node.block}) has a parent of another level")
        for member in self.members:
            for parent, child in zip(member.path, member.path[1:]):
                if self.nodes[child].parent != parent:
                    raise InvalidValueError(f"member {member.index} path is not a chain of parent links")
        if not self.members:
            raise InvalidValueError("a topology needs at least one member")

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
    """Builds the [`NodeGraph`][ensemblekit.core.graph.NodeGraph] for a backbone cut into ``num_blocks`` blocks.

    ``num_blocks`` says how many blocks the topology wants from the splitter
    (``None``: the backbone's natural stages). ``sequential`` topologies are
    evaluated strictly member by member (a cascade), others level by level, and
    train with the "sequential" schedule by default
    ([`ensemblekit.core.stages.default_schedule()`][ensemblekit.core.stages.default_schedule]).
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


def positive_int(name: str, value: int, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class GraphBuilder:
    """Adds nodes one at a time; topologies use it to build their forest."""

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


__all__ = ["GraphBuilder", "Member", "Node", "NodeGraph", "SharingTopology", "positive_int"]
