"""``auto``: time the strategies that apply, per level and then per whole pass, and keep the fastest."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ensemblekit.core.blocks import State
from ensemblekit.core.interfaces import Executor
from ensemblekit.core.registry import EXECUTORS
from ensemblekit.core.timing import Stopwatch
from ensemblekit.errors import InvalidValueError
from ensemblekit.execution.common import as_channels_last, distinct

__all__ = ["CANDIDATES", "AutoExecutor", "LevelSignature"]

CANDIDATES = ("loop", "loop_nhwc", "vmap", "grouped", "grouped_nhwc")
"""The built-in strategies [`AutoExecutor`][ensemblekit.execution.auto.AutoExecutor] chooses from by default."""


class LevelSignature(NamedTuple):
    """What the speed of a level depends on; [`AutoExecutor`][ensemblekit.execution.auto.AutoExecutor] measures
    once per signature.

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
    checks these choices against whole passes ([`tune_pass()`][ensemblekit.execution.auto.AutoExecutor.tune_pass]).

    Args:
        candidates: names of the strategies to choose from.
        rounds: timed runs of each candidate (after one warm-up run).
    """

    name = "auto"

    def __init__(self, candidates: Sequence[str] = CANDIDATES, rounds: int = 5):
        if rounds < 1:
            raise InvalidValueError(f"rounds must be >= 1, got {rounds}")
        self.candidates = tuple(candidates)
        self.rounds = rounds
        self._executors = {c: EXECUTORS.create(c) for c in self.candidates}
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
        """Fastest seconds of each whole-pass plan, per tuned pass (see
        [`tune_pass()`][ensemblekit.execution.auto.AutoExecutor.tune_pass])."""
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
        elif key in self._choices:
            choice = self._choices[key]
        else:
            if torch.compiler.is_compiling():  # never time inside a trace
                return self._executors[self._fallback(modules, inputs)].run(modules, inputs)
            timings = self._timings[key] = self._measure(modules, inputs)
            choice = self._choices[key] = min(timings, key=timings.__getitem__)
            self._forget_others(choice, modules)
        if self._seen is not None:
            self._seen.append((key, list(modules), choice))
        return self._executors[choice].run(modules, inputs)

    def prepare_pass(self, key: Hashable, run_pass: Callable[[], Tensor], module: nn.Module) -> None:
        """Tune the strategies on whole passes ([`tune_pass()`][ensemblekit.execution.auto.AutoExecutor.tune_pass])."""
        self.tune_pass(key, run_pass, module)

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
    unique, index = distinct(inputs)
    leaves = tuple((tuple(v.shape), v.stride(), v.dtype, v._base is not None) if isinstance(v, Tensor) else repr(v)
                   for s in unique for v in (tree_flatten(s)[0] if isinstance(s, tuple) else (s,)))
    device = unique[0].device if isinstance(unique[0], Tensor) else _device_of(modules, inputs)
    block, params = blocks[id(first)][1]
    return LevelSignature(str(device), torch.is_grad_enabled(), first.training, block, params,
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
    with Stopwatch(device) as watch:
        outputs = executor.run(modules, inputs)
        if to_channels_last:
            outputs = [as_channels_last(o) for o in outputs]
        if torch.is_grad_enabled():
            leaves = [v for v in tree_flatten(outputs)[0] if isinstance(v, Tensor) and v.requires_grad]
            grad_inputs = [v for v in tree_flatten(list(inputs))[0] if isinstance(v, Tensor) and v.requires_grad]
            if leaves:
                total = functools.reduce(operator.add, (v.float().sum() for v in leaves))
                torch.autograd.grad(total, params + grad_inputs, allow_unused=True)
    return watch.seconds


def _time_pass(run_pass: Callable[[], Tensor], params: Sequence[Tensor], device: torch.device) -> float:
    """Seconds of one pass, plus its backward to ``params`` when gradients are enabled (``.grad`` untouched)."""
    with Stopwatch(device) as watch:
        out = run_pass()
        if torch.is_grad_enabled() and out.requires_grad and params:
            torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    return watch.seconds


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
