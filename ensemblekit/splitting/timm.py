"""Splitting timm models, and building narrower timm models: the library's only timm-specific code.

A timm model is traced with ``torch.fx`` under timm's own tracing rules (its
"notrace" modules stay leaves, its "notrace" functions are wrapped) and cut
after the last operation of each ``feature_info`` module; everything after
the last stage (final norm, pooling, classifier) is the head. See
``docs/timm-families.md`` for the families this was checked on.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules, make_divisible, to_2tuple
from torch import fx, nn

from ensemblekit.blocks import BlockSplit, FeatureFormat
from ensemblekit.splitting.balance import balance
from ensemblekit.splitting.errors import SplitError
from ensemblekit.splitting.graph import (
    PATH,
    GraphIndex,
    PathTracer,
    Profile,
    TracedModel,
    build_blocks,
    locate_cuts,
    profile_graph,
    trace_modes,
)

__all__ = ["WIDTH_ARGS", "narrow_model", "split_timm", "width_arg"]

_TRIAL_SIZES = (32, 64, 96, 128, 160, 192, 224, 256)


def _make_tracer() -> PathTracer:
    return PathTracer(
        leaf_types=[m for m in get_notrace_modules() if isinstance(m, type)],
        autowrap_functions=[f for f in get_notrace_functions() if callable(f)],
    )


def is_timm_model(model: Any) -> bool:
    """Whether ``model`` is a timm classifier (a class defined in timm, with ``feature_info``)."""
    return (isinstance(model, nn.Module)
            and any(c.__module__.startswith("timm.") for c in type(model).__mro__[:-2])
            and isinstance(getattr(model, "feature_info", None), list))


@dataclass
class _Piece:
    """A span of the trunk ending at a candidate cut (a module path)."""

    path: str  # cut after the last operation of this module
    label: str  # readable name of this piece
    stage: int  # index of the natural stage the piece belongs to
    natural: bool  # whether the cut is a natural (stage) cut


def split_timm(model: nn.Module, num_blocks: int | None = None, *,
               example_input: torch.Tensor | None = None) -> BlockSplit | None:
    """Cut a timm model into stage blocks and a head.

    Composing the blocks and the head reproduces ``model(x)`` exactly, in
    eval and in train mode. The blocks share the model's parameters (deep-copy
    them to get independent ones).

    Args:
        model: a model made by ``timm.create_model``.
        num_blocks: how many blocks; ``None`` keeps one per ``feature_info``
            stage, another number merges or subdivides stages so that the
            blocks' FLOPs are balanced.
        example_input: an input the model accepts, used to measure shapes and
            FLOPs (default: a small input the model accepts).

    Returns:
        The split, or ``None`` when ``model`` is not a timm model.

    Raises:
        SplitError: when the model cannot be traced or split as asked.

    Examples:
        >>> import timm
        >>> split = split_timm(timm.create_model("resnet10t", pretrained=False))
        >>> split.names
        ['stem', 'layer1', 'layer2', 'layer3', 'layer4']
    """
    if not is_timm_model(model):
        return None
    if num_blocks is not None and num_blocks < 1:
        raise SplitError(f"num_blocks must be at least 1, got {num_blocks}")
    traced = trace_modes(model, _make_tracer)
    profile, x = _profile(traced, model, example_input)
    indexes = {mode: GraphIndex(g) for mode, g in traced.graphs.items()}
    stages = _stage_cuts(model, indexes)
    if num_blocks is None or num_blocks == len(stages):
        pieces = _pieces(model, indexes, stages, profile, fine=False)
        groups = [[p] for p in pieces]
    else:
        pieces = _pieces(model, indexes, stages, profile, fine=True)
        if num_blocks > len(pieces):
            raise SplitError(
                f"{_arch(model)} can be cut into at most {len(pieces)} blocks (cuts are possible after each of "
                f"its {len(stages)} stages and after sequence elements where one value is passed on); "
                f"asked for {num_blocks}"
            )
        flops = profile_graph(traced, [x], count_flops=True).flops
        ends = balance(_piece_costs(indexes[False], flops, [p.path for p in pieces]), num_blocks)
        groups = [pieces[a:b] for a, b in zip([0, *ends[:-1]], ends)]
    cuts = locate_cuts(indexes, [g[-1].path for g in groups])
    blocks, head = build_blocks(traced, cuts)
    channels = _stage_channels(model, stages)
    features = [_feature(model, indexes[False], position, live, profile, channels[group[-1].stage])
                for position, live, group in zip(cuts.positions[False], cuts.live[False], groups)]
    size = (int(x.shape[-2]), int(x.shape[-1]))
    return BlockSplit(
        blocks=blocks,
        head=head,
        num_classes=int(profile.output.shape[-1]),
        feature_index=[f[0] for f in features],
        feature_format=[f[1] for f in features],
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0) or 0),
        names=_names(groups, pieces, [_stem_label(model, indexes[False], stages[0]), *stages[1:]]),
        in_chans=int(x.shape[1]),
        input_size=size if _fixed_size(model) is not None else None,
        example_size=size,
    )


def _arch(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _in_chans(model: nn.Module) -> list[int]:
    """Likely input channels, most likely first: the first conv's, then the config's.

    They differ when the model was created with another ``in_chans`` or starts
    with a space-to-depth stem (TResNet).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    first = first[0] if isinstance(first, (list, tuple)) and first else first
    convs: list[nn.Module] = []
    if isinstance(first, str):
        try:
            convs.append(model.get_submodule(first))
        except AttributeError:
            pass
    convs.extend(m for m in model.modules() if isinstance(m, nn.Conv2d))
    found = [m.in_channels for m in convs[:1] if isinstance(m, nn.Conv2d)]
    return list(dict.fromkeys([*found, int(cfg.get("input_size", (3,))[0]), 3]))


