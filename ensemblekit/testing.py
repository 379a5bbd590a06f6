"""Helpers for testing plugins (ensemblekit runs them over its own components too).

* [`isolated_plugins()`][ensemblekit.testing.isolated_plugins]: a fresh plugin state for one test, reset afterwards.
* [`check_component()`][ensemblekit.testing.check_component]: build a registered component by name and check it
  obeys its interface's contract; [`registered_components()`][ensemblekit.testing.registered_components] lists every
  ``(kind, name)`` to parametrise that over.
* [`check_topology()`][ensemblekit.testing.check_topology],
  [`check_aggregator()`][ensemblekit.testing.check_aggregator],
  [`check_loss()`][ensemblekit.testing.check_loss],
  [`check_halting_policy()`][ensemblekit.testing.check_halting_policy],
  [`check_splitter()`][ensemblekit.testing.check_splitter],
  [`check_executor()`][ensemblekit.testing.check_executor],
  [`check_recipe()`][ensemblekit.testing.check_recipe],
  [`check_schedule()`][ensemblekit.testing.check_schedule]: the same checks for an object.

Example options: the checks build a component with ``factory(**options)``.
A factory whose parameters all have defaults needs nothing (aggregators and
halting policies are also given ``num_members``, as ``wrap()`` does); one
with required parameters declares ``example_options``, a callable returning
the keyword arguments to use::

    class Tempered(Aggregator):
        def __init__(self, temperature: float): ...

        @classmethod
        def example_options(cls) -> dict:
            return {"temperature": 2.0}

A splitter's ``example_options()`` returns ``model``, ``num_blocks`` and
``example_input``: a model it handles, checked to be split faithfully. A
recipe's may return a ``backbone`` (default: a timm ``resnet10t``) and options.
A training schedule's may return an ``ensemble`` it is made for (default: a
tiny tree) and options.

Examples:
    >>> from ensemblekit.testing import check_component
    >>> check_component("aggregator", "mean")  # raises ConformanceError on a violation
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ensemblekit.components.topologies import Tree
from ensemblekit.core.batching import select_running_state
from ensemblekit.core.blocks import BlockSplit
from ensemblekit.core.ensemble import Ensemble
from ensemblekit.core.graph import NodeGraph, SharingTopology
from ensemblekit.core.interfaces import Aggregator, Executor, HaltingPolicy, HaltingStep, LossResult, LossStrategy
from ensemblekit.core.registry import HALTING_POLICIES, REGISTRIES, get_registry
from ensemblekit.errors import EnsembleKitError
from ensemblekit.plugins.manager import reset_plugins

__all__ = [
    "BATCH",
    "CLASSES",
    "MEMBERS",
    "ConformanceError",
    "build",
    "check_aggregator",
    "check_component",
    "check_executor",
    "check_halting_policy",
    "check_loss",
    "check_recipe",
    "check_schedule",
    "check_splitter",
    "check_topology",
    "example_options",
    "isolated_plugins",
    "registered_components",
    "toy_split",
]

BATCH, CLASSES, MEMBERS = 6, 5, 4
"""Sizes the checks use: distinct, so a tensor laid out wrongly is caught."""


class ConformanceError(EnsembleKitError, AssertionError):
    """A component breaks its interface's contract; the message says which rule."""


