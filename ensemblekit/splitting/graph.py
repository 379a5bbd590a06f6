"""Cutting a ``torch.fx`` graph into blocks at module boundaries.

Nothing here knows about timm: a splitter traces a model with
`PathTracer` (which records on every node the path of the module that
created it), picks cut points as *module paths* ("cut after the last node
inside ``layer2``") and calls `build_blocks()`. The values that cross a
cut (the live values) become the outputs of one block and the inputs of the
next, so a block is ``block(*state) -> state``.

``torch.fx`` freezes ``self.training`` at trace time (dropout, drop-path), so
a model is traced once per mode and every block carries both graphs
(`GraphBlock`); it runs the one that matches its ``.training`` flag
while its parameters exist once.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import linecache
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from ensemblekit.core.batching import StateLayout
from ensemblekit.splitting.errors import SplitError

__all__ = [
    "PATH",
    "SCALAR_TYPES",
    "GraphBlock",
    "GraphCuts",
    "GraphIndex",
    "PathTracer",
    "Profile",
    "TracedModel",
    "ValueInfo",
    "batch_values",
    "build_blocks",
    "locate_cuts",
    "per_sample_layouts",
    "profile_graph",
    "trace_modes",
    "training_mode",
]

PATH = "ensemblekit_module_path"
"""Key of ``node.meta`` holding the path of the module that created the node."""

_MODES = (False, True)
_source_ids = itertools.count()


class PathTracer(fx.Tracer):
    """An FX tracer that records the creating module's path on every node.

    Args:
        leaf_types: module classes kept as single ``call_module`` nodes (not
            traced through), on top of ``torch.nn``'s own modules.
        autowrap_functions: functions recorded as single ``call_function``
            nodes, for code with data-dependent control flow.

    Examples:
        >>> tracer = PathTracer()
        >>> graph = tracer.trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        >>> [n.meta[PATH] for n in graph.nodes]
        ['', '0', '1', '']
    """

    def __init__(self, leaf_types: Sequence[type] = (), autowrap_functions: Sequence[Callable] = ()) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.leaf_types = tuple(leaf_types)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta[PATH] = self.scope.module_path
        return node


@contextlib.contextmanager
def training_mode(model: nn.Module, mode: bool) -> Iterator[None]:
    """Put every module of ``model`` in train or eval mode, restoring each module's own flag after."""
    modules = list(model.modules())
    flags = [m.training for m in modules]
    model.train(mode)
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


@dataclass
class TracedModel:
    """A model traced in eval (``graphs[False]``) and train (``graphs[True]``) mode.

    ``constants`` holds the tensors that the tracer had to stow on the model
    (``_tensor_constant0``...); they are removed from the model itself.
    """

    root: nn.Module
    graphs: dict[bool, fx.Graph]
    constants: dict[str, Any] = field(default_factory=dict)


def trace_modes(model: nn.Module, make_tracer: Callable[[], fx.Tracer]) -> TracedModel:
    """Trace ``model.forward`` once in eval and once in train mode.

    Arguments after the first that have a default (``attn_mask=None``) are
    fixed to that default, so the control flow that depends on them is
    resolved and a block's state holds only what the model computes.

    Raises:
        SplitError: when the model cannot be traced symbolically.
    """
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params
                if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    before = set(vars(model))
    graphs: dict[bool, fx.Graph] = {}
    try:
        for mode in _MODES:
            with training_mode(model, mode):
                graphs[mode] = make_tracer().trace(model, concrete_args=concrete or None)
    except Exception as err:  # noqa: BLE001 - any tracing failure is reported the same way
        raise SplitError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}); "
            "pass an nn.Sequential of blocks or a list of modules [block0, ..., head] instead"
        ) from err
    finally:
        constants = {name: vars(model).pop(name) for name in list(vars(model)) if name not in before}
    for graph in graphs.values():
        _drop_fixed_inputs(graph)
    return TracedModel(model, graphs, constants)


def _drop_fixed_inputs(graph: fx.Graph) -> None:
    """Remove the inputs that tracing fixed to their default, with the checks FX added for them."""
    for node in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        for user in list(node.users):
            if getattr(user.target, "__name__", "") == "_assert_is_none" and not user.users:
                graph.erase_node(user)
        if not node.users and (node.args or node.target.startswith("*")):
            graph.erase_node(node)