def _fixed_size(model: nn.Module) -> tuple[int, int] | None:
    """The only input size the model accepts (as far as its config tells), or ``None``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if not cfg.get("fixed_input_size") or getattr(model, "dynamic_img_size", False):
        return None
    size = _img_size_attr(model)
    if size is None and "input_size" in cfg:
        size = tuple(int(s) for s in cfg["input_size"][-2:])
    return size


def _img_size_attr(model: nn.Module) -> tuple[int, int] | None:
    for module in model.modules():
        size = getattr(module, "img_size", None)
        if isinstance(size, int) or (isinstance(size, (tuple, list)) and len(size) == 2):
            return tuple(int(s) for s in to_2tuple(size))
    return None


def _profile(traced: TracedModel, model: nn.Module, example_input: torch.Tensor | None) -> tuple[Profile, torch.Tensor]:
    """Profile the graph on ``example_input``, or on the smallest input size the model accepts."""
    if example_input is not None:
        try:
            return profile_graph(traced, [example_input]), example_input
        except Exception as err:  # noqa: BLE001 - reported with the model's name
            raise SplitError(f"{_arch(model)} fails on example_input of shape {tuple(example_input.shape)}: "
                             f"{type(err).__name__}: {err}") from err
    cfg = getattr(model, "pretrained_cfg", None) or {}
    sizes: list[tuple[int, int]] = []
    fixed = _fixed_size(model)
    if fixed is not None:
        sizes.append(fixed)
    sizes.extend((s, s) for s in _TRIAL_SIZES)
    for size in (_img_size_attr(model), tuple(cfg.get("input_size", (3, 224, 224))[-2:])):
        if size is not None:
            sizes.append(tuple(size))
    generator = torch.Generator().manual_seed(0)
    errors = []
    for size in dict.fromkeys(sizes):
        for in_chans in _in_chans(model):
            x = torch.randn(1, in_chans, *size, generator=generator)
            try:
                return profile_graph(traced, [x]), x
            except Exception as err:  # noqa: BLE001 - the next size may work
                errors.append(f"{(in_chans, *size)}: {type(err).__name__}: {err}")
    raise SplitError(f"{_arch(model)} ran on none of the input sizes tried ({'; '.join(errors[-2:])}); "
                     "pass example_input=")


def _stage_cuts(model: nn.Module, indexes: dict[bool, GraphIndex]) -> list[str]:
    """Module paths of the natural stage ends: ``feature_info`` modules, fixed up where needed."""
    info = model.feature_info
    modules = dict(model.named_modules())

    def usable(path: str) -> bool:
        return bool(path) and path in modules and all(path in ix.module_end for ix in indexes.values())

    paths = [f["module"] for f in info]
    if not all(usable(p) for p in paths):
        container = _stage_container(model, len(info), usable, indexes[False])
        paths = container if container is not None else [p for p in paths if usable(p)]
    if not paths:
        raise SplitError(f"{_arch(model)}: none of its feature_info modules {[f['module'] for f in info]} "
                         "runs in the traced graph; pass an nn.Sequential of blocks or a list of modules instead")
    index = indexes[False]
    by_position = {}
    for path in paths:
        by_position.setdefault(index.module_end[path], path)
    paths = [by_position[p] for p in sorted(by_position)]
    return _move_off_residuals(paths, indexes)


def _stage_container(model: nn.Module, num: int, usable: Callable[[str], bool],
                     index: GraphIndex) -> list[str] | None:
    """Children of the container whose ``num`` children end latest in the graph, if any."""
    best, best_key = None, None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) == num and name:
            children = [f"{name}.{c}" for c in module._modules]
            if all(usable(c) for c in children):
                key = sum(index.module_end[c] for c in children)
                if best_key is None or key > best_key:
                    best, best_key = children, key
    return best


def _move_off_residuals(paths: list[str], indexes: dict[bool, GraphIndex]) -> list[str]:
    """Move a feature tap inside a residual block to the end of that block.

    A tap inside a residual block leaves the skip tensor live as well; the end
    of the nearest enclosing module where no such transient value is live
    passes one tensor on. Values that also cross the next stage's cut (sizes,
    side inputs, parallel streams) are not transient.
    """
    index, train = indexes[False], indexes[True]
    moved = list(paths)
    positions = [index.module_end[p] for p in paths]
    for i, (path, position) in enumerate(zip(paths, positions)):
        last = i + 1 == len(positions)
        persistent = set() if last else set(index.live(position)) & set(index.live(positions[i + 1]))
        target = len(persistent) + 1
        if index.live_count[position] <= target:
            continue
        high = len(index.nodes) - 1 if last else positions[i + 1]
        parts = path.split(".")
        for k in range(len(parts) - 1, 0, -1):
            ancestor = ".".join(parts[:k])
            q = index.module_end.get(ancestor)
            if q is None or ancestor not in train.module_end or q >= high:
                break
            if index.live_count[q] <= target:
                moved[i], positions[i] = ancestor, q
                break
    return moved


def _stage_channels(model: nn.Module, stages: list[str]) -> list[int | None]:
    """``num_chs`` of the ``feature_info`` entry of each stage (matched by module, else by order)."""
    by_module = {f["module"]: f.get("num_chs") for f in model.feature_info}
    if all(s in by_module for s in stages):
        return [by_module[s] for s in stages]
    channels = [f.get("num_chs") for f in model.feature_info]
    if len(channels) == len(stages):
        return channels
    return [by_module.get(s) for s in stages]


def _pieces(model: nn.Module, indexes: dict[bool, GraphIndex], stages: list[str], profile: Profile,
            fine: bool) -> list[_Piece]:
    """Candidate cuts in order: the stage ends, plus (``fine``) the ends of sequence elements.

    An element end is a candidate when no more values cross it than cross
    the stage ends, one of them is a feature map, and train mode agrees.
    """
    index, train = indexes[False], indexes[True]
    stage_pos = [index.module_end[s] for s in stages]
    base = max(1, min(index.live_count[p] for p in stage_pos))
    elements: dict[int, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        for child in module._modules:
            path = f"{name}.{child}" if name else child
            if path not in index.module_end or path not in train.module_end:
                continue
            position = index.module_end[path]
            if position not in elements or path.count(".") < elements[position].count("."):
                elements[position] = path

    def has_feature(position: int) -> bool:
        return any(2 <= len(profile.info[n].shape or ()) <= 4 for n in index.live(position))

    positions = set(stage_pos)
    if fine:
        positions.update(
            p for p, path in elements.items()
            if index.first_compute <= p < stage_pos[-1] and index.live_count[p] <= base
            and train.live_count[train.module_end[path]] == index.live_count[p] and has_feature(p)
        )
    pieces: list[_Piece] = []
    last_train = -1
    for position in sorted(positions):
        stage = next(k for k, s in enumerate(stage_pos) if s >= position)
        natural = position == stage_pos[stage]
        path = stages[stage] if natural else elements[position]
        train_position = train.module_end[path]
        if not natural and not last_train < train_position < train.module_end[stages[stage]]:
            continue  # not in the same order in train mode
        last_train = train_position
        label = elements.get(position, path)
        if not pieces and _stem_label(model, index, stages[0]) != stages[0]:
            label = f"stem+{label}"
        pieces.append(_Piece(path, label, stage, natural))
    return pieces


def _stem_label(model: nn.Module, index: GraphIndex, first: str) -> str:
    """Name of the first stage: "stem", "stem+<module>" or the module path."""
    top = first.split(".")[0]
    others = {n.meta.get(PATH, "").split(".")[0] for n in index.nodes[: index.module_end[first] + 1]
              if n.op not in ("placeholder", "get_attr")} - {top}
    if not others:
        return first
    module = model.get_submodule(first)
    if "." not in first and not isinstance(module, (nn.Sequential, nn.ModuleList)):
        return "stem"
    return f"stem+{first}"


def _piece_costs(index: GraphIndex, flops: dict[fx.Node, int], paths: Sequence[str]) -> list[float]:
    """Eval-mode FLOPs of the nodes between consecutive cuts."""
    prefix = [0]
    for node in index.nodes:
        prefix.append(prefix[-1] + flops.get(node, 0))
    ends = [index.module_end[p] + 1 for p in paths]
    return [float(prefix[b] - prefix[a]) for a, b in zip([0, *ends[:-1]], ends)]


def _names(groups: list[list[_Piece]], pieces: list[_Piece], stage_labels: list[str]) -> list[str]:
    """Readable block names: whole stages by their name, parts of a stage by their modules."""
    per_stage = {stage: sum(p.stage == stage for p in pieces) for stage in range(len(stage_labels))}
    names = []
    for group in groups:
        items: list[str] = []
        for stage in dict.fromkeys(p.stage for p in group):
            in_stage = [p.label for p in group if p.stage == stage]
            items.extend([stage_labels[stage]] if len(in_stage) == per_stage[stage] else in_stage)
        names.append("+".join(items) if len(items) <= 3 else f"{items[0]}..{items[-1]}")
    return names


def _feature(model: nn.Module, index: GraphIndex, position: int, live: list[fx.Node], profile: Profile,
             channels: int | None) -> tuple[int | None, FeatureFormat]:
    """Where the feature map is in the state crossing a cut, and its layout.

    The feature map is the value computed last, else the latest image or
    token map, else the latest flat tensor.
    """
    def rank(node: fx.Node) -> int:
        info = profile.info.get(node)
        return len(info.shape) if info is not None and info.is_tensor else 0

    last = index.nodes[position]
    if last in live and 2 <= rank(last) <= 4:
        feature = last
    else:
        found = [n for n in live if rank(n) in (3, 4)] or [n for n in live if rank(n) == 2]
        if not found:
            raise SplitError(f"{_arch(model)}: no feature map crosses the cut after {last.meta.get(PATH)}; "
                             f"values passed on: {[profile.info[n].type_name for n in live]}")
        feature = found[-1]
    model_fmt = getattr(model, "output_fmt", "NCHW")
    fmt = _format(profile.info[feature].shape, channels, str(getattr(model_fmt, "value", model_fmt)))
    return (None if len(live) == 1 else live.index(feature)), fmt


def _format(shape: tuple[int, ...], channels: int | None, model_fmt: str) -> FeatureFormat:
    if len(shape) == 4:
        if channels is not None and shape[-1] == channels and shape[1] != channels:
            return "NHWC"
        if channels is not None and shape[1] == channels and shape[-1] != channels:
            return "NCHW"
        return "NHWC" if model_fmt == "NHWC" else "NCHW"
    return "NLC" if len(shape) == 3 else "NC"


# --------------------------------------------------------------------------- narrower models

WIDTH_ARGS = ("channels", "embed_dim", "embed_dims", "dims", "widths", "width_factor", "width_mult", "growth_rate")
"""Constructor arguments that set a timm architecture's width, in the order they are looked for."""

