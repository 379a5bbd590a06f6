"""How the nodes of one level are evaluated.

An executor maps the nodes of one level and their input states to output
states: ``run(modules, inputs) -> outputs``. Several nodes may receive the very
same input object (the children of one tree node); executors that batch nodes
replicate it (HNE, Fig. 2).

| name | how | applies to |
| --- | --- | --- |
| ``loop`` | one node after the other (the reference) | any block |
| ``loop_nhwc`` | the loop on channels-last (NHWC-strided) 4-D inputs | any block |
| ``vmap`` | ``torch.func.vmap`` over parameters stacked on the fly | any block without data-dependent Python control flow |
| ``grouped`` | the nodes packed into one module with ``N``-times grouped convolutions | blocks of conv / BN / element-wise layers |
| ``grouped_nhwc`` | ``grouped`` on channels-last inputs | the same |
| ``auto`` | times the strategies that apply, once per (device, shapes, mode), and keeps the fastest; checks the choices against whole passes (:meth:`AutoExecutor.tune_pass`) | any block |

Every strategy computes the same function (equal outputs and gradients up to
float rounding). The stacked or concatenated parameters are built from the
nodes' own parameters on every call (in inference they are reused while no
node tensor changed), so gradients reach each node's parameters, and
BatchNorm running statistics updated in training mode are
written back into each node's buffers: the per-node modules, their
``state_dict`` and the loop stay the single source of truth.
"""

from __future__ import annotations

import copy
import math
import operator
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ensemblekit.core.blocks import State, call_block


class LevelSignature(NamedTuple):
    """What the speed of a level depends on; :class:`AutoExecutor` measures once per signature.

    Attributes:
        device: where the level runs.
        grad: whether gradients are enabled (timing then includes the backward pass).
        training: the nodes' training flag.
        block: class name of the nodes.
        params: parameter names and shapes of one node.
        nodes: number of nodes.
        sharing: for each node, the index of its input among the distinct inputs.
        inputs: shape, strides, dtype and view flag of every distinct input tensor
            (``repr`` of other values).
    """

    device: str
    grad: bool
    training: bool
    block: str
    params: tuple
    nodes: int
    sharing: tuple[int, ...]
    inputs: tuple


