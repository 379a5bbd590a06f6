"""Narrower copies of a timm architecture (EnsembleNet's light branches)."""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import timm
import torch
from timm.layers import make_divisible
from torch import nn

from ensemblekit.errors import EnsembleKitError
from ensemblekit.splitting.errors import SplitError
from ensemblekit.splitting.timm import fixed_input_size, img_size_attr, input_channels, model_arch

__all__ = ["WIDTH_ARGS", "narrow_model", "width_arg"]


WIDTH_ARGS = ("channels", "embed_dim", "embed_dims", "dims", "widths", "width_factor", "width_mult", "growth_rate")
"""Constructor arguments that set a timm architecture's width, in the order they are looked for."""

_MULTIPLIERS = ("width_factor", "width_mult")


class _Captured(EnsembleKitError):
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
        One of [`WIDTH_ARGS`][ensemblekit.backbones.narrow.WIDTH_ARGS], or ``None`` when
        [`narrow_model()`][ensemblekit.backbones.narrow.narrow_model] cannot narrow this architecture.

    Examples:
        >>> width_arg("resnet18"), width_arg("convnext_atto")
        ('channels', 'dims')
    """
    setting = _width_setting(model if isinstance(model, str) else model_arch(model))
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
    ConvNeXt, ``embed_dim`` for ViTs, ... see [`WIDTH_ARGS`][ensemblekit.backbones.narrow.WIDTH_ARGS]) is scaled;
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
    arch = model if isinstance(model, str) else model_arch(model)
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
        if "in_chans" in settings and input_channels(model)[0] <= 4:  # more: a space-to-depth stem, not the input
            keep["in_chans"] = input_channels(model)[0]
        size = img_size_attr(model)
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
    size = fixed_input_size(model) or tuple((model.pretrained_cfg or {}).get("input_size", (3, 224, 224))[-2:])
    x = torch.empty(1, input_channels(model)[0] if input_channels(model)[0] <= 4 else 3, *size, device="meta")
    try:
        with torch.no_grad():
            model.eval()(x)
    except NotImplementedError:
        return