_MULTIPLIERS = ("width_factor", "width_mult")


class _Captured(Exception):
    def __init__(self, model_cls: Any, kwargs: dict) -> None:
        super().__init__("captured")
        self.model_cls, self.kwargs = model_cls, kwargs


@contextlib.contextmanager
def _rewriting_builds(rewrite: Callable[[Any, dict], dict]) -> Iterator[None]:
    """Within the block, timm's ``build_model_with_cfg`` passes its keywords through ``rewrite(model_cls, kwargs)``.

    This reaches the model class's own arguments even where a model's
    entrypoint does not let ``create_model`` override them.
    """
    from timm.models import _builder

    original = _builder.build_model_with_cfg

    def build(model_cls, variant, pretrained, *args, **kwargs):
        return original(model_cls, variant, pretrained, *args, **rewrite(model_cls, kwargs))

    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("timm.models") and getattr(m, "build_model_with_cfg", None) is original]
    for module in patched:
        module.build_model_with_cfg = build
    try:
        yield
    finally:
        for module in patched:
            module.build_model_with_cfg = original


def _build_args(arch: str) -> tuple[Any, dict]:
    """The class and keyword arguments ``timm.create_model(arch)`` builds with (nothing is built)."""
    def capture(model_cls: Any, kwargs: dict) -> dict:
        raise _Captured(model_cls, kwargs)

    try:
        with _rewriting_builds(capture):
            timm.create_model(arch, pretrained=False)
    except _Captured as captured:
        return captured.model_cls, captured.kwargs
    raise SplitError(f"{arch} is not built through timm's build_model_with_cfg; cannot find its width argument")


