"""Cutting a backbone into blocks: [`split()`][ensemblekit.splitting.split] and the splitter registry.

A *splitter* is a callable ``(model, num_blocks, example_input) -> BlockSplit | None``
that returns ``None`` for models it does not handle. [`split()`][ensemblekit.splitting.split] asks the
splitters added with [`register_splitter()`][ensemblekit.splitting.register_splitter] first (in registration order),
then those registered by plugins through the ``register_backbone_splitters``
hook: third-party ones, then the built-in ones (sequences of modules, then
timm models). The first answer wins. A plugin's splitter that fails (raises
anything but [`SplitError`][ensemblekit.errors.SplitError], or returns something other than a
``BlockSplit`` or ``None``) is skipped for that model with a
[`PluginWarning`][ensemblekit.core.registry.PluginWarning] naming the plugin, so a broken
plugin cannot stop the others from splitting.

Examples:
    >>> import timm
    >>> blocks = split(timm.create_model("resnet10t", pretrained=False), 3)
    >>> len(blocks), blocks.feature_format
    (3, ['NCHW', 'NCHW', 'NCHW'])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from ensemblekit._moved import moved_name
from ensemblekit.core.blocks import BlockSplit
from ensemblekit.errors import SplitError
from ensemblekit.splitting.sequential import BlockSequence, split_sequential
from ensemblekit.splitting.timm import split_timm

__all__ = [
    "BlockSequence",
    "SplitError",
    "Splitter",
    "register_splitter",
    "split",
    "split_sequential",
    "split_timm",
    "splitters",
    "unregister_splitter",
]

Splitter = Callable[[Any, int | None, torch.Tensor | None], BlockSplit | None]
"""``(model, num_blocks, example_input) -> BlockSplit | None``."""


_registered: list[Splitter] = []


def register_splitter(fn: Splitter) -> Splitter:
    """Add a splitter at run time, tried before the plugins' (and after those added earlier).

    Registering the same callable twice has no effect. Usable as a decorator.

    Args:
        fn: ``(model, num_blocks, example_input) -> BlockSplit | None``;
            returns ``None`` for models it does not handle and raises
            [`SplitError`][ensemblekit.errors.SplitError] for models it handles but cannot split as asked.

    Returns:
        ``fn`` itself.

    Examples:
        >>> @register_splitter
        ... def my_splitter(model, num_blocks, example_input):
        ...     return None  # not one of mine
        >>> my_splitter in splitters()
        True
        >>> unregister_splitter(my_splitter)
    """
    if fn not in _registered:
        _registered.append(fn)
    return fn


def unregister_splitter(fn: Splitter) -> None:
    """Remove a splitter added by [`register_splitter()`][ensemblekit.splitting.register_splitter] (no effect if
    absent)."""
    if fn in _registered:
        _registered.remove(fn)


def splitters() -> tuple[Splitter, ...]:
    """All splitters in the order [`split()`][ensemblekit.splitting.split] tries them."""
    from ensemblekit.core.registry import SPLITTERS

    return (*_registered, *SPLITTERS.ordered())


def split(model: Any, num_blocks: int | None = None, *, example_input: torch.Tensor | None = None) -> BlockSplit:
    """Cut a backbone into blocks and a head.

    ``head(blocks[-1](...blocks[0](x)))`` equals ``model(x)``. The blocks use
    the model's own modules and parameters; deep-copy them for independent ones.

    Args:
        model: a timm model, an ``nn.Sequential`` or a list of modules (the
            last one is the head), or anything a registered splitter handles.
        num_blocks: how many blocks (default: the model's natural stages, or
            one per element of a sequence); other numbers merge or subdivide
            stages so that the blocks' FLOPs are balanced.
        example_input: an input the model accepts, used to measure shapes and
            FLOPs (default: a small input guessed from the model).

    Returns:
        A [`BlockSplit`][ensemblekit.core.blocks.BlockSplit].

    Raises:
        SplitError: when no splitter handles the model, or it cannot be split as asked.

    Examples:
        >>> from torch import nn
        >>> head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        >>> s = split([nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), head], 1)
        >>> len(s), s.names, s.num_classes
        (1, ['0..1'], 4)
    """
    from ensemblekit.core.registry import SPLITTERS

    for splitter in _registered:
        result = splitter(model, num_blocks, example_input)
        if result is not None:
            return result
    for entry in SPLITTERS.ordered_entries():
        if entry.builtin:
            result = entry.factory(model, num_blocks, example_input)
        else:
            result = _plugin_split(entry, model, num_blocks, example_input)
        if result is not None:
            return result
    raise SplitError(
        f"cannot split {type(model).__name__}: it is neither a timm model nor a sequence of modules, and no "
        "registered splitter handles it; pass an nn.Sequential of blocks or a list of modules "
        "[block0, block1, ..., head] (the last module is the head)"
    )


def _plugin_split(entry: Any, model: Any, num_blocks: int | None, example_input: torch.Tensor | None
                  ) -> BlockSplit | None:
    """What a plugin's splitter answers; ``None`` (with a warning naming the plugin) when it fails."""
    from ensemblekit.core.registry import PluginWarning

    try:
        result = entry.factory(model, num_blocks, example_input)
    except SplitError:  # a model it handles but cannot cut as asked: its message is the answer
        raise
    except Exception as err:  # noqa: BLE001 - a broken plugin must not stop the other splitters
        problem = " ".join(f"raised {type(err).__name__}: {err}".split())
    else:
        if result is None or isinstance(result, BlockSplit):
            return result
        problem = f"returned a {type(result).__name__}, not a BlockSplit or None"
    warnings.warn(f"splitter {entry.name!r} of plugin {entry.plugin!r} {problem}; it is skipped for this "
                  f"{type(model).__name__} and the other splitters are tried", PluginWarning, stacklevel=3)
    return None


def __getattr__(name: str) -> Any:
    if name == "Chain":
        warnings.warn("ensemblekit.splitting.Chain is now BlockSequence (ek.topologies.Chain is the "
                      "multi-exit topology); import BlockSequence", DeprecationWarning, stacklevel=2)
        return BlockSequence
    return moved_name(__name__, name)  # narrow_model and the like, now in ensemblekit.backbones