class Executor(ABC):
    """Evaluates the nodes of one level: ``run(modules, inputs) -> outputs``.

    ``modules`` are copies of one block (same structure, own parameters);
    ``inputs[i]`` is the state fed to ``modules[i]``.
    """

    name: str = ""
    chains: bool = False
    """Whether consecutive levels run by this strategy pass data more cheaply than level-by-level timing shows."""

    def unsupported(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> str | None:
        """Why this strategy cannot run these nodes, or ``None`` when it can."""
        return None

    @abstractmethod
    def run(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> list[State]:
        """Output state of every node, in the order of ``modules``."""

    def forget(self, modules: Sequence[nn.Module]) -> None:
        """Drop what is cached for these nodes (packed parameters)."""

    def __getstate__(self) -> dict[str, Any]:
        # only the constructor arguments: caches hold the nodes and tensors derived from them
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]


class LoopExecutor(Executor):
    """Evaluate each node on its own input, one after the other.

    Args:
        channels_last: give every 4-D floating-point input tensor channels-last
            strides first (oneDNN convolutions on CPU are much faster so).
    """

    def __init__(self, channels_last: bool = False):
        self.channels_last = channels_last

    @property
    def name(self) -> str:  # type: ignore[override]
        return "loop_nhwc" if self.channels_last else "loop"

    def run(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> list[State]:
        if self.channels_last:
            converted: dict[int, State] = {}
            inputs = [converted.setdefault(id(s), _to_channels_last(s)) for s in inputs]
        return [call_block(module, state) for module, state in zip(modules, inputs)]


class VmapExecutor(Executor):
    """``torch.func.vmap`` over the nodes' parameters and buffers, stacked on the fly.

    Works for any block whose forward has no data-dependent Python control
    flow. Inputs shared by all nodes are passed once (not stacked); random ops
    draw different numbers per node.
    """

    name = "vmap"

    def __init__(self) -> None:
        self._packs = _PackCache()

    def forget(self, modules: Sequence[nn.Module]) -> None:
        self._packs.forget(modules)

    def unsupported(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> str | None:
        if modules[0].training:
            for m in modules[0].modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum is None:
                    return "BatchNorm with momentum=None (cumulative average) needs a per-node Python float"
        return _mismatch(modules, inputs)

    def run(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> list[State]:
        reason = self.unsupported(modules, inputs)
        if reason is not None:
            raise ValueError(f"execution 'vmap' cannot run these nodes: {reason}")
        n = len(modules)
        params, buffers = self._packs.get(modules, lambda ts: torch.stack(ts, 0))
        flat_inputs = [tree_flatten(_as_tuple(s)) for s in inputs]
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
            _write_back(modules, buffers, lambda t, i: t[i])
        out_tree, constants = out_spec
        outputs = []
        for i in range(n):
            it = iter(stacked_out)
            flat = [next(it)[i] if c is None else c for c in constants]
            outputs.append(tree_unflatten(flat, out_tree))
        return outputs


class GroupedExecutor(Executor):
    """All nodes packed into one module: ``N`` times the channels, ``N`` times the groups.

    Node ``i`` owns channels ``i*C .. (i+1)*C-1`` of every feature map (HNE,
    Fig. 2). Inputs shared by several nodes are replicated along the channel
    dimension; inputs that are consecutive channel slices of one packed tensor
    (the previous level's outputs) are used without a copy. Outputs are channel
    slices (views) of the packed output.

    Args:
        channels_last: run the packed level on channels-last inputs.
    """

    chains = True  # a packed output feeds the next packed level without a copy

    def __init__(self, channels_last: bool = False):
        self.channels_last = channels_last
        self._packs = _PackCache()
        self._templates: dict[tuple[int, int], tuple[nn.Module, nn.Module]] = {}
        self._packable: dict[int, tuple[nn.Module, str | None]] = {}

    @property
    def name(self) -> str:  # type: ignore[override]
        return "grouped_nhwc" if self.channels_last else "grouped"

    def forget(self, modules: Sequence[nn.Module]) -> None:
        self._packs.forget(modules)

    def unsupported(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> str | None:
        if not all(isinstance(s, Tensor) and s.ndim == 4 for s in inputs):
            return "inputs are not single 4-D [B, C, H, W] tensors"
        first = modules[0]
        if id(first) not in self._packable:
            self._packable[id(first)] = (first, _why_not_packable(first))
        return self._packable[id(first)][1] or _mismatch(modules, inputs)

    def run(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> list[State]:
        reason = self.unsupported(modules, inputs)
        if reason is not None:
            raise ValueError(f"execution {self.name!r} cannot run these nodes: {reason}")
        n = len(modules)
        x = _pack_channels(inputs)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        params, buffers = self._packs.get(modules, _cat_or_first)
        out = functional_call(self._template(modules[0], n), (params, buffers), (x,), strict=True)
        if modules[0].training:
            _write_back(modules, buffers, lambda t, i: t.chunk(n, 0)[i])
        return list(out.chunk(n, 1))

    def _template(self, module: nn.Module, n: int) -> nn.Module:
        key = (id(module), n)
        if key not in self._templates:
            self._templates[key] = (module, _grouped_template(module, n))
        template = self._templates[key][1]
        template.train(module.training)
        return template


class AutoExecutor(Executor):
    """Time every strategy that applies and keep the fastest, per level signature.

    The first call with a new signature (device, grad mode, training mode,
    block structure, number of nodes, input sharing and input shapes and
    strides) times each candidate on the real inputs (forward, plus backward
    when gradients are enabled) in interleaved rounds and keeps the one with
    the fastest run (other processes only ever add time, so the fastest run is
    the least disturbed one). When a channels-last strategy is among the
    candidates, each candidate is charged the conversion of its outputs to
    channels-last, which a channels-last strategy at the next level would pay
    (a greedy choice per level otherwise ignores it). A candidate that raises on these nodes is never chosen.
    BatchNorm buffers and the random number generators are restored after
    timing, so the measured call leaves no trace; the candidates not chosen
    drop what they cached for these nodes. An ensemble's forward pass then
    checks these choices against whole passes (:meth:`tune_pass`).

    Args:
        candidates: names of the strategies to choose from.
        rounds: timed runs of each candidate (after one warm-up run).
    """

    name = "auto"

    def __init__(self, candidates: Sequence[str] = ("loop", "loop_nhwc", "vmap", "grouped", "grouped_nhwc"),
                 rounds: int = 5):
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.candidates = tuple(candidates)
        self.rounds = rounds
        self._executors = {c: make_executor(c) for c in self.candidates}
        self._blocks: dict[int, tuple[nn.Module, tuple]] = {}
        self._choices: dict[LevelSignature, str] = {}
        self._timings: dict[LevelSignature, dict[str, float]] = {}
        self._plans: dict[Hashable, dict[str, float]] = {}  # pass key -> seconds of each plan
        # (signature, nodes, strategy) of each level of the pass being recorded while tuning
        self._seen: list[tuple[LevelSignature, list[nn.Module], str]] | None = None
        self._forced: str | None = None  # the strategy of the plan being timed

    @property
    def choices(self) -> dict[LevelSignature, str]:
        """The strategy kept for each level signature measured so far."""
        return self._choices

    @property
    def plans(self) -> dict[Hashable, dict[str, float]]:
        """Fastest seconds of each whole-pass plan, per tuned pass (see :meth:`tune_pass`)."""
        return self._plans

    @property
    def timings(self) -> dict[LevelSignature, dict[str, float]]:
        """Fastest seconds of each candidate for each level signature measured so far."""
        return self._timings

    def describe(self) -> list[str]:
        """One line per tuned pass (its plans' times), then per level: mode, nodes, input sharing, choice, margin."""
        lines = []
        for timings in self._plans.values():
            best = min(timings, key=timings.__getitem__)
            lines.append(f"whole pass: kept {best} (" + ", ".join(f"{plan} {t * 1e3:.1f} ms"
                                                             for plan, t in timings.items()) + ")")
        for key, choice in self._choices.items():
            times = self._timings[key]
            runner_up = min((t for c, t in times.items() if c != choice), default=math.inf)
            margin = f", next best {runner_up / times[choice]:.2f}x slower" if runner_up < math.inf else ""
            mode = ("train" if key.training else "eval") + ("" if key.grad else " no-grad")
            lines.append(f"{mode}, {key.block} x{key.nodes} on {len(set(key.sharing))} input(s): "
                         f"{choice}{margin}")
        return lines

    def run(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> list[State]:
        key = _signature(modules, inputs, self._blocks)
        if self._forced is not None:  # timing a plan: the forced strategy wherever it applies
            usable = self._executors[self._forced].unsupported(modules, inputs) is None
            choice = self._forced if usable else self._choices.get(key) or self._fallback(modules, inputs)
        else:
            choice = self._choices.get(key)
            if choice is None:
                if torch.compiler.is_compiling():  # never time inside a trace
                    return self._executors[self._fallback(modules, inputs)].run(modules, inputs)
                timings = self._timings[key] = self._measure(modules, inputs)
                choice = self._choices[key] = min(timings, key=timings.__getitem__)
                self._forget_others(choice, modules)
        if self._seen is not None:
            self._seen.append((key, list(modules), choice))
        return self._executors[choice].run(modules, inputs)

    def tune_pass(self, key: Hashable, run_pass: Callable[[], Tensor], module: nn.Module) -> None:
        """Check the per-level choices against whole passes; keep the fastest plan.

        Timing level by level cannot see that a strategy pays off as a chain
        (a grouped level hands the next one a packed tensor without a copy,
        so the first grouped level looks slower than it is). The first pass
        with a new ``key`` makes the per-level choices; then whole passes
        (forward, plus backward when gradients are enabled) are timed with
        those choices and with each chaining candidate (``chains``) at every
        level it can run, in interleaved rounds: a warm-up round, then half
        as many as per level (at least one). A plan 1.2x slower than the best
        after the first timed round, or one that raises, is dropped. The
        levels of the fastest plan keep its strategies. BatchNorm buffers and
        random number generators are restored afterwards.

        Args:
            key: what the pass's speed depends on beyond its levels (input
                shape, mode, members); each key is tuned once.
            run_pass: runs the pass and returns its output.
            module: the module whose parameters and buffers the pass uses.
        """
        if key in self._plans or torch.compiler.is_compiling():
            return
        params = [p for p in module.parameters() if p.requires_grad]
        saved = {k: b.clone() for k, b in module.named_buffers()}
        device = next((p.device for p in params), torch.device("cpu"))
        chaining = [c for c in self.candidates if self._executors[c].chains]
        plans: dict[str, list] = {"per level": [], **{c: [] for c in chaining}}  # the levels each plan ran
        times: dict[str, list[float]] = {plan: [] for plan in plans}
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                run_pass()  # makes the per-level choices
                for r in range(max(1, self.rounds // 2) + 1):
                    if r == 2:  # drop the plans that cannot catch up
                        fastest = min(t[0] for t in times.values())
                        times = {p: t for p, t in times.items() if p == "per level" or t[0] <= 1.2 * fastest}
                    for plan in list(times):
                        self._forced = None if plan == "per level" else plan
                        self._seen = plans[plan] if r == 0 else None  # the warm-up round records the levels
                        try:
                            elapsed = _time_pass(run_pass, params, device)
                        except (RuntimeError, ValueError, TypeError, NotImplementedError):
                            if plan == "per level":
                                raise
                            del times[plan]
                            continue
                        if r > 0:  # the first round warms up
                            times[plan].append(elapsed)
        finally:
            self._seen, self._forced = None, None
            with torch.no_grad():
                for k, b in module.named_buffers():
                    b.copy_(saved[k])
        timings = self._plans[key] = {plan: min(t) for plan, t in times.items()}
        best = min(timings, key=timings.__getitem__)
        for level, modules, choice in plans[best]:
            self._choices[level] = choice
            self._timings.setdefault(level, {choice: timings[best]})
            self._forget_others(choice, modules)

    def _forget_others(self, choice: str, modules: Sequence[nn.Module]) -> None:
        for name, executor in self._executors.items():
            if name != choice:
                executor.forget(modules)

    def _fallback(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> str:
        return next(c for c, e in self._executors.items() if e.unsupported(modules, inputs) is None)

    def _measure(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> dict[str, float]:
        """Fastest seconds of each usable candidate on these nodes (``inf`` for one that raised)."""
        usable = {c: e for c, e in self._executors.items() if e.unsupported(modules, inputs) is None}
        device = _device_of(modules, inputs)
        # outputs in another layout may cost a conversion later: charge it when channels-last is an option
        charge = any(getattr(e, "channels_last", False) for e in usable.values())
        saved = [{k: b.clone() for k, b in m.named_buffers()} for m in modules]
        times: dict[str, list[float]] = {c: [] for c in usable}
        failed: set[str] = set()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                for r in range(self.rounds + 1):
                    for c in [c for c in usable if c not in failed]:
                        try:
                            elapsed = _time_call(usable[c], modules, inputs, device, charge)
                        except (RuntimeError, ValueError, TypeError, NotImplementedError):
                            if c == "loop":  # the reference itself fails: a real error
                                raise
                            failed.add(c)
                            continue
                        if r > 0:  # the first round warms up
                            times[c].append(elapsed)
        finally:
            with torch.no_grad():
                for m, bufs in zip(modules, saved):
                    for k, b in m.named_buffers():
                        b.copy_(bufs[k])
        return {c: math.inf if c in failed else min(t) for c, t in times.items()}


EXECUTORS: dict[str, Callable[[], Executor]] = {
    "loop": LoopExecutor,
    "loop_nhwc": lambda: LoopExecutor(channels_last=True),
    "vmap": VmapExecutor,
    "grouped": GroupedExecutor,
    "grouped_nhwc": lambda: GroupedExecutor(channels_last=True),
    "auto": AutoExecutor,
}


def make_executor(name: str) -> Executor:
    """The executor called ``name``; an unknown name lists the known ones."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown execution strategy {name!r}; choose one of {', '.join(sorted(EXECUTORS))}")
    return EXECUTORS[name]()


# ----------------------------------------------------------------- helpers
def _as_tuple(state: State) -> tuple[Any, ...]:
    return state if isinstance(state, tuple) else (state,)


def _to_channels_last(state: State) -> State:
    def convert(v: Any) -> Any:
        if isinstance(v, Tensor) and v.ndim == 4 and v.is_floating_point():
            return v.contiguous(memory_format=torch.channels_last)
        return v

    return tuple(convert(v) for v in state) if isinstance(state, tuple) else convert(state)


def _mismatch(modules: Sequence[nn.Module], inputs: Sequence[State]) -> str | None:
    """Why the nodes cannot be batched together (different structure or input layout)."""
    shapes = [[(k, p.shape) for k, p in m.named_parameters()] for m in modules]
    if any(s != shapes[0] for s in shapes[1:]) or any(type(m) is not type(modules[0]) for m in modules):
        return "the nodes are not copies of one block"
    specs = [tree_flatten(_as_tuple(s))[1] for s in inputs]
    if any(s != specs[0] for s in specs[1:]):
        return "the input states differ in structure"
    return None


def _stack(column: Sequence[Tensor], dim: int) -> Tensor:
    """``torch.stack(column, dim)`` of distinct tensors, reusing a packed base when possible."""
    unique, index = _unique(column)
    base = _packed_base(unique, dim, stacked=True)
    if base is None:
        base = torch.stack(unique, dim)
    return base if index == list(range(len(unique))) else base.index_select(dim, torch.tensor(index, device=base.device))


def _pack_channels(inputs: Sequence[Tensor]) -> Tensor:
    """Inputs ``[B, C, H, W]`` concatenated along channels, replicating shared ones."""
    unique, index = _unique(inputs)
    base = _packed_base(unique, 1, stacked=False)
    if base is None:
        base = torch.cat(unique, 1) if len(unique) > 1 else unique[0]
    if index == list(range(len(unique))):
        return base
    c = unique[0].shape[1]
    grouped = base.unflatten(1, (len(unique), c))
    if index == sorted(index):  # children of one parent are adjacent: a broadcast copy
        counts = torch.tensor([index.count(u) for u in range(len(unique))], device=base.device)
        return grouped.repeat_interleave(counts, dim=1, output_size=len(index)).flatten(1, 2)
    return grouped.index_select(1, torch.tensor(index, device=base.device)).flatten(1, 2)


def _unique(values: Sequence[Any]) -> tuple[list[Any], list[int]]:
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


def _packed_base(chunks: Sequence[Tensor], dim: int, stacked: bool) -> Tensor | None:
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


class _PackCache:
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
        packed = tuple({k: combine([n[part][k] for n in named]) for k in named[0][part]} for part in (0, 1))
        if reuse:
            self._entries[key] = (tuple(modules), stamp, packed)
        return packed

    def forget(self, modules: Sequence[nn.Module]) -> None:
        self._entries.pop(tuple(id(m) for m in modules), None)


def _cat_or_first(tensors: list[Tensor]) -> Tensor:
    """Concatenate per-channel tensors along dim 0; 0-d counters: a copy of the first."""
    return torch.cat(tensors, 0) if tensors[0].ndim else tensors[0].clone()


@torch.no_grad()
def _write_back(modules: Sequence[nn.Module], packed: dict[str, Tensor],
                part: Callable[[Tensor, int], Tensor]) -> None:
    """Copy updated running statistics into each node; add counter increments."""
    increments = {k: packed[k] - b for k, b in modules[0].named_buffers() if packed[k].ndim == 0}
    for i, m in enumerate(modules):
        for k, buf in m.named_buffers():
            if k in increments:  # one counter shared by the packed nodes
                buf.add_(increments[k])
            else:
                buf.copy_(part(packed[k], i))


def _device_of(modules: Sequence[nn.Module], inputs: Sequence[State]) -> torch.device:
    for v in tree_flatten(list(inputs))[0]:
        if isinstance(v, Tensor):
            return v.device
    return next(modules[0].parameters()).device


def _signature(modules: Sequence[nn.Module], inputs: Sequence[State],
               blocks: dict[int, tuple[nn.Module, tuple]]) -> LevelSignature:
    """The level's signature; ``blocks`` caches the block part per first node (id -> (node, part))."""
    first = modules[0]
    if id(first) not in blocks:
        blocks[id(first)] = (first, (type(first).__name__,
                                     tuple((k, tuple(p.shape)) for k, p in first.named_parameters())))
    unique, index = _unique(inputs)
    leaves = tuple((tuple(v.shape), v.stride(), v.dtype, v._base is not None) if isinstance(v, Tensor) else repr(v)
                   for s in unique for v in (tree_flatten(s)[0] if isinstance(s, tuple) else (s,)))
    device = unique[0].device if isinstance(unique[0], Tensor) else _device_of(modules, inputs)
    return LevelSignature(str(device), torch.is_grad_enabled(), first.training, *blocks[id(first)][1],
                          len(modules), tuple(index), leaves)


def _time_call(executor: Executor, modules: Sequence[nn.Module], inputs: Sequence[State],
               device: torch.device, to_channels_last: bool) -> float:
    """Seconds of one forward (and backward, when gradients are enabled) of the level.

    With ``to_channels_last``, the time to give the outputs channels-last
    strides is included: what a channels-last strategy at the next level
    would pay for outputs in another layout.
    """
    inputs = _detached(inputs)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    _sync(device)
    start = time.perf_counter()
    outputs = executor.run(modules, inputs)
    if to_channels_last:
        outputs = [_to_channels_last(o) for o in outputs]
    if torch.is_grad_enabled():
        leaves = [v for v in tree_flatten(outputs)[0] if isinstance(v, Tensor) and v.requires_grad]
        grad_inputs = [v for v in tree_flatten(list(inputs))[0] if isinstance(v, Tensor) and v.requires_grad]
        if leaves:
            total = sum(v.float().sum() for v in leaves)
            torch.autograd.grad(total, params + grad_inputs, allow_unused=True)
    _sync(device)
    return time.perf_counter() - start


def _time_pass(run_pass: Callable[[], Tensor], params: list[Tensor], device: torch.device) -> float:
    """Seconds of one pass, plus its backward to ``params`` when gradients are enabled (``.grad`` untouched)."""
    _sync(device)
    start = time.perf_counter()
    out = run_pass()
    if torch.is_grad_enabled() and out.requires_grad and params:
        torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    _sync(device)
    return time.perf_counter() - start


def _detached(inputs: Sequence[State]) -> list[State]:
    """The inputs cut from the autograd graph, keeping sharing, views of one base and ``requires_grad``."""
    bases: dict[int, Tensor] = {}
    done: dict[int, Any] = {}

    def detach(v: Any) -> Any:
        if not isinstance(v, Tensor):
            return v
        if id(v) not in done:
            root = v._base if v._base is not None else v
            if id(root) not in bases:
                bases[id(root)] = root.detach().requires_grad_(root.requires_grad and root.is_floating_point())
            base = bases[id(root)]
            done[id(v)] = base if root is v else base.as_strided(v.shape, v.stride(), v.storage_offset())
        return done[id(v)]

    return [tuple(detach(v) for v in s) if isinstance(s, tuple) else detach(s) for s in inputs]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------- grouped packing rules
_CHANNEL_LOCAL_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_CHANNEL_LOCAL_FUNCTIONS = {
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.truediv, torch.add, torch.mul,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, F.relu, F.relu6, F.silu, F.gelu, F.hardswish,
    F.hardsigmoid, F.leaky_relu, F.mish, F.elu, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
}
_CHANNEL_LOCAL_METHODS = {"add", "add_", "mul", "mul_", "relu", "relu_", "sigmoid", "sigmoid_", "clone", "contiguous"}


def _why_not_packable(module: nn.Module) -> str | None:
    """``None`` when the module only holds channel-local layers, else what breaks packing."""
    if type(module) is nn.Conv2d:
        return None
    if type(module) is nn.BatchNorm2d:
        return "BatchNorm2d with momentum=None" if module.momentum is None else None
    if isinstance(module, _CHANNEL_LOCAL_MODULES) and not any(True for _ in module.parameters()):
        return None
    if type(module) is nn.Sequential:
        return next((r for r in map(_why_not_packable, module) if r), None)
    if isinstance(module, fx.GraphModule):
        return _why_not_packable_graphs(module, [module.graph])
    from ensemblekit.splitting.graph import GraphBlock

    if isinstance(module, GraphBlock):
        return _why_not_packable_graphs(module, module._program.graphs.values())
    return f"{type(module).__name__} is not a conv/BN/element-wise layer"


def _why_not_packable_graphs(root: nn.Module, graphs: Iterable[fx.Graph]) -> str | None:
    for node in (n for g in graphs for n in g.nodes):
        if node.op == "call_module":
            reason = _why_not_packable(root.get_submodule(node.target))
        elif node.op == "call_function":
            reason = None if node.target in _CHANNEL_LOCAL_FUNCTIONS else f"function {node.target}"
        elif node.op == "call_method":
            reason = None if node.target in _CHANNEL_LOCAL_METHODS else f"method .{node.target}()"
        elif node.op == "get_attr":
            reason = f"tensor attribute {node.target}"
        else:
            reason = None
        if reason:
            return reason
    return None


def _grouped_template(module: nn.Module, n: int) -> nn.Module:
    """A copy of ``module`` whose layers take ``n`` times the channels (parameters on ``meta``)."""
    template = copy.deepcopy(module).to("meta")
    for m in template.modules():
        if isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels, m.groups = m.in_channels * n, m.out_channels * n, m.groups * n
        elif isinstance(m, nn.BatchNorm2d):
            m.num_features *= n
        else:
            continue
        for name, p in list(m.named_parameters(recurse=False)):
            setattr(m, name, nn.Parameter(_meta_scaled(p, n), requires_grad=p.requires_grad))
        for name, b in list(m.named_buffers(recurse=False)):
            m.register_buffer(name, _meta_scaled(b, n))
    return template


def _meta_scaled(t: Tensor, n: int) -> Tensor:
    shape = (t.shape[0] * n, *t.shape[1:]) if t.ndim else t.shape
    return torch.empty(shape, dtype=t.dtype, device="meta")