@contextmanager
def _seeded() -> Iterator[None]:
    """Checks draw the same random inputs every time, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@contextmanager
def isolated_plugins() -> Iterator[None]:
    """Reset the plugin state on entry and exit, so what a test registers does not leak.

    Examples:
        >>> from ensemblekit.plugins.manager import register_plugin
        >>> with isolated_plugins():
        ...     info = register_plugin(object(), "empty")
    """
    reset_plugins()
    try:
        yield
    finally:
        reset_plugins()


def registered_components() -> list[tuple[str, str]]:
    """``(kind, name)`` of every registered component, e.g. ``("aggregator", "mean")``."""
    return [(registry.kind, name) for registry in REGISTRIES.values() for name in registry.names()]


def example_options(factory: Any) -> dict[str, Any]:
    """The options the checks build ``factory`` with: its ``example_options()``, or none."""
    make = getattr(factory, "example_options", None)
    return dict(make()) if make is not None else {}


def build(kind: str, name: str, num_members: int = MEMBERS) -> Any:
    """Build registered component ``name`` of ``kind`` with its example options.

    Examples:
        >>> build("aggregator", "weighted").log_weights.shape
        torch.Size([4])
    """
    registry = get_registry(kind)
    factory = registry.get(name).factory
    options = example_options(factory)
    context = {"num_members": num_members} if kind in ("aggregator", "halting policy") else {}
    hint = "give its factory an example_options() returning example values (see ensemblekit.testing)"
    missing = [p.name for p in _required_params(factory) if p.name not in options and p.name not in context]
    if missing:
        raise ConformanceError(f"{kind} {name!r} needs {', '.join(missing)} to be built: {hint}")
    try:
        return registry.create(name, context=context, **options)
    except (TypeError, ValueError) as err:
        raise ConformanceError(f"{kind} {name!r} cannot be built with options {options}: {err}; {hint}") from err


def check_component(kind: str, name: str) -> None:
    """Build registered component ``name`` of ``kind`` and run the check for its interface.

    Raises:
        ConformanceError: the component breaks its interface's contract.
    """
    if kind in ("splitter", "recipe", "schedule"):
        factory = get_registry(kind).get(name).factory
        check = {"splitter": check_splitter, "recipe": check_recipe, "schedule": check_schedule}[kind]
        check(factory, **example_options(factory))
        return
    checks: dict[str, Callable[[Any], None]] = {
        "topology": check_topology, "aggregator": check_aggregator, "loss": check_loss,
        "halting policy": check_halting_policy, "execution strategy": check_executor,
    }
    component = build(kind, name)
    if kind in checks:
        checks[kind](component)
    else:  # a kind without a check of its own: built with its example options, of its base class
        base = get_registry(kind).base
        _expect(base is None or isinstance(component, base), f"{kind} {name!r} built {component!r}, not a {base}")


@_seeded()
def check_topology(topology: SharingTopology) -> None:
    """A valid node graph, nested sizes within the members, and a working tiny ensemble.

    Members of a prefix must come out the same whether evaluated alone or with the rest.
    """
    _expect(isinstance(topology, SharingTopology), f"{topology!r} is not a SharingTopology")
    num_blocks = topology.num_blocks or 3
    graph = topology.build(num_blocks)
    _expect(isinstance(graph, NodeGraph), f"build() returned {type(graph).__name__}, not a NodeGraph")
    _expect(max(node.block for node in graph.nodes) < num_blocks,
            f"the graph uses blocks beyond the {num_blocks} it was built for")
    sizes = graph.nested_sizes
    _expect(len(sizes) > 0 and list(sizes) == sorted(set(sizes)) and 1 <= sizes[0] and sizes[-1] <= graph.num_members,
            f"nested_sizes {sizes} must increase strictly within 1..{graph.num_members}")
    _expect(isinstance(topology.sequential, bool), "sequential must be a bool")
    ens = Ensemble(toy_split(num_blocks), topology, _mean()).eval()
    x = _images()
    with torch.no_grad():
        members = ens.forward_members(x)
        _expect_shape(members, (BATCH, graph.num_members, CLASSES), "forward_members()")
        for k in range(1, graph.num_members + 1):
            prefix = ens.forward_output(x, members=range(k)).members
            _expect_close(prefix, members[:, :k], f"the first {k} members evaluated alone")


@_seeded()
def check_aggregator(aggregator: Aggregator, num_members: int = MEMBERS) -> None:
    """Prediction ``b c``; incremental equals batch form; per-sample and batch-first state.

    Dropping samples from the running state mid-way (what halting does) must
    give the same predictions for the samples kept.
    """
    _expect(isinstance(aggregator, Aggregator), f"{aggregator!r} is not an Aggregator")
    aggregator.eval()
    members = torch.randn(BATCH, num_members, CLASSES) * 3
    full = aggregator(members)
    _expect_shape(full, (BATCH, CLASSES), "aggregator(members)")
    prefixes = aggregator.prefixes(members)
    _expect_shape(prefixes, (BATCH, num_members, CLASSES), "prefixes(members)")
    state = None
    for k in range(num_members):
        state = aggregator.update(state, members[:, k], k)
        _expect_batch_first(_per_sample(state, aggregator.per_sample_state), BATCH, "the aggregator state")
        incremental = aggregator.value(state)
        _expect_close(incremental, aggregator(members[:, : k + 1]), f"incremental vs batch after {k + 1} members")
        _expect_close(incremental, prefixes[:, k], f"prefixes()[:, {k}] vs incremental")
    keep = torch.arange(BATCH) % 2 == 0
    state = aggregator.update(None, members[:, 0], 0)
    state = select_running_state(state, keep, BATCH, aggregator.per_sample_state, type(aggregator).__name__)
    for k in range(1, num_members):
        state = aggregator.update(state, members[keep, k], k)
    _expect_close(aggregator.value(state), full[keep], "predictions after dropping samples from the state")
    perm = torch.randperm(BATCH)
    _expect_close(aggregator(members[perm]), full[perm], "predictions of a permuted batch")
    members.requires_grad_(True)
    out = aggregator(members)
    if out.requires_grad:
        out.sum().backward()
        _expect(members.grad is not None and bool(members.grad.isfinite().all()), "gradients must be finite")


@_seeded()
def check_loss(loss: LossStrategy) -> None:
    """A scalar, finite, differentiable total and named scalar parts, on a tiny tree ensemble.

    A loss that ``requires`` extras is checked with a registered halting
    policy that provides them.
    """
    _expect(isinstance(loss, LossStrategy), f"{loss!r} is not a LossStrategy")
    ens = _ensemble(loss=loss, halting=_policy_providing(loss.requires)).train()
    target = torch.arange(BATCH) % CLASSES
    result = ens.loss(ens.forward_output(_images()), target)
    _expect(isinstance(result, LossResult), f"the loss returned {type(result).__name__}, not a LossResult")
    _expect_scalar(result.total, "the total loss")
    _expect(result.total.requires_grad, "the total loss must be differentiable (requires_grad)")
    _expect(isinstance(result.parts, dict) and len(result.parts) > 0, "the loss must return named parts")
    for name, part in result.parts.items():
        _expect(isinstance(name, str), f"part name {name!r} is not a string")
        _expect_scalar(part, f"part {name!r}")
    result.total.backward()
    grads = [p.grad for p in ens.parameters() if p.grad is not None]
    _expect(len(grads) > 0, "backward() reached no parameter of the ensemble")
    _expect(all(bool(g.isfinite().all()) for g in grads), "gradients must be finite")


@_seeded()
def check_halting_policy(policy: HaltingPolicy) -> None:
    """Each decision is a bool mask over the samples still running, with batch-first state.

    Checked through [`predict()`][ensemblekit.core.ensemble.Ensemble.predict] on a tiny tree
    ensemble: per sample (a sample uses as many members in a permuted batch
    or a part of it, and in [`stream()`][ensemblekit.core.ensemble.Ensemble.stream], which joins
    samples of several batches), and a training pass adds only batch-first extras. Example options should
    make the decisions deterministic.
    """
    _expect(isinstance(policy, HaltingPolicy), f"{policy!r} is not a HaltingPolicy")
    ens = _ensemble(halting=policy).eval()
    x = _images()
    halted = _predict_recording_steps(ens, x)
    _expect_shape(halted.prediction, (BATCH, CLASSES), "predict().prediction")
    used = halted.members_used
    _expect(bool(((used >= 1) & (used <= ens.num_members)).all()), f"members_used {used.tolist()} out of range")
    for rows in (torch.randperm(BATCH), torch.arange(BATCH // 2)):
        again = _predict_recording_steps(ens, x[rows]).members_used
        _expect(torch.equal(again, used[rows]),
                f"decisions are not per sample: members used {used.tolist()} for the batch, "
                f"{again.tolist()} for its rows {rows.tolist()}")
    streamed = torch.cat([r.members_used for r in ens.stream(x.split([1, BATCH - 1]), batch_size=BATCH // 2 + 1)])
    _expect(torch.equal(streamed, used),
            f"the streaming engine (ens.stream), which joins samples of several batches, gave members used "
            f"{streamed.tolist()} where predict() gave {used.tolist()}: are decisions per sample, and the "
            "policy's per-sample state declared (per_sample_state)?")
    ens.train()
    _expect_batch_first(ens.forward_output(x).extras, BATCH, "training_extras()")


def _predict_recording_steps(ens: Ensemble, x: Tensor) -> Any:
    """``ens.predict(x)``, checking every ``(stop, state)`` its halting policy returns on the way."""
    policy = ens.halting
    original = policy.step

    def step(step: HaltingStep, state: Any) -> tuple[Tensor, Any]:
        stop, new_state = original(step, state)
        n = step.member_logits.shape[0]
        _expect(isinstance(stop, Tensor) and stop.dtype == torch.bool and tuple(stop.shape) == (n,),
                f"step() must return a bool mask of shape [{n}] (the samples still running), got "
                + (f"{stop.dtype} {tuple(stop.shape)}" if isinstance(stop, Tensor) else type(stop).__name__))
        _expect_batch_first(_per_sample(new_state, policy.per_sample_state), n, "the halting state")
        return stop, new_state

    policy.step = step
    try:
        return ens.predict(x)
    finally:
        del policy.step


@_seeded()
def check_splitter(splitter: Any, model: Any = None, num_blocks: int | None = None,
                   example_input: Tensor | None = None) -> None:
    """``None`` for a model it does not handle; for ``model``, a split that reproduces it.

    The blocks then the head must compute ``model(example_input)`` (in eval
    mode), in ``num_blocks`` blocks when that is given. A splitter's
    ``example_options()`` supplies ``model``, ``num_blocks`` and ``example_input``.
    """
    _expect(callable(splitter), f"{splitter!r} is not callable")
    unknown = splitter(object(), num_blocks, None)
    _expect(unknown is None, f"a splitter must return None for a model it does not handle, got {unknown!r}")
    if model is None:
        return
    result = splitter(model, num_blocks, example_input)
    _expect(isinstance(result, BlockSplit), f"the splitter returned {type(result).__name__}, not a BlockSplit")
    if num_blocks is not None:
        _expect(len(result) == num_blocks, f"asked for {num_blocks} blocks, got {len(result)}")
    for module in (model, result.head, *result.blocks):
        if isinstance(module, nn.Module):
            module.eval()
    with torch.no_grad():
        expected = model(example_input) if isinstance(model, nn.Module) else nn.Sequential(*model)(example_input)
        _expect_shape(result.forward(example_input), tuple(expected.shape), "the split's output")
        _expect_close(result.forward(example_input), expected, "the split's output vs the model's")


@_seeded()
def check_executor(executor: Executor) -> None:
    """Computes what the loop computes, on a tiny tree ensemble in eval and in train mode.

    Member logits, parameter gradients and BatchNorm running statistics must
    match those of the ``loop`` executor.
    """
    _expect(isinstance(executor, Executor), f"{executor!r} is not an Executor")
    x, target = _images(), torch.arange(BATCH) % CLASSES
    reference = _ensemble()
    for training in (False, True):
        mode = "train" if training else "eval"
        loop, other = copy.deepcopy(reference).train(training), copy.deepcopy(reference).train(training)
        other.execution = executor
        results = []
        for ens in (loop, other):
            members = ens.forward_members(x)
            F.cross_entropy(members.flatten(0, 1), target.repeat_interleave(members.shape[1])).backward()
            results.append((members.detach(), dict(ens.named_parameters()), dict(ens.named_buffers())))
        (expected, params, buffers), (members, other_params, other_buffers) = results
        _expect_close(members, expected, f"member logits in {mode} mode vs the loop's")
        for key, p in params.items():
            _expect(other_params[key].grad is not None, f"no gradient reached {key} in {mode} mode")
            _expect_close(other_params[key].grad, p.grad, f"gradients of {key} in {mode} mode vs the loop's")
        for key, b in buffers.items():
            _expect_close(other_buffers[key].double(), b.double(), f"buffer {key} in {mode} mode vs the loop's")


@_seeded()
def check_recipe(recipe: Callable[..., Any], backbone: Any = None, **options: Any) -> None:
    """Builds an [`Ensemble`][ensemblekit.core.ensemble.Ensemble] from what a config passes, which predicts.

    The recipe is called as a config calls it: ``recipe(backbone=...,
    init="reinit", halting=None, example_input=..., **options)``.

    Args:
        backbone: a model the recipe accepts (default: a timm ``resnet10t``).
        **options: the recipe's options.
    """
    _expect(callable(recipe), f"{recipe!r} is not callable")
    if backbone is None:
        from ensemblekit.backbones import create_backbone

        backbone = create_backbone("resnet10t", num_classes=CLASSES)
    x = torch.randn(2, 3, 32, 32)
    ens = recipe(backbone=backbone, init="reinit", halting=None, example_input=x[:1], **options)
    _expect(isinstance(ens, Ensemble), f"the recipe returned {type(ens).__name__}, not an Ensemble")
    with torch.no_grad():
        members = ens.eval().forward_members(x)
        _expect_shape(members, (2, ens.num_members, ens.num_classes), "forward_members()")
        _expect_shape(ens(x), (2, ens.num_classes), "the ensemble's prediction")


@_seeded()
def check_schedule(schedule: Callable[..., Any], ensemble: Any = None, **options: Any) -> None:
    """A non-empty list of [`Stage`][ensemblekit.core.stages.Stage] objects, each of which trains.

    The schedule is called as the trainer calls it,
    ``schedule(ensemble=..., settings=..., **options)``, with example settings
    (1 epoch, SGD). Each stage in turn is prepared, its loss installed,
    everything but its trainable parameters frozen and one step taken with
    its optimizer(s) on its members: the loss must be finite, the optimizers
    must hold only trainable parameters, and frozen parameters must not change.

    Args:
        ensemble: an ensemble the schedule is made for (default: a depth-2
            tree with the independent loss).
        **options: the schedule's options.
    """
    from types import SimpleNamespace

    from ensemblekit.core.registry import LOSSES
    from ensemblekit.core.stages import Stage, frozen_except

    _expect(callable(schedule), f"{schedule!r} is not callable")
    ens = ensemble if ensemble is not None else _ensemble(loss=LOSSES.create("independent"))
    settings = SimpleNamespace(epochs=1, batch_size=BATCH, optimizer="sgd", lr=0.01, momentum=0.9, nesterov=False,
                               weight_decay=0.0, schedule="constant", grad_clip=None, seed=0)
    stages = schedule(ensemble=ens, settings=settings, **options)
    _expect(isinstance(stages, list) and len(stages) > 0 and all(isinstance(s, Stage) for s in stages),
            f"the schedule returned {stages!r}, not a non-empty list of Stage objects")
    x, target = _images(), torch.arange(BATCH) % CLASSES
    for stage in stages:
        if stage.prepare is not None:
            stage.prepare(ens)
        if stage.loss is not None:
            ens.loss_strategy = stage.loss
        with frozen_except(ens, stage.trainable) as freeze:
            trainable = {id(p) for p in freeze.parameters}
            _expect(len(trainable) > 0, f"stage {stage.name!r} trains no parameter")
            made = (torch.optim.SGD(freeze.parameters, lr=settings.lr) if stage.optimizer is None
                    else stage.optimizer(freeze.parameters))
            optimizers = [made] if isinstance(made, torch.optim.Optimizer) else list(made)
            _expect(len(optimizers) > 0 and all(isinstance(o, torch.optim.Optimizer) for o in optimizers),
                    f"stage {stage.name!r}: its optimizer factory made {made!r}, not optimizers")
            held = {id(p) for o in optimizers for group in o.param_groups for p in group["params"]}
            _expect(held <= trainable, f"stage {stage.name!r}: its optimizers hold frozen parameters")
            schedulers = [stage.lr_schedule(o, 1) for o in optimizers] if stage.lr_schedule is not None else []
            frozen = {n: p.detach().clone() for n, p in ens.named_parameters() if id(p) not in trainable}
            output = ens.forward_output(x, members=stage.members) if stage.members is not None else \
                ens.forward_output(x)
            result = ens.loss(output, target)
            _expect_scalar(result.total, f"stage {stage.name!r}'s loss")
            _expect(bool(result.total.isfinite()), f"stage {stage.name!r}'s loss is not finite")
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            result.total.backward()
            for o in optimizers:
                o.step()
            for scheduler in schedulers:
                if scheduler is not None:
                    scheduler.step()
            for n, p in ens.named_parameters():
                if n in frozen:
                    _expect(torch.equal(p, frozen[n]), f"stage {stage.name!r} changed the frozen parameter {n}")


def toy_split(num_blocks: int, num_classes: int = CLASSES, channels: int = 3) -> BlockSplit:
    """``num_blocks`` tiny conv blocks on 8x8 images and a pool + linear head.

    Examples:
        >>> len(toy_split(3))
        3
    """
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    blocks = [nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
              for _ in range(num_blocks)]
    return BlockSplit(blocks=blocks, head=head, num_classes=num_classes, feature_index=[None] * num_blocks,
                      feature_format=["NCHW"] * num_blocks, in_chans=channels, example_size=(8, 8))


def _policy_providing(needed: frozenset[str]) -> HaltingPolicy | None:
    """A registered halting policy that provides the extras ``needed`` (None when none are)."""
    if not needed:
        return None
    for entry in HALTING_POLICIES.entries():
        if needed <= getattr(entry.factory, "provides", needed):
            policy = build("halting policy", entry.name)
            if needed <= policy.provides:
                return policy
    raise ConformanceError(f"no registered halting policy provides {sorted(needed)}, which the loss requires")


def _ensemble(loss: LossStrategy | None = None, halting: HaltingPolicy | None = None) -> Ensemble:
    """A depth-2 binary tree (4 members, nested sizes 1, 2, 4) over [`toy_split()`][ensemblekit.testing.toy_split]."""
    return Ensemble(toy_split(3), Tree(depth=2), _mean(), loss=loss, halting=halting)


def _mean() -> Aggregator:
    from ensemblekit.components.aggregators import MeanLogits

    return MeanLogits()


def _images() -> Tensor:
    return torch.randn(BATCH, 3, 8, 8)


def _required_params(factory: Any) -> list[inspect.Parameter]:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ConformanceError(message)


def _expect_shape(value: Any, shape: tuple[int, ...], what: str) -> None:
    _expect(isinstance(value, Tensor), f"{what} must be a tensor, got {type(value).__name__}")
    _expect(tuple(value.shape) == shape, f"{what} has shape {tuple(value.shape)}, expected {shape}")
    _expect(bool(value.isfinite().all()), f"{what} has non-finite values")


def _expect_scalar(value: Any, what: str) -> None:
    _expect(isinstance(value, Tensor) and value.ndim == 0 and value.is_floating_point(),
            f"{what} must be a 0-dim float tensor, got {value!r}")
    _expect(bool(value.isfinite()), f"{what} is not finite: {value.item()}")


def _expect_close(actual: Tensor, expected: Tensor, what: str) -> None:
    if actual.dtype == torch.bool:
        _expect(torch.equal(actual, expected), f"{what} differ")
        return
    _expect(actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    _expect(torch.allclose(actual, expected, rtol=1e-4, atol=1e-5),
            f"{what} differ by up to {(actual - expected).abs().max().item():.3g}")


def _per_sample(state: Any, keys: Any) -> Any:
    """The entries of a running state declared per-sample (all of it when the component declares none)."""
    if keys is None or not isinstance(state, dict):
        return state
    return {k: v for k, v in state.items() if k in keys}


def _expect_batch_first(value: Any, batch: int, what: str) -> None:
    """Every tensor in ``value`` (walking dicts, lists, tuples) is 0-dim or has ``batch`` rows."""
    if isinstance(value, Tensor):
        _expect(value.ndim == 0 or value.shape[0] == batch,
                f"{what} holds a tensor of shape {tuple(value.shape)}; tensors must be batch-first ([{batch}, ...])")
    elif isinstance(value, dict):
        for item in value.values():
            _expect_batch_first(item, batch, what)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _expect_batch_first(item, batch, what)
