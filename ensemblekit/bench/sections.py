"""Speed benchmarks of ensemblekit, each line with its target (``ensemblekit bench``).

Everything compared on one line is measured side by side in one process:
warm-up calls first, then interleaved rounds (one call of each variant per
round), and the median of each variant. FLOPs are counted on the plain
per-node modules ([`ensemblekit.core.cost`][ensemblekit.core.cost]). Sections:

1. tree ensemble vs independent networks (speed-up next to the FLOPs ratio);
2. every execution strategy and ``torch.compile`` for ``N`` members;
3. an independent ensemble vs TorchEnsemble's ``VotingClassifier``;
4. ``wrap()`` with one member vs the bare timm model;
5. per-sample halting: measured vs predicted saving, ``predict()`` and the streaming engine;
6. anytime inference: first prediction and the whole iteration;
7. hierarchical distillation vs the independent loss (training step);
8. peak memory of the tree vs the independent networks (`ensemblekit.bench.memory`).
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ensemblekit as ek
from ensemblekit.backbones import create_backbone
from ensemblekit.core.flops import count_flops
from ensemblekit.core.interfaces import HaltingPolicy, HaltingStep
from ensemblekit.core.timing import timed
from ensemblekit.execution import CANDIDATES, AutoExecutor
from ensemblekit.functional import confidence
from ensemblekit.training.trainer import training_step

__all__ = [
    "ALLOCATOR_ENV",
    "DEFAULT",
    "FULL",
    "QUICK",
    "REEXEC_FLAG",
    "SECTIONS",
    "STRATEGIES",
    "TARGETS",
    "Bench",
    "BenchSettings",
    "HalfAfterFirst",
    "Line",
    "Target",
    "allocator_status",
    "device_name",
    "header",
    "needs_allocator_env",
    "record",
    "run_bench",
]

ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
"""glibc malloc settings that keep large activations mapped between calls."""

REEXEC_FLAG = "ENSEMBLEKIT_BENCH_REEXECUTED"
"""Set in the environment of a bench that re-executed itself with `ALLOCATOR_ENV`."""

SECTIONS = (1, 2, 3, 4, 5, 6, 7, 8)
STRATEGIES = CANDIDATES


@dataclass(frozen=True)
class BenchSettings:
    """What the benchmark runs.

    Attributes:
        model: timm model name.
        model_args: keyword arguments of ``timm.create_model`` (width).
        image_size: height and width of the random input images.
        batch_size: images per call.
        num_classes: classes of the classifier.
        depth: depth of the binary tree (``depth + 1`` blocks, ``2**depth`` members).
        members: ensemble sizes of section 2.
        voting_members: ensemble size of section 3.
        warmup: untimed calls of each variant before timing.
        rounds: timed interleaved rounds.
        strategy_rounds: rounds of section 2's first pass, which times seven
            variants per ``N`` (``auto`` and the best of them then get twice
            ``rounds`` more, head to head).
        compile_backend: ``torch.compile`` backend of section 2.
        compile_members: the sizes of section 2 that are also compiled (inductor
            takes tens of seconds per size and mode on a CPU).
        stream_batches: batches of ``batch_size`` images in section 5's stream.
    """

    model: str = "resnet18"
    model_args: dict[str, Any] = field(default_factory=lambda: {"channels": (32, 64, 128, 256)})
    image_size: int = 32
    batch_size: int = 64
    num_classes: int = 10
    depth: int = 4
    members: tuple[int, ...] = (2, 4, 8, 16)
    voting_members: int = 8
    warmup: int = 1
    rounds: int = 7
    strategy_rounds: int = 3
    compile_backend: str = "inductor"
    compile_members: tuple[int, ...] = (2,)
    stream_batches: int = 4


DEFAULT = BenchSettings()
"""``ensemblekit bench``: compiling every size takes minutes on a CPU, so only ``N=2`` is compiled."""

FULL = BenchSettings(warmup=2, rounds=9, strategy_rounds=9, compile_members=(2, 4, 8, 16))
"""The full run (``benchmarks/run_all.py``): more rounds, ``torch.compile`` at every ``N``."""

QUICK = BenchSettings(model="resnet10t", model_args={"channels": (8, 8, 8, 8), "stem_width": 8}, image_size=16,
                      batch_size=4, depth=2, members=(2,), voting_members=2, warmup=1, rounds=1, strategy_rounds=1,
                      compile_backend="eager", compile_members=(), stream_batches=3)
"""``--smoke``: tiny settings that exercise every line in seconds (for tests); the numbers mean nothing."""

TARGETS = {
    "tree": {"cpu": 1.15, "cuda": 0.9},  # speed-up / FLOPs ratio, at least
    "auto": 1.05,  # auto time / best strategy time, at most
    "voting": {"cpu": 1.15, "cuda": 3.0},  # VotingClassifier time / ensemble time, at least
    "wrap": 1.03,  # wrapped time / bare model time, at most
    "halting": 0.8,  # measured saving / predicted saving, at least
    "anytime": 1.1,  # time ratios, at most
    "distillation": 1.1,  # time ratio, at most
    "memory": 1.0,  # tree memory / independent networks' memory, at most
}


@dataclass(frozen=True)
class Target:
    """A target a line is judged on: ``value op limit`` (``op`` ``">="`` or ``"<="``), ``measure`` naming the value."""

    measure: str
    value: float
    op: str
    limit: float

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.op == ">=" else self.value <= self.limit

    def to_dict(self) -> dict[str, Any]:
        return {"measure": self.measure, "value": self.value, "op": self.op, "limit": self.limit, "met": self.met}


@dataclass
class Line:
    """One printed line: a measurement, its numbers (``values``, times in ms), and its target when it has one."""

    section: int
    text: str
    met: bool | None = None
    skipped: str | None = None
    values: dict[str, Any] = field(default_factory=dict)
    target: Target | None = None

    def to_dict(self) -> dict[str, Any]:
        """The line as ``bench --json`` gives it: section, text, values, target (or None), met, skipped."""
        return {"section": self.section, "text": str(self), "values": self.values,
                "target": None if self.target is None else self.target.to_dict(), "met": self.met,
                "skipped": self.skipped}

    def __str__(self) -> str:
        if self.skipped is not None:
            return f"[{self.section}] {self.text}: skipped: {self.skipped}"
        verdict = "" if self.met is None else ("  -> met" if self.met else "  -> NOT MET")
        return f"[{self.section}] {self.text}{verdict}"


class HalfAfterFirst(HaltingPolicy):
    """Stops the first half of the batch after the first member, the rest after the last."""

    def step(self, step: HaltingStep, state: dict[str, Tensor] | None) -> tuple[Tensor, None]:
        b = step.prediction.shape[0]
        stop = torch.zeros(b, dtype=torch.bool, device=step.prediction.device)
        if step.index == 0:
            stop[: b // 2] = True
        return stop, None


def allocator_status() -> str:
    """The allocator settings in effect, and how they got there."""
    if platform.libc_ver()[0] != "glibc":
        return "default (not glibc: MALLOC_* settings do not apply)"
    values = " ".join(f"{k}={os.environ.get(k, 'unset')}" for k in ALLOCATOR_ENV)
    if os.environ.get(REEXEC_FLAG):
        return f"{values} (set by re-executing the bench)"
    if all(k in os.environ for k in ALLOCATOR_ENV):
        return f"{values} (from the environment)"
    return f"{values} (glibc default: every large activation is page-faulted again on each call)"


def needs_allocator_env() -> bool:
    """Whether the bench should re-execute itself with `ALLOCATOR_ENV`."""
    return platform.libc_ver()[0] == "glibc" and not all(k in os.environ for k in ALLOCATOR_ENV)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    return f"cpu ({model or platform.machine()}, {os.cpu_count()} logical cores)"


class Bench:
    """Runs the sections on one device and prints each line as it is measured.

    Args:
        settings: what to run.
        device: where to run.
        out: called with each printed line.
    """

    def __init__(self, settings: BenchSettings, device: torch.device, out: Callable[[str], None] = print):
        self.settings = settings
        self.device = device
        self.out = out
        self.lines: list[Line] = []
        s = settings
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(s.batch_size, 3, s.image_size, s.image_size, generator=generator).to(device)
        self.y = torch.randint(0, s.num_classes, (s.batch_size,), generator=generator).to(device)
        self._tree: ek.Ensemble | None = None

    # ------------------------------------------------------------ helpers
    def say(self, section: int, text: str, met: bool | None = None, skipped: str | None = None, *,
            target: Target | None = None, values: dict[str, Any] | None = None) -> None:
        """Print a line and keep it; with a ``target``, the line is judged on it."""
        if target is not None and met is None:
            met = target.met
        line = Line(section, text, met, skipped, dict(values or {}), target)
        self.lines.append(line)
        self.out(str(line))

    def model(self) -> nn.Module:
        s = self.settings
        return create_backbone(s.model, num_classes=s.num_classes, **s.model_args).to(self.device)

    def wrap(self, topology: str, execution: str = "auto", **options: Any) -> ek.Ensemble:
        return ek.wrap(self.model(), topology, execution=execution, example_input=self.x[:1],
                       **options).to(self.device)

    @property
    def tree(self) -> ek.Ensemble:
        """The tree ensemble of sections 1, 5 and 6 (built once)."""
        if self._tree is None:
            self._tree = self.wrap("tree", depth=self.settings.depth)
        return self._tree

    def time(self, variants: dict[str, Callable[[], Any]], rounds: int | None = None) -> dict[str, float]:
        """Median seconds per call of each variant: warm-up, then interleaved rounds."""
        for fn in variants.values():
            for _ in range(self.settings.warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds or self.settings.rounds):
            for k, fn in variants.items():
                times[k].append(timed(fn, self.device)[1])
        return {k: statistics.median(v) for k, v in times.items()}

    def inference(self, fn: Callable[[Tensor], Any], x: Tensor | None = None) -> Callable[[], Any]:
        x = self.x if x is None else x

        def call() -> Any:
            with torch.no_grad():
                return fn(x)

        return call

    def train_step(self, modules: Iterable[nn.Module], loss: Callable[[Tensor, Tensor], Tensor],
                   x: Tensor | None = None) -> Callable[[], None]:
        """One SGD step (clear gradients, forward, loss, backward, update) of ``modules`` under ``loss(x, y)``.

        The step is the trainer's ([`training_step()`][ensemblekit.training.trainer.training_step]).
        """
        modules = list(modules)
        optimizer = self.optimizer(modules)
        x = self.x if x is None else x

        def step() -> None:
            for m in modules:
                m.train()
            training_step(lambda: loss(x, self.y), [optimizer])

        return step

    def optimizer(self, modules: Iterable[nn.Module]) -> torch.optim.Optimizer:
        """SGD with momentum over the modules' parameters, fused where torch has it (as ``ek.train``)."""
        params = [p for m in modules for p in m.parameters()]
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=self.device.type in ("cpu", "cuda") or None)

    def ensemble_step(self, ens: ek.Ensemble, forward_members: Callable[[Tensor], Tensor] | None = None,
                      ) -> Callable[[], None]:
        """A training step of an ensemble with its own loss (``forward_members`` may be compiled)."""
        forward = forward_members if forward_members is not None else ens.forward_members

        def loss(x: Tensor, y: Tensor) -> Tensor:
            return ens.loss(forward(x), y).total

        return self.train_step([ens], loss)

    def flops(self, module: nn.Module) -> int:
        """Forward FLOPs of ``module`` on one image."""
        was = module.training
        module.eval()
        try:
            return count_flops(module, self.x[:1])
        finally:
            module.train(was)

    # ------------------------------------------------------------ sections
    def run(self, sections: Iterable[int] = SECTIONS) -> list[Line]:
        for section in sections:
            getattr(self, f"section{section}")()
        return self.lines

    def section1(self) -> None:
        """Tree ensemble vs as many independent networks, forward and training step."""
        tree = self.tree
        m = tree.num_members
        nets = [self.model() for _ in range(m)]
        nets_nhwc = [copy.deepcopy(n).to(memory_format=torch.channels_last) for n in nets]
        x_nhwc = self.x.contiguous(memory_format=torch.channels_last)
        ratio = m * self.flops(nets[0]) / tree.cost_table(input_size=tuple(self.x.shape[1:]))[-1].flops
        target = TARGETS["tree"].get(self.device.type, TARGETS["tree"]["cpu"])

        def nets_forward(group: list[nn.Module]) -> Callable[[Tensor], list[Tensor]]:
            return lambda x: [n(x) for n in group]

        def nets_loss(group: list[nn.Module]) -> Callable[[Tensor, Tensor], Tensor]:
            return lambda x, y: sum(F.cross_entropy(n(x), y) for n in group)

        for mode in ("eval", "train"):
            if mode == "eval":
                for n in [tree, *nets, *nets_nhwc]:
                    n.eval()
                variants = {"tree": self.inference(tree), "nets": self.inference(nets_forward(nets)),
                            "nets_nhwc": self.inference(nets_forward(nets_nhwc), x_nhwc)}
            else:
                variants = {"tree": self.ensemble_step(tree),
                            "nets": self.train_step(nets, nets_loss(nets)),
                            "nets_nhwc": self.train_step(nets_nhwc, nets_loss(nets_nhwc), x_nhwc)}
            t = self.time(variants)
            base = min(("nets", "nets_nhwc"), key=t.__getitem__)
            speedup = t[base] / t["tree"]
            self.say(1, f"{mode:5s} tree ({m} members, {len(tree.graph.levels)} blocks, execution=auto) "
                        f"{t['tree'] * 1e3:.1f} ms vs {m} independent networks {t[base] * 1e3:.1f} ms "
                        f"({'NHWC' if base == 'nets_nhwc' else 'NCHW'}, the faster layout; other "
                        f"{max(t['nets'], t['nets_nhwc']) * 1e3:.1f} ms): speed-up {speedup:.2f}x, "
                        f"FLOPs ratio {ratio:.2f}x, speed-up/FLOPs ratio {speedup / ratio:.2f} "
                        f"(target >= {target} on {self.device.type})",
                     target=Target("speedup_per_flops_ratio", speedup / ratio, ">=", target),
                     values={"mode": mode, "members": m, "tree_ms": t["tree"] * 1e3,
                             "independent_ms": t[base] * 1e3, "independent_nchw_ms": t["nets"] * 1e3,
                             "independent_nhwc_ms": t["nets_nhwc"] * 1e3, "speedup": speedup, "flops_ratio": ratio})
            self._block_speeds(tree, mode, channels_last=base == "nets_nhwc")
        self._optimizer_speeds(tree, nets)
        self._describe_auto(1, tree)

    def _optimizer_speeds(self, tree: ek.Ensemble, nets: list[nn.Module]) -> None:
        """Time the optimizer step alone: it scales with parameters, which the tree shares less than FLOPs."""
        models = {"tree": [tree], "nets": nets}
        optimizers = {k: self.optimizer(m) for k, m in models.items()}
        sizes = {k: sum(p.numel() for module in m for p in module.parameters()) for k, m in models.items()}
        for m in models.values():
            for p in (p for module in m for p in module.parameters()):
                p.grad = torch.zeros_like(p)
        t = self.time({k: opt.step for k, opt in optimizers.items()})
        self.say(1, f"train the optimizer step alone: tree {t['tree'] * 1e3:.1f} ms "
                    f"({sizes['tree'] / 1e6:.1f}M parameters) vs {len(nets)} networks {t['nets'] * 1e3:.1f} ms "
                    f"({sizes['nets'] / 1e6:.1f}M): "
                    f"{t['nets'] / t['tree']:.2f}x (it follows the parameter ratio "
                    f"{sizes['nets'] / sizes['tree']:.2f}x, not the FLOPs ratio; no target)",
                 values={"mode": "train", "tree_ms": t["tree"] * 1e3, "independent_ms": t["nets"] * 1e3,
                         "tree_params": sizes["tree"], "independent_params": sizes["nets"]})

    def _block_speeds(self, tree: ek.Ensemble, mode: str, channels_last: bool) -> None:
        """Time each block of member 1's path alone: the speed-up the tree can reach at those speeds.

        With ``t_b`` the time of block ``b`` and ``n_b`` the tree's nodes of
        block ``b``, running every node at that speed gives a speed-up of
        ``M * sum(t_b) / sum(n_b * t_b)``; the FLOPs ratio is the same formula
        with FLOPs in place of times.
        """
        x = self.x.contiguous(memory_format=torch.channels_last) if channels_last else self.x
        blocks = [copy.deepcopy(tree.nodes[i]).train(mode == "train") for i in tree.graph.members[0].path]
        inputs = []
        with torch.no_grad():
            for block in blocks:
                inputs.append(x)
                x = block(x)

        def run(block: nn.Module, x: Tensor) -> Callable[[], None]:
            if mode == "eval":
                return self.inference(block, x)
            x = x.detach().requires_grad_()
            return lambda: block(x).float().sum().backward()

        t = self.time({str(b): run(block, x) for b, (block, x) in enumerate(zip(blocks, inputs))})
        times = [t[str(b)] for b in range(len(blocks))]
        counts = [len(level) for level in tree.graph.levels]
        reachable = tree.num_members * sum(times) / sum(n * s for n, s in zip(counts, times))
        self.say(1, f"{mode:5s} one member's blocks alone ({'NHWC' if channels_last else 'NCHW'}): "
                    + " / ".join(f"{s * 1e3:.2f}" for s in times) + " ms, the tree has "
                    + " / ".join(map(str, counts)) + f" nodes of each: at these speeds its speed-up is "
                    f"{reachable:.2f}x (the FLOPs ratio assumes time follows FLOPs; no target)",
                 values={"mode": mode, "layout": "NHWC" if channels_last else "NCHW",
                         "block_ms": [v * 1e3 for v in times], "nodes_per_block": counts,
                         "reachable_speedup": reachable})

    def section2(self) -> None:
        """Every strategy and torch.compile for N members, as a fraction of one model's GFLOP/s."""
        s = self.settings
        single = self.model()
        single_flops = self.flops(single)
        for n in s.members:
            ensembles = {name: self.wrap("independent", execution=name, members=n)
                         for name in (*STRATEGIES, "auto")}
            flops = ensembles["loop"].cost_table(input_size=tuple(self.x.shape[1:]))[-1].flops
            compiled = None
            if n in s.compile_members:
                compiled = self.wrap("independent", execution="loop", members=n)
                # fullgraph: the whole ensemble is one graph (a graph break is an error, not a slowdown)
                compiled_forward = torch.compile(compiled, backend=s.compile_backend, fullgraph=True)
                compiled_members = torch.compile(compiled.forward_members, backend=s.compile_backend,
                                                 fullgraph=True)
            for mode in ("eval", "train"):
                variants: dict[str, Callable[[], Any]] = {}
                if mode == "eval":
                    for e in (*ensembles.values(), single, *([compiled] if compiled is not None else [])):
                        e.eval()
                    variants["single"] = self.inference(single)
                    variants.update({k: self.inference(e) for k, e in ensembles.items()})
                    if compiled is not None:
                        variants["compile"] = self.inference(compiled_forward)
                else:
                    variants["single"] = self.train_step([single], lambda x, y: F.cross_entropy(single(x), y))
                    variants.update({k: self.ensemble_step(e) for k, e in ensembles.items()})
                    if compiled is not None:
                        variants["compile"] = self.ensemble_step(compiled, compiled_members)
                start = time.perf_counter()
                t = self.time(variants, s.strategy_rounds)
                rate = {k: (single_flops if k == "single" else flops) / v for k, v in t.items()}
                parts = [f"{k} {v * 1e3:.1f} ms ({rate[k] / rate['single']:.0%})" for k, v in t.items()
                         if k != "single"]
                took = f"{time.perf_counter() - start:.0f} s{' incl. compile' if compiled is not None else ''}"
                self.say(2, f"N={n:<2d} {mode:5s} time (share of one model's GFLOP/s, single "
                            f"{t['single'] * 1e3:.1f} ms): " + ", ".join(parts) + f"  [{took}]",
                         values={"members": n, "mode": mode, "ms": {k: v * 1e3 for k, v in t.items()},
                                 "share_of_single_rate": {k: rate[k] / rate["single"] for k in t if k != "single"}})
                best = min(STRATEGIES, key=t.__getitem__)
                # the two are often a few percent apart: time them again head to head, with twice the rounds
                rounds = 2 * s.rounds
                head_to_head = self.time({best: variants[best], "auto": variants["auto"]}, rounds)
                ratio = head_to_head["auto"] / head_to_head[best]
                self.say(2, f"N={n:<2d} {mode:5s} auto vs the best strategy ({best}), {rounds} more rounds head to "
                            f"head: {head_to_head['auto'] * 1e3:.1f} vs {head_to_head[best] * 1e3:.1f} ms, "
                            f"{ratio:.3f}x (target <= {TARGETS['auto']})",
                         target=Target("auto_vs_best", ratio, "<=", TARGETS["auto"]),
                         values={"members": n, "mode": mode, "best": best, "rounds": rounds,
                                 "auto_ms": head_to_head["auto"] * 1e3, "best_ms": head_to_head[best] * 1e3})
            self._describe_auto(2, ensembles["auto"])

    def section3(self) -> None:
        """Independent ensemble vs TorchEnsemble's VotingClassifier on the same members."""
        try:
            from torchensemble import VotingClassifier
        except ImportError:
            self.say(3, "independent ensemble vs TorchEnsemble VotingClassifier",
                     skipped="torchensemble not installed")
            return
        n = self.settings.voting_members
        ens = self.wrap("independent", members=n, aggregator="mean_probs").eval()
        members = [nn.Sequential(*(ens.nodes[i] for i in member.path), ens.heads[member.index])
                   for member in ens.graph.members]
        voting = VotingClassifier(estimator=members[0], n_estimators=n, cuda=self.device.type == "cuda")
        voting.estimators_.extend(members)
        voting.eval()
        with torch.no_grad():
            same = torch.allclose(voting(self.x), ens(self.x).exp(), atol=1e-5)
        x_nhwc = self.x.contiguous(memory_format=torch.channels_last)
        t = self.time({"ensemble": self.inference(ens), "voting": self.inference(voting),
                       "voting_nhwc": self.inference(voting, x_nhwc)})
        ratio = t["voting"] / t["ensemble"]
        target = TARGETS["voting"].get(self.device.type, TARGETS["voting"]["cpu"])
        self.say(3, f"eval  N={n} independent ensemble (execution=auto) {t['ensemble'] * 1e3:.1f} ms vs "
                    f"VotingClassifier {t['voting'] * 1e3:.1f} ms (same outputs: {same}): {ratio:.2f}x faster "
                    f"(target >= {target} on {self.device.type})",
                 target=Target("voting_vs_ensemble", ratio, ">=", target),
                 values={"members": n, "ensemble_ms": t["ensemble"] * 1e3, "voting_ms": t["voting"] * 1e3,
                         "same_outputs": same})
        self.say(3, f"eval  VotingClassifier given channels-last input: {t['voting_nhwc'] * 1e3:.1f} ms "
                    f"({t['voting_nhwc'] / t['ensemble']:.2f}x the ensemble's time; no target)",
                 values={"voting_nhwc_ms": t["voting_nhwc"] * 1e3, "ensemble_ms": t["ensemble"] * 1e3})
        self._describe_auto(3, ens)

    def section4(self) -> None:
        """wrap() with one member vs the bare timm model."""
        bare = self.model()
        ens = ek.wrap(copy.deepcopy(bare), "independent", members=1, init="copy").to(self.device)
        bare.eval()
        ens.eval()
        with torch.no_grad():
            same = torch.allclose(ens(self.x), bare(self.x), atol=1e-5)
        rounds = 8 * self.settings.rounds  # one model is cheap and the difference is small: more rounds
        t = self.time({"bare": self.inference(bare), "wrapped": self.inference(ens)}, rounds)
        ratio = t["wrapped"] / t["bare"]
        self.say(4, f"eval  wrap() one member {t['wrapped'] * 1e3:.2f} ms vs bare model {t['bare'] * 1e3:.2f} ms "
                    f"(same outputs: {same}): overhead {ratio - 1:+.1%} (target <= {TARGETS['wrap'] - 1:.0%})",
                 target=Target("wrapped_vs_bare", ratio, "<=", TARGETS["wrap"]),
                 values={"mode": "eval", "wrapped_ms": t["wrapped"] * 1e3, "bare_ms": t["bare"] * 1e3,
                         "same_outputs": same})
        t = self.time({"bare": self.train_step([bare], lambda x, y: F.cross_entropy(bare(x), y)),
                       "wrapped": self.ensemble_step(ens)}, rounds)
        ratio = t["wrapped"] / t["bare"]
        self.say(4, f"train wrap() one member {t['wrapped'] * 1e3:.2f} ms vs bare model {t['bare'] * 1e3:.2f} ms: "
                    f"overhead {ratio - 1:+.1%} (target <= {TARGETS['wrap'] - 1:.0%})",
                 target=Target("wrapped_vs_bare", ratio, "<=", TARGETS["wrap"]),
                 values={"mode": "train", "wrapped_ms": t["wrapped"] * 1e3, "bare_ms": t["bare"] * 1e3})

    def section5(self) -> None:
        """Per-sample halting: the wall-clock saving vs the FLOPs saving the policy predicts.

        Measured at the bench's batch size and at four times it: every operator
        has a fixed cost, so halving a small batch saves less than half the time.
        """
        tree = self.tree.eval()
        full_policy = ek.halting.Fixed(tree.num_members)
        for x in (self.x, torch.cat([self.x] * 4)):
            half = tree.predict(x, halting=HalfAfterFirst())
            full = tree.predict(x, halting=full_policy)
            predicted = 1 - half.flops.mean().item() / full.flops.mean().item()
            t = self.time({"full": lambda x=x: tree.predict(x, halting=full_policy),
                           "half": lambda x=x: tree.predict(x, halting=HalfAfterFirst())})
            measured = 1 - t["half"] / t["full"]
            ratio = measured / predicted
            self.say(5, f"eval  batch {x.shape[0]}: predict(), half the samples stop after member 1: "
                        f"{t['half'] * 1e3:.1f} ms vs all members for all samples {t['full'] * 1e3:.1f} ms: "
                        f"saving {measured:.1%} measured vs {predicted:.1%} predicted by FLOPs = {ratio:.2f} "
                        f"(target >= {TARGETS['halting']})",
                     target=Target("measured_vs_predicted_saving", ratio, ">=", TARGETS["halting"]),
                     values={"batch": x.shape[0], "half_ms": t["half"] * 1e3, "full_ms": t["full"] * 1e3,
                             "measured_saving": measured, "predicted_saving": predicted})
            half_batch = x[: x.shape[0] // 2]
            t = self.time({"full": self.inference(tree, x), "half": self.inference(tree, half_batch)})
            scale = t["half"] / t["full"]
            self.say(5, f"eval  batch {x.shape[0]}: the tree on half the batch takes {scale:.2f}x the time of the "
                        f"whole batch ({t['half'] * 1e3:.1f} vs {t['full'] * 1e3:.1f} ms; every operator has a fixed "
                        f"cost), so halting half the samples can save about {2 * (1 - scale):.2f} of what FLOPs "
                        f"predict (no target)",
                     values={"batch": x.shape[0], "half_batch_ms": t["half"] * 1e3, "whole_batch_ms": t["full"] * 1e3,
                             "time_scale": scale})
        self._stream_lines()

    def _stream_lines(self) -> None:
        """The streaming engine on a stream of batches in which half the samples stop after member 1.

        The policy is [`Confidence`][ensemblekit.components.halting.Confidence] with
        member 1's threshold at the median confidence over the stream (so half
        of all samples stop there, whatever their batch) and thresholds no
        confidence reaches after it (the rest use every member). The target is
        judged as ``predict()``'s lines are, against all members on every image
        through the same path (the engine with ``Fixed(all members)``, every
        step on a full batch); the forward pass, which runs all members level
        by level, is shown next to it. Half the bench's rounds: each call runs
        the whole stream.
        """
        tree, s = self.tree.eval(), self.settings
        m = tree.num_members
        generator = torch.Generator().manual_seed(1)
        batches = [torch.randn(s.batch_size, 3, s.image_size, s.image_size, generator=generator).to(self.device)
                   for _ in range(s.stream_batches)]
        with torch.no_grad():
            first = torch.cat([confidence(tree.forward_output(x, members=[0]).members[:, 0]) for x in batches])
        values = first.sort().values
        half = len(values) // 2
        policy = ek.halting.Confidence([float(values[half - 1] + values[half]) / 2] + [1.0] * (m - 1))

        def stream(halting: HaltingPolicy) -> Callable[[], list[Any]]:
            return lambda: list(tree.stream(batches, halting=halting, batch_size=s.batch_size))

        t = self.time({"stream": stream(policy), "all": stream(ek.halting.Fixed(m)),
                       "forward": self.inference(lambda _: [tree(x) for x in batches])},
                      rounds=max(1, s.rounds // 2))
        results = stream(policy)()
        flops = torch.cat([r.flops for r in results])
        used = torch.cat([r.members_used for r in results])
        latency = torch.cat([r.latency for r in results])
        full_flops = float(tree.cost_table(input_size=tuple(batches[0].shape[1:]))[-1].flops)
        predicted = 1 - flops.mean().item() / full_flops
        saving = {k: 1 - t["stream"] / t[k] for k in ("all", "forward")}
        rate = {k: len(batches) * s.batch_size / v for k, v in t.items()}
        ratio = saving["all"] / predicted
        stopped = float((used == 1).double().mean())
        self.say(5, f"eval  stream of {len(batches)} batches of {s.batch_size}, {stopped:.0%} of the samples stop "
                    f"after member 1: engine {rate['stream']:.0f} images/s vs all members on "
                    f"everything through the engine {rate['all']:.0f} images/s: saving {saving['all']:.1%} measured "
                    f"vs {predicted:.1%} predicted by FLOPs = {ratio:.2f} (target >= {TARGETS['halting']})",
                 target=Target("measured_vs_predicted_saving", ratio, ">=", TARGETS["halting"]),
                 values={"batches": len(batches), "batch": s.batch_size, "stopped_after_first": stopped,
                         "images_per_s": rate, "measured_saving": saving["all"], "predicted_saving": predicted})
        p50, p95 = (float(latency.quantile(q)) * 1e3 for q in (0.5, 0.95))
        self.say(5, f"eval  the same stream: the forward pass (all members, level by level) {rate['forward']:.0f} "
                    f"images/s, so the engine saves {saving['forward']:.1%} = {saving['forward'] / predicted:.2f} of "
                    f"the FLOPs saving against it; engine latency per sample p50 {p50:.1f} ms, p95 {p95:.1f} ms "
                    f"(from its batch's submission, every batch at hand, no max_wait; no target)",
                 values={"forward_images_per_s": rate["forward"], "saving_vs_forward": saving["forward"],
                         "latency_p50_ms": p50, "latency_p95_ms": p95})

    def section6(self) -> None:
        """Anytime inference: first prediction vs one member alone, whole iteration vs all members at once."""
        tree = self.tree.eval()
        path = tree.graph.members[0].path
        own = nn.Sequential(*(tree.nodes[i] for i in path), tree.heads[0])
        # the user's images arrive NCHW: the channels-last path pays for its conversion
        own_nhwc = self.inference(lambda x: own(x.contiguous(memory_format=torch.channels_last)))
        unbatched = copy.deepcopy(tree)
        unbatched.execution = "loop_nhwc" if self.device.type == "cpu" else "loop"
        t = self.time({"first": lambda: next(iter(tree.anytime(self.x))), "own": self.inference(own),
                       "own_nhwc": own_nhwc, "all": self.inference(tree), "iterate": lambda: list(tree.anytime(self.x)),
                       "nested": lambda: list(tree.anytime(self.x, granularity="nested")),
                       "all_unbatched": self.inference(unbatched),
                       "iterate_unbatched": lambda: list(unbatched.anytime(self.x))})
        own_best = min(t["own"], t["own_nhwc"])
        ratio = t["first"] / own_best
        self.say(6, f"eval  anytime first prediction {t['first'] * 1e3:.1f} ms vs member 1's own path "
                    f"{own_best * 1e3:.1f} ms (the faster of NCHW {t['own'] * 1e3:.1f} / NHWC "
                    f"{t['own_nhwc'] * 1e3:.1f}): {ratio:.2f}x (target <= {TARGETS['anytime']})",
                 target=Target("first_vs_own_path", ratio, "<=", TARGETS["anytime"]),
                 values={"first_ms": t["first"] * 1e3, "own_ms": own_best * 1e3, "own_nchw_ms": t["own"] * 1e3,
                         "own_nhwc_ms": t["own_nhwc"] * 1e3})
        ratio = t["nested"] / t["all"]
        self.say(6, f"eval  whole anytime iteration ({tree.num_members} steps), granularity='nested' "
                    f"({len(tree.nested_sizes)} "
                    f"sub-ensembles, each level's new nodes in one call) {t['nested'] * 1e3:.1f} ms vs all members at "
                    f"once {t['all'] * 1e3:.1f} ms: {ratio:.2f}x (target <= {TARGETS['anytime']}); per member "
                    f"{t['iterate'] * 1e3:.1f} ms, {t['iterate'] / t['all']:.2f}x",
                 target=Target("nested_vs_all", ratio, "<=", TARGETS["anytime"]),
                 values={"nested_ms": t["nested"] * 1e3, "all_ms": t["all"] * 1e3,
                         "per_member_ms": t["iterate"] * 1e3})
        self.say(6, f"eval  the same with execution={unbatched.execution!r} for both (no level is batched): "
                    f"{t['iterate_unbatched'] * 1e3:.1f} vs {t['all_unbatched'] * 1e3:.1f} ms, "
                    f"{t['iterate_unbatched'] / t['all_unbatched']:.2f}x (anytime runs one node at a time; no target)",
                 values={"execution": unbatched.execution, "iterate_ms": t["iterate_unbatched"] * 1e3,
                         "all_ms": t["all_unbatched"] * 1e3})

    def section7(self) -> None:
        """Training step with hierarchical distillation vs the independent loss."""
        from ensemblekit.core.registry import LOSSES

        if "hierarchical_distillation" not in LOSSES.names():
            self.say(7, "train hierarchical distillation vs independent loss",
                     skipped="no loss named 'hierarchical_distillation' is registered")
            return
        # the default strategy for both: only the loss differs (auto would spend its tuning twice)
        independent = self.wrap("tree", "loop", depth=self.settings.depth, loss="independent")
        distilled = self.wrap("tree", "loop", depth=self.settings.depth, loss="hierarchical_distillation")
        t = self.time({"independent": self.ensemble_step(independent), "distilled": self.ensemble_step(distilled)})
        ratio = t["distilled"] / t["independent"]
        self.say(7, f"train tree, hierarchical distillation {t['distilled'] * 1e3:.1f} ms vs independent loss "
                    f"{t['independent'] * 1e3:.1f} ms: {ratio:.2f}x (target <= {TARGETS['distillation']})",
                 target=Target("distilled_vs_independent", ratio, "<=", TARGETS["distillation"]),
                 values={"distilled_ms": t["distilled"] * 1e3, "independent_ms": t["independent"] * 1e3})

    def section8(self) -> None:
        """Peak memory: the tree vs as many independent networks, inference and training step."""
        from ensemblekit.bench import memory as bench_memory

        m = 2 ** self.settings.depth
        reason = bench_memory.unsupported(self.device)
        if reason is not None:
            self.say(8, f"memory of the tree vs {m} independent networks", skipped=reason)
            return
        sizes = bench_memory.measure(self.settings, self.device)
        tree, nets = sizes["tree"], sizes["nets"]
        for mode in ("eval", "train"):
            total = {k: v["weights"] + v[mode] for k, v in sizes.items()}
            ratio = total["tree"] / total["nets"]
            self.say(8, f"{mode:5s} memory: tree {_mb(total['tree'])} (weights {_mb(tree['weights'])} + peak of one "
                        f"{'call' if mode == 'eval' else 'step'} {_mb(tree[mode])}) vs {m} independent networks "
                        f"{_mb(total['nets'])} ({_mb(nets['weights'])} + {_mb(nets[mode])}): {ratio:.2f}x "
                        f"(target <= {TARGETS['memory']})",
                     target=Target("tree_vs_independent_memory", ratio, "<=", TARGETS["memory"]),
                     values={"mode": mode, "tree_bytes": total["tree"], "independent_bytes": total["nets"],
                             "tree_weights_bytes": tree["weights"], "independent_weights_bytes": nets["weights"],
                             f"tree_{mode}_peak_bytes": tree[mode], f"independent_{mode}_peak_bytes": nets[mode]})

    def _describe_auto(self, section: int, ens: ek.Ensemble) -> None:
        executor = ens.executor
        if isinstance(executor, AutoExecutor):
            self.say(section, "auto chose: " + "; ".join(executor.describe()), values={"auto": executor.describe()})


def _mb(size: int) -> str:
    mb = size / 2**20
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.2f} MB"


def _load() -> str:
    """The system load average, when the platform reports one (other work skews CPU timings)."""
    try:
        return ", load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except (AttributeError, OSError):
        return ""


def header(settings: BenchSettings, device: torch.device) -> list[str]:
    """Device, versions, threads, allocator and settings."""
    s = settings
    args = ", ".join(f"{k}={v}" for k, v in s.model_args.items())
    return [
        f"device: {device_name(device)}{_load()}",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, ensemblekit {ek.__version__}",
        f"allocator: {allocator_status()}",
        f"model: {s.model}({args}) at {s.image_size}x{s.image_size}, batch {s.batch_size}, "
        f"{s.warmup} warm-up calls then {s.rounds} interleaved rounds ({s.strategy_rounds} in section 2's "
        f"first pass), medians",
    ]


def run_bench(settings: BenchSettings, device: torch.device, sections: Iterable[int] = SECTIONS,
              out: Callable[[str], None] = print) -> list[Line]:
    """Print the header and every line of the chosen sections, then a summary.

    Returns:
        The lines printed after the header.
    """
    start = time.perf_counter()
    for text in header(settings, device):
        out(text)
    torch.manual_seed(0)
    lines = Bench(settings, device, out).run(sections)
    judged = [line for line in lines if line.met is not None]
    skipped = [line for line in lines if line.skipped is not None]
    out(f"targets met: {sum(line.met for line in judged)}/{len(judged)}"
        + (f", {len(skipped)} skipped" if skipped else "")
        + f"; bench wall-clock {time.perf_counter() - start:.0f} s{_load()}")
    return lines


def record(settings: BenchSettings, device: torch.device, lines: Iterable[Line], seconds: float) -> dict[str, Any]:
    """What ``ensemblekit bench --json`` prints: the machine, the settings, each section's lines (their numbers,
    times in ms, and their targets) and the summary.

    Examples:
        >>> line = Line(4, "eval  wrap() one member", target=Target("wrapped_vs_bare", 1.01, "<=", 1.03))
        >>> record(QUICK, torch.device("cpu"), [line], 1.0)["sections"]["4"][0]["target"]["met"]
        True
    """
    lines = list(lines)
    judged = [line for line in lines if line.met is not None]
    sections: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        sections.setdefault(str(line.section), []).append(line.to_dict())
    return {
        "device": device_name(device),
        "versions": {"torch": torch.__version__, "ensemblekit": ek.__version__},
        "threads": torch.get_num_threads(),
        "allocator": allocator_status(),
        "settings": asdict(settings),
        "targets": TARGETS,
        "sections": sections,
        "summary": {"targets_met": sum(bool(line.met) for line in judged), "targets_judged": len(judged),
                    "skipped": sum(line.skipped is not None for line in lines), "seconds": seconds},
    }