def _signature_defaults(model_cls: Any) -> dict[str, Any]:
    try:
        params = inspect.signature(model_cls).parameters
    except (TypeError, ValueError):
        return {}
    return {n: p.default for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _width_setting(arch: str) -> tuple[str, Any, Any, dict] | None:
    """``(width argument, its value, model class, all constructor settings)`` of an architecture."""
    model_cls, kwargs = _build_args(arch)
    defaults = _signature_defaults(model_cls)
    for arg in WIDTH_ARGS:
        if arg in defaults:
            value = kwargs.get(arg, defaults[arg])
            if isinstance(value, (int, float)) and not isinstance(value, bool) or (
                    isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value)):
                return arg, value, model_cls, {**defaults, **kwargs}
    return None


def width_arg(model: nn.Module | str) -> str | None:
    """The constructor argument that sets this timm architecture's width, if it has one.

    Args:
        model: a timm model or an architecture name.

    Returns:
        One of :data:`WIDTH_ARGS`, or ``None`` when :func:`narrow_model`
        cannot narrow this architecture.

    Examples:
        >>> width_arg("resnet18"), width_arg("convnext_atto")
        ('channels', 'dims')
    """
    setting = _width_setting(model if isinstance(model, str) else _arch(model))
    return None if setting is None else setting[0]


