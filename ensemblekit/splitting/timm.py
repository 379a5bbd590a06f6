"""Splitting timm models (creating and narrowing them is [`ensemblekit.backbones`][ensemblekit.backbones]'s job).

A timm model is traced with ``torch.fx`` under timm's own tracing rules (its
"notrace" modules stay leaves, its "notrace" functions are wrapped) and cut
after the last operation of each ``feature_info`` module; everything after
the last stage (final norm, pooling, classifier) is the head. See
``docs/timm-families.md`` for the families this was checked on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import get_notrace_functions, get_notrace_modules, to_2tuple
from torch import fx, nn

from ensemblekit._moved import moved_name
from ensemblekit.core.blocks import BlockSplit, FeatureFormat
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
    per_sample_layouts,
    profile_graph,
    trace_modes,
)

__all__ = [
    "fixed_input_size",
    "img_size_attr",
    "input_channels",
    "is_timm_model",
    "model_arch",
    "native_input_size",
    "split_pretrained_cfg",
    "split_timm",
]

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
    if getattr(model, "num_classes", None) == 0:
        raise SplitError(f"{model_arch(model)} was created with num_classes=0 (no classifier: it outputs pooled "
                         "features); create it with the number of classes, e.g. "
                         f"timm.create_model({model_arch(model)!r}, num_classes=10)")
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
                f"{model_arch(model)} can be cut into at most {len(pieces)} blocks (cuts are possible after each of "
                f"its {len(stages)} stages and after sequence elements where one value is passed on); "
                f"asked for {num_blocks}"
            )
        flops = profile_graph(traced, [x], count_flops=True).flops
        ends = balance(_piece_costs(indexes[False], flops, [p.path for p in pieces]), num_blocks)
        groups = [pieces[a:b] for a, b in zip([0, *ends[:-1]], ends)]
    cuts = locate_cuts(indexes, [g[-1].path for g in groups])
    blocks, head = build_blocks(traced, cuts)
    channels = _stage_channels(model, stages)
    features = [_feature(model, indexes[False], position, live, profile,
                         channels[group[-1].stage] if group[-1].natural else None)  # a stage's width: at its end
                for position, live, group in zip(cuts.positions[False], cuts.live[False], groups)]
    size = (int(x.shape[-2]), int(x.shape[-1]))
    fixed = fixed_input_size(model) is not None
    return BlockSplit(
        blocks=blocks,
        head=head,
        num_classes=int(profile.output.shape[-1]),
        feature_index=[f[0] for f in features],
        feature_format=[f[1] for f in features],
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0) or 0),
        names=_names(groups, pieces, [_stem_label(model, indexes[False], stages[0]), *stages[1:]]),
        in_chans=int(x.shape[1]),
        input_size=size if fixed else None,
        example_size=size,
        native_size=native_input_size(model),
        per_sample=per_sample_layouts(indexes[False], profile, cuts.live[False]),
        pretrained_cfg=split_pretrained_cfg(model, int(x.shape[1]), size if fixed else None),
    )


def split_pretrained_cfg(model: nn.Module, in_chans: int, fixed: tuple[int, int] | None) -> dict[str, Any] | None:
    """A copy of the model's ``pretrained_cfg`` whose ``input_size`` is what the model takes.

    timm keeps the config of the architecture's weights; a model created with
    another ``in_chans`` or ``img_size`` takes other inputs. The copy's
    ``input_size`` is ``(in_chans, H, W)`` with the model's own size
    (``native_input_size``), and a ``test_input_size`` made for another
    size is dropped (a model of fixed size takes only that one). Mean, std,
    crop and interpolation are the config's.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict):
        return None
    cfg = dict(cfg)
    size = fixed or native_input_size(model)
    if size is None:
        return cfg
    original = tuple(cfg.get("input_size", (0, 0, 0))[-2:])
    cfg["input_size"] = (in_chans, *size)
    if cfg.get("test_input_size") is not None:
        if fixed is not None:
            cfg["test_input_size"] = cfg["input_size"]
        elif tuple(size) != original:
            del cfg["test_input_size"]
        else:
            cfg["test_input_size"] = (in_chans, *cfg["test_input_size"][-2:])
    return cfg


def model_arch(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def input_channels(model: nn.Module) -> list[int]:
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


def native_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The ``(H, W)`` the model was made for: its ``img_size`` (token models), else its config's ``input_size``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = fixed_input_size(model) or img_size_attr(model) or cfg.get("input_size")
    return None if size is None else (int(size[-2]), int(size[-1]))


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The only input size the model accepts (as far as its config tells), or ``None``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if not cfg.get("fixed_input_size") or getattr(model, "dynamic_img_size", False):
        return None
    size = img_size_attr(model)
    if size is None and "input_size" in cfg:
        size = tuple(int(s) for s in cfg["input_size"][-2:])
    return size


def img_size_attr(model: nn.Module) -> tuple[int, int] | None:
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
            raise SplitError(f"{model_arch(model)} fails on example_input of shape {tuple(example_input.shape)}: "
                             f"{type(err).__name__}: {err}") from err
    cfg = getattr(model, "pretrained_cfg", None) or {}
    sizes: list[tuple[int, int]] = []
    fixed = fixed_input_size(model)
    if fixed is not None:
        sizes.append(fixed)
    sizes.extend((s, s) for s in _TRIAL_SIZES)
    for size in (img_size_attr(model), tuple(cfg.get("input_size", (3, 224, 224))[-2:])):
        if size is not None:
            sizes.append(tuple(size))
    generator = torch.Generator().manual_seed(0)
    errors = []
    for size in dict.fromkeys(sizes):
        for in_chans in input_channels(model):
            x = torch.randn(1, in_chans, *size, generator=generator)
            try:
                return profile_graph(traced, [x]), x
            except Exception as err:  # noqa: BLE001 - the next size may work
                errors.append(f"{(in_chans, *size)}: {type(err).__name__}: {err}")
    raise SplitError(f"{model_arch(model)} ran on none of the input sizes tried ({'; '.join(errors[-2:])}); "
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
        raise SplitError(f"{model_arch(model)}: none of its feature_info modules {[f['module'] for f in info]} "
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
            raise SplitError(f"{model_arch(model)}: no feature map crosses the cut after {last.meta.get(PATH)}; "
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


def __getattr__(name: str) -> Any:
    return moved_name(__name__, name)  # narrow_model and the like, now in ensemblekit.backbones