class _Program:
    """The compiled code of a `GraphBlock`, one graph per training flag.

    Immutable, so deep copies of a block share it; pickling keeps the graphs
    and compiles them again.
    """

    def __init__(self, graphs: Mapping[bool, fx.Graph]) -> None:
        self.graphs = dict(graphs)
        self._compile()

    def _compile(self) -> None:
        compiled: dict[str, tuple[Callable, fx.Graph]] = {}
        self.functions: dict[bool, Callable] = {}
        self.sources: dict[bool, str] = {}
        for mode, graph in self.graphs.items():
            code = graph.python_code(root_module="self")
            if code.src not in compiled:
                filename = f"<ensemblekit block {next(_source_ids)}>"
                linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
                namespace = dict(code.globals)
                exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - code generated by torch.fx
                compiled[code.src] = namespace["forward"], graph
            self.functions[mode], self.graphs[mode] = compiled[code.src]  # same code: one graph
            self.sources[mode] = code.src

    def __deepcopy__(self, memo: dict) -> _Program:
        return self

    def __getstate__(self) -> dict:
        return {"graphs": self.graphs}

    def __setstate__(self, state: dict) -> None:
        self.graphs = state["graphs"]
        self._compile()


class GraphBlock(nn.Module):
    """A module that runs an FX graph, a different one in train and in eval mode.

    It holds the parameters, buffers and leaf modules its graphs use, under
    their original paths (so ``state_dict`` keys match the backbone's), each
    exactly once. ``copy.deepcopy`` gives an independent block. It is a
    [`TracedBlock`][ensemblekit.core.blocks.TracedBlock]: executors read its
    `graphs` to see which operations it performs.

    Args:
        root: the module the graphs were traced from.
        graphs: ``{False: eval graph, True: train graph}``.
        constants: values stowed by the tracer (see `TracedModel`).

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
        >>> traced = trace_modes(model, PathTracer)
        >>> block = GraphBlock(model, traced.graphs)
        >>> sorted(block.state_dict())
        ['0.bias', '0.weight']
    """

    def __init__(self, root: nn.Module, graphs: Mapping[bool, fx.Graph],
                 constants: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        _install_all(root, self, graphs, constants or {})
        for module in self._containers():
            module.training = root.training
        self._program = _Program(graphs)

    def _containers(self) -> Iterator[nn.Module]:
        """This block and the plain containers it created (not the shared leaf modules)."""
        stack: list[nn.Module] = [self]
        while stack:
            module = stack.pop()
            yield module
            stack.extend(c for c in module.children() if type(c) is nn.Module)

    @property
    def graphs(self) -> dict[bool, fx.Graph]:
        """The graphs it runs: ``{False: eval graph, True: train graph}`` (one object when they agree)."""
        return dict(self._program.graphs)

    @property
    def code(self) -> str:
        """The Python source of the eval-mode forward."""
        return self._program.sources[False]

    def forward(self, *args: Any) -> Any:
        return self._program.functions[self.training](self, *args)


def _install_all(root: nn.Module, block: nn.Module, graphs: Mapping[bool, fx.Graph],
                 constants: Mapping[str, Any]) -> None:
    """Install on ``block`` every attribute and module the graphs use, parents first."""
    # graph order, not a set's: parameter order must not depend on the hash seed (DDP, optimizer state)
    ops = ("get_attr", "call_module")
    targets = dict.fromkeys(n.target for g in graphs.values() for n in g.nodes if n.op in ops)
    for target in sorted(targets, key=lambda t: t.count(".")):
        _install(root, block, target, constants)


def _install(root: nn.Module, block: nn.Module, target: str, constants: Mapping[str, Any]) -> None:
    """Make ``block.<target>`` refer to ``root.<target>``, creating empty containers on the way."""
    if target in constants:
        value = constants[target]
        if isinstance(value, torch.Tensor):
            block.register_buffer(target, value, persistent=False)
        else:
            setattr(block, target, value)
        return
    *prefix, name = target.split(".")
    src, dst = root, block
    for item in prefix:
        src_child = getattr(src, item)
        dst_child = dst._modules.get(item)
        if dst_child is src_child:
            return  # an ancestor module is already installed: it brings this attribute along
        if dst_child is None:
            dst_child = nn.Module()
            dst.add_module(item, dst_child)
        src, dst = src_child, dst_child
    value = getattr(src, name)
    if isinstance(value, nn.Module):
        dst.add_module(name, value)
    elif isinstance(value, nn.Parameter):
        dst.register_parameter(name, value)
    elif isinstance(value, torch.Tensor):
        persistent = name in src._buffers and name not in src._non_persistent_buffers_set
        dst.register_buffer(name, value, persistent=persistent)
    else:
        setattr(dst, name, value)


@dataclass(frozen=True)
class ValueInfo:
    """What a node produced in the example run: a tensor's shape or a Python value's type."""

    shape: tuple[int, ...] | None
    type_name: str

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None


class _Profiler(fx.Interpreter):
    """Runs a graph node by node, recording each node's output shape and (with a counter) FLOPs."""

    def __init__(self, module: nn.Module, graph: fx.Graph, counter: FlopCounterMode | None) -> None:
        super().__init__(module, garbage_collect_values=True, graph=graph)
        self.counter = counter
        self.flops: dict[fx.Node, int] = {}
        self.info: dict[fx.Node, ValueInfo] = {}

    def run_node(self, n: fx.Node) -> Any:
        if self.counter is None:
            out = super().run_node(n)
        else:
            before = self.counter.get_total_flops()
            out = super().run_node(n)
            self.flops[n] = self.counter.get_total_flops() - before
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        self.info[n] = ValueInfo(shape, type(out).__name__)
        return out


@dataclass
class Profile:
    """Output shape (and FLOPs, when counted) of every node of a graph on an example input."""

    flops: dict[fx.Node, int]
    info: dict[fx.Node, ValueInfo]
    output: Any


def profile_graph(traced: TracedModel, example_args: Sequence[Any], count_flops: bool = False) -> Profile:
    """Run the eval graph on ``example_args`` (eval mode, no grad), recording shapes and optionally FLOPs.

    Counting FLOPs makes the run several times slower.
    """
    owner = nn.Module()  # what the eval graph uses; no code to generate, the interpreter runs it
    _install_all(traced.root, owner, {False: traced.graphs[False]}, traced.constants)
    with contextlib.ExitStack() as stack:
        stack.enter_context(training_mode(traced.root, False))
        stack.enter_context(torch.no_grad())
        counter = stack.enter_context(FlopCounterMode(display=False)) if count_flops else None
        profiler = _Profiler(owner, traced.graphs[False], counter)
        output = profiler.run(*example_args)
    return Profile(profiler.flops, profiler.info, output)


class GraphIndex:
    """Positions, module ends and liveness of one graph's nodes.

    A *cut at position p* splits the nodes into ``nodes[:p + 1]`` and
    ``nodes[p + 1:]``; the values live at the cut are those defined up to
    ``p`` and used after it (attribute reads are re-done where they are used
    and never cross a cut).
    """

    def __init__(self, graph: fx.Graph) -> None:
        self.nodes = list(graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.module_end: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            path = node.meta.get(PATH, "")
            if node.op == "get_attr" or not path:
                continue
            parts = path.split(".")
            for k in range(1, len(parts) + 1):
                self.module_end[".".join(parts[:k])] = i
        self.last_use = {n: max(self.position[u] for u in n.users) for n in self.nodes if n.users}
        self.first_compute = next(i for i, n in enumerate(self.nodes) if n.op != "placeholder")
        delta = [0] * (len(self.nodes) + 1)
        for n, last in self.last_use.items():
            if n.op != "get_attr":
                delta[self.position[n]] += 1
                delta[last] -= 1
        self.live_count = list(itertools.accumulate(delta))[: len(self.nodes)]

    def live(self, position: int) -> list[fx.Node]:
        """The values crossing a cut at ``position``, in order of definition."""
        return [n for n in self.nodes[: position + 1]
                if n.op != "get_attr" and self.last_use.get(n, -1) > position]


def _segment_graph(index: GraphIndex, start: int, end: int, inputs: Sequence[fx.Node],
                   outputs: Sequence[fx.Node] | None) -> fx.Graph:
    """A graph computing ``nodes[start:end + 1]`` from ``inputs``; ``outputs=None`` keeps the graph's output."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: graph.placeholder(n.name) for n in inputs}

    def arg(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op != "get_attr":
                raise AssertionError(f"value {node.name} is used before the block defines it")
            env[node] = graph.get_attr(node.target)
        return env[node]

    for node in index.nodes[start:end + 1]:
        if node.op == "get_attr":
            continue
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], arg))
            continue
        env[node] = graph.node_copy(node, arg)
    if outputs is not None:
        graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[n] for n in outputs))
    for node in graph.nodes:
        node.meta.clear()
    graph.lint()
    return graph


@dataclass
class GraphCuts:
    """Where the cuts fall in each mode's graph, and what crosses them."""

    indexes: dict[bool, GraphIndex]
    positions: dict[bool, list[int]]
    live: dict[bool, list[list[fx.Node]]]


def locate_cuts(indexes: Mapping[bool, GraphIndex], cut_paths: Sequence[str]) -> GraphCuts:
    """Find each cut (the end of a module path) in both graphs and what crosses it.

    Args:
        indexes: ``{False: index of the eval graph, True: index of the train graph}``.
        cut_paths: module paths; each cut follows the last operation of its module.

    Raises:
        SplitError: when a path has no node, the cuts are not in increasing
            order, or train and eval mode disagree on what crosses a cut.
    """
    positions: dict[bool, list[int]] = {}
    live: dict[bool, list[list[fx.Node]]] = {}
    for mode, index in indexes.items():
        missing = [p for p in cut_paths if p not in index.module_end]
        if missing:
            raise SplitError(f"no operation of module(s) {missing} in the traced {'train' if mode else 'eval'} graph")
        positions[mode] = [index.module_end[p] for p in cut_paths]
        if any(b <= a for a, b in zip(positions[mode], positions[mode][1:])):
            raise SplitError(f"modules {list(cut_paths)} do not run in this order")
        live[mode] = [index.live(p) for p in positions[mode]]
    counts = {mode: [len(v) for v in vals] for mode, vals in live.items()}
    if counts[False] != counts[True]:
        raise SplitError(f"train and eval mode pass different numbers of values between blocks "
                         f"({counts[True]} vs {counts[False]})")
    return GraphCuts(dict(indexes), positions, live)


SCALAR_TYPES = frozenset({"int", "float", "bool", "complex", "str", "NoneType", "Size", "SymInt", "device", "dtype"})
"""Types of values that are sizes or scalars: what is computed from them is not per-sample."""


def batch_values(index: GraphIndex, profile: Profile) -> set[fx.Node]:
    """The nodes whose values are computed from the input batch (per-sample), in the profiled graph.

    The first input is; so is every value computed from one of them, except
    sizes and scalars (``x.shape[1]``): a value computed from parameters,
    constants and sizes only (a RoPE table, an attention bias, a position
    index) is the same for every sample.
    """
    derived: set[fx.Node] = set()
    for node in index.nodes:
        if node.op == "placeholder":
            if not derived:
                derived.add(node)
            continue
        info = profile.info.get(node)
        scalar = info is not None and info.type_name in SCALAR_TYPES
        if not scalar and node.op != "get_attr" and any(a in derived for a in node.all_input_nodes):
            derived.add(node)
    return derived


def per_sample_layouts(index: GraphIndex, profile: Profile, live: Sequence[Sequence[fx.Node]]) -> list[StateLayout]:
    """Per cut, which values crossing it are per-sample (see `batch_values()`), as ``BlockSplit.per_sample``."""
    derived = batch_values(index, profile)
    return [True if len(values) == 1 else tuple(n in derived for n in values) for values in live]


def build_blocks(traced: TracedModel, cuts: GraphCuts) -> tuple[list[GraphBlock], GraphBlock]:
    """One `GraphBlock` per segment between cuts, and one for the rest (the head)."""
    segments: list[dict[bool, fx.Graph]] = []
    for mode, index in cuts.indexes.items():
        bounds = [-1, *cuts.positions[mode], len(index.nodes) - 1]
        for k in range(len(bounds) - 1):
            inputs = cuts.live[mode][k - 1] if k > 0 else []
            outputs = cuts.live[mode][k] if k < len(cuts.positions[mode]) else None
            if k == len(segments):
                segments.append({})
            segments[k][mode] = _segment_graph(index, bounds[k] + 1, bounds[k + 1], inputs, outputs)
    blocks = [GraphBlock(traced.root, graphs, traced.constants) for graphs in segments]
    return blocks[:-1], blocks[-1]