def _scaled(arg: str, value: Any, width: float, settings: dict, granularity: int) -> Any:
    """``value * width``, channel counts rounded so that every attention head gets a multiple of 8 channels.

    ``granularity`` multiplies the rounding step (for architectures with
    grouped convolutions that need coarser channel counts).
    """
    if arg in _MULTIPLIERS:
        return value * width
    if arg == "growth_rate":
        return max(1, round(value * width))
    heads = _heads(settings)
    if isinstance(heads, tuple) and not isinstance(value, (list, tuple)):
        heads = heads[0]  # one width for all stages, heads grow with the channels (Swin)
    per_stage = isinstance(heads, tuple)

    def step(i: int) -> int:
        h = heads[min(i, len(heads) - 1)] if per_stage else heads
        return 8 * granularity * (h or 1)

    if isinstance(value, (list, tuple)):
        return type(value)(make_divisible(v * width, step(i)) for i, v in enumerate(value))
    return make_divisible(value * width, step(0))


def _heads(settings: dict) -> int | tuple[int, ...] | None:
    """Attention heads per stage (or for all), combining every ``*heads*`` setting (TNT has two)."""
    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    heads = [v for k, v in settings.items() if "heads" in k]
    scalars = [v for v in heads if positive_int(v)]
    stages = [tuple(v) for v in heads if isinstance(v, (list, tuple)) and v and all(map(positive_int, v))]
    if stages:
        return tuple(math.lcm(h, *scalars) for h in stages[0])
    return math.lcm(*scalars) if scalars else None


