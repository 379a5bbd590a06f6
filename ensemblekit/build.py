"""``wrap()``: one construction path from a backbone to an [`Ensemble`][ensemblekit.core.ensemble.Ensemble].

``wrap()`` and the recipes (`recorded_recipe()`) record how they built an
ensemble as JSON (``ensemble.build_spec``), and `component_spec()` describes
its components, so that [`ensemblekit.save()`][ensemblekit.training.checkpoint.save] can store it and
[`ensemblekit.load()`][ensemblekit.training.checkpoint.load] build it again
([`ensemblekit.training.checkpoint`][ensemblekit.training.checkpoint]).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ensemblekit.core.blocks import BlockSplit
from ensemblekit.core.ensemble import Ensemble
from ensemblekit.core.graph import NodeGraph
from ensemblekit.core.heads import ExitHead, replace_classifier
from ensemblekit.core.initialisation import InitWarning
from ensemblekit.core.registry import (
    AGGREGATORS,
    EXECUTORS,
    HALTING_POLICIES,
    LOSSES,
    RECIPES,
    TOPOLOGIES,
    Registry,
)
from ensemblekit.errors import EnsembleKitError, InvalidTypeError, InvalidValueError

__all__ = [
    "BUILT_ATTR",
    "COMPONENT_KINDS",
    "SPEC_ATTR",
    "BuildSpecError",
    "EnsembleTooLargeError",
    "built_components",
    "check_fits",
    "component_spec",
    "components",
    "from_json",
    "record_build",
    "record_preparation",
    "recorded_recipe",
    "registry_of",
    "to_json",
    "wrap",
]

RECIPES.result = Ensemble  # what a recipe must return: checked by RECIPES.create (the registry cannot import it)


def wrap(
    model: nn.Module | BlockSplit | list[nn.Module],
    topology: Any = "tree",
    *,
    aggregator: Any = "mean",
    loss: Any = "independent",
    halting: Any = None,
    num_classes: int | None = None,
    num_blocks: int | None = None,
    init: str | dict = "auto",
    exit_head: Any = ExitHead,
    execution: Any = "loop",
    example_input: Tensor | None = None,
    node_modules: dict[int, nn.Module] | None = None,
    head_modules: dict[int, nn.Module] | None = None,
    **topology_options: Any,
) -> Ensemble:
    """Turn a backbone into an adaptive ensemble.

    Every component argument takes a registered name, a mapping
    ``{"name": ..., **options}`` or a ready object.

    Args:
        model: a timm model, an ``nn.Sequential``/list of modules (last one is
            the head), or a ready [`BlockSplit`][ensemblekit.core.blocks.BlockSplit].
        topology: "tree", "independent", "multi_branch", "chain", "cascade", ...
        aggregator: "mean" (of logits, HNE's choice), "mean_probs", "vote", "weighted".
        loss: the training objective used by ``ensemble.loss``.
        halting: the per-sample stopping policy used by ``ensemble.predict``.
        num_classes: replace the backbone's classifier with one of this size.
        num_blocks: blocks to cut the backbone into (default: what the
            topology needs, e.g. ``depth + 1`` for a tree, else the natural stages).
        init: where each member starts (``docs/concepts.md``, "Initialisation"):
            "reinit" (every copy an independent draw of the backbone's own
            initialisation), "pretrained" (every copy from the given weights,
            each member's classifier drawn anew), "pretrained+noise" (those
            plus noise, ``{"name": "pretrained+noise", "scale": 0.01}``),
            "copy" (identical copies) or "auto": "pretrained" for a backbone
            made by ``create_backbone(..., pretrained=True)`` or whose weights
            are trained, else "reinit".
        exit_head: factory for early-exit heads of a chain.
        execution: how the nodes of a level run: "loop", "loop_nhwc", "vmap",
            "grouped", "grouped_nhwc", "auto" (see [`ensemblekit.execution`][ensemblekit.execution])
            or an [`Executor`][ensemblekit.core.interfaces.Executor].
        example_input: an input the backbone accepts, used when splitting.
        node_modules: node index -> module used as that node instead of a
            copy of the backbone's block (EnsembleNet's narrow branches); used
            as given, neither copied nor re-initialised.
        head_modules: member index -> module used as that member's head
            instead of a copy of the backbone's head; used as given.
        **topology_options: options of a topology given by name (``depth=4``).

    Returns:
        An [`Ensemble`][ensemblekit.core.ensemble.Ensemble].

    Examples:
        >>> import timm, torch, ensemblekit as ek
        >>> ens = ek.wrap(timm.create_model("resnet10t", num_classes=10), topology="tree", depth=2)
        >>> ens.num_members
        4
        >>> ens(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    _check_arguments(num_classes, num_blocks, exit_head, example_input)
    build, problems = _wrap_record(model, num_classes, num_blocks, init, exit_head, example_input,
                                   bool(node_modules or head_modules))
    topo = TOPOLOGIES.create(topology, **topology_options)
    split = _split(model, num_blocks or topo.num_blocks, example_input, topo)
    if num_classes is not None and num_classes != split.num_classes:  # a new split: the caller's stays as it is
        split = dataclasses.replace(split, head=replace_classifier(copy.deepcopy(split.head), split.num_classes,
                                                                   num_classes), num_classes=num_classes)
    split, init = _with_backbone_init(model, split, init)
    graph = topo.build(len(split))
    check_fits(split, graph, topo)
    context = {"num_members": graph.num_members}
    _created("topology", topology, topo, topology_options)
    agg = _created("aggregator", aggregator, AGGREGATORS.create(aggregator, context=context))
    loss_strategy = None if loss is None else _created("loss", loss, LOSSES.create(loss))
    policy = None if halting is None else _created("halting", halting,
                                                   HALTING_POLICIES.create(halting, context=context))
    ensemble = Ensemble(split, topo, agg, loss=loss_strategy, halting=policy, init=init, exit_head=exit_head,
                        execution=EXECUTORS.create(execution), node_modules=node_modules, head_modules=head_modules)
    return record_build(ensemble, build, problems)


class EnsembleTooLargeError(EnsembleKitError, ValueError):
    """The ensemble's weights alone would not fit in the memory of the device they are on."""


def check_fits(split: BlockSplit, graph: NodeGraph, topology: Any) -> None:
    """Refuse, before building, an ensemble whose weights alone exceed the memory of their device.

    Counts one copy of block ``b``'s parameters per node of level ``b`` and one head per member,
    at the blocks' element size; against the free GPU memory (CUDA) or the machine's physical memory.
    Training needs several times more (gradients, optimizer state, activations): this guard only
    catches what cannot work at all, such as ``tree(depth=3, branching=40)`` (64,000 members).
    """
    sizes = [sum(p.numel() * p.element_size() for p in block.parameters()) for block in split.blocks]
    head = sum(p.numel() * p.element_size() for p in split.head.parameters())
    total = sum(sizes[node.block] for node in graph.nodes) + head * graph.num_members
    device = next((p.device for b in split.blocks for p in b.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        available, where = torch.cuda.mem_get_info(device)[0], f"the free memory of {device}"
    else:
        available, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    if total > available:
        raise EnsembleTooLargeError(
            f"{topology!r} has {graph.num_members:,} members and {graph.num_nodes:,} block copies: their weights "
            f"alone take {total / 2**30:,.1f} GiB, more than {where} ({available / 2**30:,.1f} GiB); "
            "choose a smaller depth or branching")


def _with_backbone_init(model: Any, split: BlockSplit, init: Any) -> tuple[BlockSplit, Any]:
    """``split`` drawing fresh copies from a timm backbone's own init, and ``init`` with "auto" decided if declared."""
    from ensemblekit.backbones.spec import backbone_spec, declared_pretrained, draw_split, with_fresh_classifier
    from ensemblekit.splitting.timm import is_timm_model, model_arch

    if isinstance(model, BlockSplit) or not isinstance(model, nn.Module):
        return split, init
    spec = backbone_spec(model)
    if spec is None and is_timm_model(model) and init != "copy":
        warnings.warn(f"{model_arch(model)} cannot be rebuilt from its config (timm.create_model with its "
                      "num_classes gives other parameter shapes), so its copies are drawn by PyTorch's "
                      "reset_parameters instead of timm's initialisation; create it with "
                      "ensemblekit.backbones.create_backbone(name, **kwargs), which records its arguments",
                      InitWarning, stacklevel=3)
    if spec is not None:
        if split.num_classes != spec["kwargs"]["num_classes"]:  # the new classifier: drawn by the backbone's rule
            spec = {**spec, "kwargs": {**spec["kwargs"], "num_classes": split.num_classes}}
            split = with_fresh_classifier(split, spec)
        split = dataclasses.replace(split, fresh=functools.partial(draw_split, split, spec))
    declared = declared_pretrained(model)
    if init == "auto" and declared is not None:
        init = "pretrained" if declared else "reinit"
    return split, init


def _check_arguments(num_classes: Any, num_blocks: Any, exit_head: Any, example_input: Any) -> None:
    for name, value, minimum in (("num_classes", num_classes, 1), ("num_blocks", num_blocks, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise InvalidValueError(f"{name} must be an integer >= {minimum} or None, got {value!r}")
    if not callable(exit_head):
        raise InvalidTypeError("exit_head must be a callable (in_features, num_classes, fmt, num_prefix_tokens) -> "
                               f"module, got {exit_head!r}")
    if example_input is not None and not isinstance(example_input, Tensor):
        raise InvalidTypeError("example_input must be a tensor the backbone accepts, got "
                               f"{type(example_input).__name__}")


def _split(model: Any, num_blocks: int | None, example_input: Tensor | None, topology: Any) -> BlockSplit:
    from ensemblekit.splitting import SplitError, split

    if isinstance(model, BlockSplit):
        if num_blocks is not None and num_blocks != len(model):
            raise InvalidValueError(f"topology {topology!r} needs {num_blocks} blocks but the given split has "
                                    f"{len(model)}")
        return model
    try:
        return split(model, num_blocks, example_input=example_input)
    except SplitError as err:
        if num_blocks is None:
            raise
        raise SplitError(f"topology {topology!r} needs the backbone in {num_blocks} blocks: {err}") from err


# ------------------------------------------------------------- build records
# What ``ek.save`` stores to rebuild an ensemble (`ensemblekit.training.checkpoint`): ``wrap()`` and the
# recipes record their arguments as JSON on the ensemble (``ensemble.build_spec``); components are described
# when saving, from the spec they were created from by name or from their constructor parameters.

SPEC_ATTR = "_ensemblekit_spec"
"""Attribute holding the ``{"name": ..., **options}`` spec a component was created from by name."""
BUILT_ATTR = "_ensemblekit_built"
"""Attribute of an ensemble holding the components its build made (those a replay of the build makes again)."""
COMPONENT_KINDS = ("topology", "aggregator", "loss", "halting", "execution")
"""The roles of the components of an ensemble, as the ``kind`` of `component_spec()`."""


class BuildSpecError(EnsembleKitError, ValueError):
    """An ensemble or component that cannot be described as JSON (so ``ek.save`` cannot store it); says what to do."""


def registry_of(kind: str) -> Registry:
    """The registry of a component role ("topology", "aggregator", "loss", "halting", "execution")."""
    return {"topology": TOPOLOGIES, "aggregator": AGGREGATORS, "loss": LOSSES, "halting": HALTING_POLICIES,
            "execution": EXECUTORS}[kind]


def components(ensemble: Ensemble) -> dict[str, Any]:
    """The ensemble's components by role (the executor as ``execution``)."""
    return {"topology": ensemble.topology, "aggregator": ensemble.aggregator, "loss": ensemble.loss_strategy,
            "halting": ensemble.halting, "execution": ensemble.executor}


def _created(kind: str, given: Any, obj: Any, options: dict[str, Any] | None = None) -> Any:
    """``obj``, made by the registry from ``given``; keep ``given`` as its spec when it was a name or a mapping."""
    if isinstance(given, str):
        given = {"name": given}
    if isinstance(given, dict) and obj is not None:
        try:
            vars(obj)[SPEC_ATTR] = to_json({**given, **(options or {})}, f"the {kind} spec")
        except BuildSpecError:
            pass  # not JSON: described from its attributes when saved
    return obj


def component_spec(obj: Any, kind: str) -> dict[str, Any] | None:
    """``{"name": ..., **options}`` that rebuilds ``obj`` through the ``kind`` registry (JSON, see `to_json()`).

    The spec it was created from by name is kept. An object given ready made is
    described by its registered name and its options: ``build_options()`` when it
    defines one, else each constructor parameter read from the attribute of the
    same name (or ``_name``); a parameter with no such attribute is left at its
    default when that default is ``None`` (an option not given). An executor is
    described by its name and public attributes (its constructor arguments).

    Raises:
        BuildSpecError: the object's class is not registered, an option cannot
            be read back or is not JSON, or the options do not rebuild it.
    """
    if obj is None:
        return None
    kept = vars(obj).get(SPEC_ATTR) if hasattr(obj, "__dict__") else None
    if kept is not None:
        return kept
    what = f"{kind} {type(obj).__name__}"
    registry = registry_of(kind)
    if kind == "execution":
        return {"name": obj.name, **to_json(obj.__getstate__(), what)}
    names = [e.name for e in registry.entries() if e.factory is type(obj)]
    if not names:
        raise BuildSpecError(f"{what} is not registered under a name, so a checkpoint cannot name it: register it "
                             f"through a plugin (docs/plugins.md), then save again")
    options = obj.build_options() if callable(getattr(obj, "build_options", None)) else _read_options(obj, what)
    spec = {"name": names[0], **to_json(options, what)}
    try:
        with torch.random.fork_rng(devices=[]):
            rebuilt = registry.create(from_json(spec), context=_context(kind))
    except Exception as err:  # noqa: BLE001 - any failure to rebuild is reported the same way
        raise BuildSpecError(f"{what}: the options read back from it ({spec}) do not rebuild it "
                             f"({type(err).__name__}: {err}); give it by name or mapping instead, e.g. "
                             f"{kind}={{'name': {names[0]!r}, ...}}") from None
    if type(rebuilt) is not type(obj):
        raise BuildSpecError(f"{what}: its name {names[0]!r} builds a {type(rebuilt).__name__}")
    return spec


def _context(kind: str) -> dict[str, Any]:
    return {"num_members": 2} if kind in ("aggregator", "halting") else {}


def _read_options(obj: Any, what: str) -> dict[str, Any]:
    """Constructor options of ``obj`` read back from its same-named attributes."""
    options = {}
    for p in list(inspect.signature(type(obj)).parameters.values()):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "num_members":  # num_members: from the ensemble
            continue
        found = [vars(obj)[n] for n in (p.name, f"_{p.name}") if n in vars(obj)]
        found += [obj._buffers[n] for n in (p.name, f"_{p.name}") if isinstance(obj, nn.Module) and n in obj._buffers]
        found = [v for v in found if not isinstance(v, nn.Module) and not callable(v)]
        if found:
            options[p.name] = found[0]
        elif p.default is not None:
            raise BuildSpecError(
                f"{what} was given as an object and its option {p.name!r} is not kept in an attribute of that name, "
                f"so it cannot be read back; give it by name or mapping instead ({{'name': ..., {p.name!r}: ...}}), "
                f"or define build_options() returning its constructor options")
    return options


def to_json(value: Any, what: str) -> Any:
    """``value`` as JSON data; non-finite floats become ``{"$float": "inf"}``, tensors lists (or shapes).

    A tensor becomes the list of its values, except ``example_input`` (a
    recipe's option), which becomes ``{"$zeros": shape}``.

    Raises:
        BuildSpecError: something else (a module, a function) that JSON cannot hold.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, Tensor):
        return to_json(value.tolist(), what)
    if isinstance(value, (list, tuple)):
        return [to_json(v, what) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) and not k.startswith("$") for k in value):
        return {k: ({"$zeros": list(v.shape)} if k == "example_input" and isinstance(v, Tensor) else to_json(v, what))
                for k, v in value.items()}
    kind = next((k for k in COMPONENT_KINDS if isinstance(value, registry_of(k).base or ())), None)
    if kind is not None:
        return component_spec(value, kind)
    raise BuildSpecError(f"{what} holds {value!r}, which cannot be written as JSON")


def from_json(value: Any) -> Any:
    """The inverse of `to_json()`: ``{"$float": ...}`` a float, ``{"$zeros": shape}`` a zero tensor."""
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"$float"}:
            return float(value["$float"])
        if set(value) == {"$zeros"}:
            return torch.zeros(value["$zeros"])
        return {k: from_json(v) for k, v in value.items()}
    return value


def record_build(ensemble: Ensemble, build: dict[str, Any], problems: list[str]) -> Ensemble:
    """Set ``ensemble.build_spec``: how it was built (``build``), no preparations yet, and what cannot be saved."""
    vars(ensemble)["build_spec"] = {**build, "preparations": [], "unsaveable": problems}
    vars(ensemble)[BUILT_ATTR] = components(ensemble)
    return ensemble


def built_components(ensemble: Ensemble) -> dict[str, Any]:
    """The components the recorded build made (``{}`` for an ensemble built without a record)."""
    return vars(ensemble).get(BUILT_ATTR, {})


def record_preparation(ensemble: Any, name: str, **options: Any) -> None:
    """Record a change made to a built ensemble (ISC heads, gradient equilibrium) so that loading replays it."""
    spec = getattr(ensemble, "build_spec", None)
    if isinstance(spec, dict):
        spec["preparations"].append({"name": name, **to_json(options, f"preparation {name!r}")})


def _wrap_record(model: Any, num_classes: int | None, num_blocks: int | None, init: Any, exit_head: Any,
                 example_input: Tensor | None, overrides: bool) -> tuple[dict[str, Any], list[str]]:
    """What replays this [`wrap()`][ensemblekit.build.wrap] call (components apart), and why it cannot be saved
    (if so)."""
    from ensemblekit.backbones import backbone_spec

    problems = []
    spec = backbone_spec(model) if isinstance(model, nn.Module) and not isinstance(model, BlockSplit) else None
    if spec is None:
        problems.append(f"its backbone ({type(model).__name__}) is not a timm model, so JSON cannot rebuild it: "
                        "build the ensemble from a timm model (timm.create_model or ensemblekit's "
                        "create_backbone), or keep your code that builds it and save only the weights "
                        "(safetensors.torch.save_model(ensemble, path), then load_model into a fresh build)")
    if exit_head is not ExitHead:
        problems.append(f"its exit_head {exit_head!r} is a custom factory, which JSON cannot name: save the weights "
                        "only and rebuild it with your code")
    if overrides:
        problems.append("it was given node_modules or head_modules, which JSON cannot describe: build it with a "
                        "recipe (ek.recipes.ensemblenet records itself), or save the weights only")
    try:
        init = to_json(init, "init")
    except BuildSpecError as err:
        problems.append(str(err))
    shape = None if example_input is None else list(example_input.shape)
    build = {"wrap": {"backbone": spec, "num_classes": num_classes, "num_blocks": num_blocks, "init": init,
                      "example_input": shape}}
    return build, problems


def recorded_recipe(recipe: Callable[..., Ensemble]) -> Callable[..., Ensemble]:
    """Make ``recipe`` record its name and arguments as the ensemble's ``build_spec`` (so ``ek.save`` can store it).

    The recipe is registered under its function name; a checkpoint rebuilds
    the ensemble by calling it again with the recorded arguments.
    """
    signature = inspect.signature(recipe)
    first = next(iter(signature.parameters))

    @functools.wraps(recipe)
    def build(*args: Any, **kwargs: Any) -> Ensemble:
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        for p in signature.parameters.values():
            if p.kind is p.VAR_KEYWORD:
                arguments.update(arguments.pop(p.name, {}))
        backbone = arguments.pop(first)
        problems = []
        if isinstance(backbone, str):
            spec: Any = backbone
        else:
            from ensemblekit.backbones import backbone_spec

            spec = backbone_spec(backbone) if isinstance(backbone, nn.Module) else None
            if spec is None:
                problems.append(f"its backbone ({type(backbone).__name__}) is not a timm model, so JSON cannot "
                                "rebuild it: build it from a timm model, or save the weights only")
        try:
            options = to_json(arguments, f"the options of recipe {recipe.__name__}")
        except BuildSpecError as err:
            options = {}
            problems.append(str(err))
        ensemble = recipe(*args, **kwargs)
        record = {"recipe": {"name": recipe.__name__, "backbone": spec, "options": options}}
        return record_build(ensemble, record, problems)

    return build