def narrow_model(model: nn.Module | str, width: float, **kwargs: Any) -> nn.Module:
    """The same timm architecture with its channel widths multiplied by ``width``.

    The width argument of the family (``channels`` for ResNets, ``dims`` for
    ConvNeXt, ``embed_dim`` for ViTs, ... see :data:`WIDTH_ARGS`) is scaled;
    channel counts are rounded so that each attention head gets a multiple of
    8 channels (coarser when the architecture needs it). The argument is set
    where timm builds the model class, so it also works for entrypoints that
    fix it themselves. The new model is randomly initialised (``pretrained=False``).

    Args:
        model: a model made by ``timm.create_model`` (its ``num_classes``,
            fixed image size and input channels, when 1 to 4, are kept) or an
            architecture name.
        width: width multiplier, e.g. ``1 / 1.5``.
        **kwargs: more arguments for ``timm.create_model`` (override the kept ones).

    Returns:
        A new timm model.

    Raises:
        SplitError: when the architecture has no width argument (the message
            lists the arguments that are supported) or cannot be built narrower.

    Examples:
        >>> import timm
        >>> narrow = narrow_model(timm.create_model("resnet10t", pretrained=False, num_classes=10), 0.5)
        >>> narrow.feature_info[-1]["num_chs"], narrow.num_classes
        (256, 10)
    """
    arch = model if isinstance(model, str) else _arch(model)
    if not timm.is_model(arch):
        raise SplitError(f"{arch!r} is not a timm architecture; narrow_model needs a model from timm.create_model")
    setting = _width_setting(arch)
    if setting is None:
        raise SplitError(
            f"{arch} has no width argument; narrow_model supports timm families whose constructor takes one of "
            f"{', '.join(WIDTH_ARGS)} (ResNet, ConvNeXt, ViT, Swin, DenseNet, EfficientViT, ... "
            "see docs/timm-families.md)"
        )
    arg, value, model_cls, settings = setting
    keep: dict[str, Any] = {}
    if isinstance(model, nn.Module):
        keep["num_classes"] = model.num_classes
        if "in_chans" in settings and _in_chans(model)[0] <= 4:  # more: a space-to-depth stem, not the input
            keep["in_chans"] = _in_chans(model)[0]
        size = _img_size_attr(model)
        if "img_size" in settings and size is not None:
            keep["img_size"] = size
    keep.update(kwargs)
    value = keep.pop(arg, value)
    keep["pretrained"] = keep.get("pretrained", False)
    errors = []
    for granularity in (1, 2, 4):
        scaled = _scaled(arg, value, width, {**settings, **keep}, granularity)
        if width < 1 <= _total(scaled) / _total(value):
            break  # rounding undoes the narrowing

        def rewrite(cls: Any, build_kwargs: dict, scaled: Any = scaled) -> dict:
            return {**build_kwargs, arg: scaled} if cls is model_cls else build_kwargs

        try:
            with _rewriting_builds(rewrite):
                _check_on_meta(arch, keep)
                return timm.create_model(arch, **keep)
        except (ValueError, AssertionError, RuntimeError, TypeError) as err:
            errors.append(f"{arg}={scaled}: {type(err).__name__}: {err}")
            if arg in _MULTIPLIERS or arg == "growth_rate":
                break
    raise SplitError(f"cannot build {arch} with a narrower {arg} ({'; '.join(errors) or 'rounding gives its width'})")


def _total(value: Any) -> float:
    return float(sum(value)) if isinstance(value, (list, tuple)) else float(value)


def _check_on_meta(arch: str, kwargs: dict) -> None:
    """Build the model on the meta device and run it once: shape errors surface without any compute.

    Models that cannot be built or run on the meta device are not checked.
    """
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, **kwargs)
    except Exception:  # noqa: BLE001 - not buildable on meta: the real build will tell
        return
    size = _fixed_size(model) or tuple((model.pretrained_cfg or {}).get("input_size", (3, 224, 224))[-2:])
    x = torch.empty(1, _in_chans(model)[0] if _in_chans(model)[0] <= 4 else 3, *size, device="meta")
    try:
        with torch.no_grad():
            model.eval()(x)
    except NotImplementedError:
        return


class UnknownBackboneError(ValueError):
    """A name that is not a timm model; the message lists close matches."""


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """The timm model ``name``, never with pretrained weights (nothing is downloaded).

    Args:
        name: a timm model name, e.g. "resnet18".
        **kwargs: keywords of ``timm.create_model`` (``num_classes``, ``in_chans``, widths).

    Raises:
        UnknownBackboneError: ``name`` is not a timm model (close names are suggested).

    Examples:
        >>> create_backbone("resnet10t", num_classes=3).num_classes
        3
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownBackboneError(f"unknown timm model {name!r}{hint}")
    return timm.create_model(name, pretrained=False, **kwargs)
