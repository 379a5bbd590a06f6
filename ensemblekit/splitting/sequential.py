"""Splitting a model given as an ordered list of modules: ``[block0, ..., head]``."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ensemblekit.core.batching import StateLayout
from ensemblekit.core.blocks import BlockSplit, FeatureFormat, State, call_block
from ensemblekit.core.flops import count_flops
from ensemblekit.splitting.balance import balance
from ensemblekit.splitting.errors import SplitError
from ensemblekit.splitting.graph import training_mode

__all__ = ["BlockSequence", "split_sequential"]

_FORMATS: dict[int, FeatureFormat] = {4: "NCHW", 3: "NLC", 2: "NC"}


class BlockSequence(nn.Sequential):
    """An ``nn.Sequential`` whose elements may pass tuple states.

    A tuple returned by one element is unpacked into the arguments of the
    next (as [`call_block()`][ensemblekit.core.blocks.call_block] does), so a sequence
    of blocks is itself a block. (Formerly ``Chain``, a name that stays
    importable with a ``DeprecationWarning``; the multi-exit topology is
    [`ensemblekit.components.topologies.Chain`][ensemblekit.components.topologies.Chain].)

    Examples:
        >>> seq = BlockSequence(nn.Linear(2, 3), nn.ReLU())
        >>> seq(torch.zeros(1, 2)).shape
        torch.Size([1, 3])
    """

    def forward(self, *state: Any) -> State:
        value: State = state[0] if len(state) == 1 else state
        for module in self:
            value = call_block(module, value)
        return value


def _modules_of(model: Any) -> list[tuple[str, nn.Module]] | None:
    """``(name, module)`` of each element, or ``None`` when ``model`` is not a sequence of modules."""
    if isinstance(model, (nn.Sequential, nn.ModuleList)):
        return list(model._modules.items())
    if isinstance(model, (list, tuple)) and model and all(isinstance(m, nn.Module) for m in model):
        return [(str(i), m) for i, m in enumerate(model)]
    return None


def _guess_input(first: nn.Module) -> torch.Tensor:
    """A small input for the first module that has a known input layout."""
    for module in first.modules():
        if isinstance(module, nn.Conv2d):
            return torch.randn(1, module.in_channels, 32, 32, generator=torch.Generator().manual_seed(0))
        if isinstance(module, nn.Conv1d):
            return torch.randn(1, module.in_channels, 32, generator=torch.Generator().manual_seed(0))
        if isinstance(module, nn.Linear):
            return torch.randn(1, module.in_features, generator=torch.Generator().manual_seed(0))
    raise SplitError(
        f"cannot guess an input for {type(first).__name__} (no Conv2d, Conv1d or Linear in it); pass example_input="
    )


def _pieces(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The named modules with every nested ``nn.Sequential`` opened up, in execution order."""
    out: list[tuple[str, nn.Module]] = []
    for name, module in named:
        if isinstance(module, nn.Sequential) and len(module) > 0:
            out.extend(_pieces([(f"{name}.{k}", m) for k, m in module._modules.items()]))
        else:
            out.append((name, module))
    return out


def _run(modules: list[nn.Module], x: torch.Tensor, flops: bool = False) -> tuple[list[int], list[State]]:
    """Output (and, if asked, FLOPs) of each module, applied in order to ``x``."""
    counts, states = [], []
    state: State = x
    for module in modules:
        if flops:
            counts.append(count_flops(lambda m=module, s=state: call_block(m, s)))
        with torch.no_grad():
            state = call_block(module, state)
        states.append(state)
    return counts, states


def _feature(state: State, block: int) -> tuple[int | None, FeatureFormat]:
    """Where the feature map is in a block's output (the highest-rank tensor of a tuple) and its format."""
    if isinstance(state, tuple):
        ranks = [v.dim() if isinstance(v, torch.Tensor) and v.dim() in _FORMATS else 0 for v in state]
        index = max(range(len(state)), key=lambda i: (ranks[i], -i)) if any(ranks) else None
        if index is None:
            raise SplitError(f"block {block} returns a tuple without a 2D, 3D or 4D tensor")
        return index, _FORMATS[state[index].dim()]
    if not isinstance(state, torch.Tensor) or state.dim() not in _FORMATS:
        shape = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
        raise SplitError(f"block {block} returns {shape}; blocks must return 2D (NC), 3D (NLC) or 4D (NCHW) tensors")
    return None, _FORMATS[state.dim()]


def _per_sample(blocks: list[nn.Module], x: torch.Tensor, states: list[State]) -> list[StateLayout]:
    """Which values of each block's output are per-sample: those whose first dimension follows the batch.

    Tuple states are checked by running the blocks again on one more sample:
    a value is per-sample when it has ``B`` rows for ``B`` samples and
    ``B + 1`` rows for ``B + 1`` (a side input has the same size for both).
    """
    if not any(isinstance(s, tuple) for s in states):
        return [True] * len(states)
    _, more = _run(blocks, torch.cat([x, x[:1]]))

    def rows(value: Any, n: int) -> bool:
        return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n

    b = x.shape[0]
    return [tuple(rows(v, b) and rows(w, b + 1) for v, w in zip(s, m)) if isinstance(s, tuple) else True
            for s, m in zip(states, more)]


def split_sequential(model: Any, num_blocks: int | None = None, *,
                     example_input: torch.Tensor | None = None) -> BlockSplit | None:
    """Split an ``nn.Sequential`` or a list of modules whose last element is the head.

    Without ``num_blocks`` every element but the last is a block. With it,
    elements (and the elements of nested ``nn.Sequential`` modules) are
    grouped into ``num_blocks`` blocks of balanced FLOPs. The modules are
    used as they are (not copied). Feature formats are guessed from the rank
    of each block's output: 4D is "NCHW", 3D "NLC", 2D "NC".

    Args:
        model: ``nn.Sequential``, ``nn.ModuleList`` or list/tuple of modules.
        num_blocks: number of blocks (default: one per element before the head).
        example_input: an input of the first module (default: guessed from its
            first ``Conv2d``, ``Conv1d`` or ``Linear``).

    Returns:
        The split, or ``None`` when ``model`` is not a sequence of modules.

    Raises:
        SplitError: fewer than two modules, or more blocks than pieces.

    Examples:
        >>> stem = nn.Conv2d(3, 8, 3)
        >>> head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        >>> split = split_sequential([stem, nn.ReLU(), head])
        >>> len(split), split.feature_format, split.num_classes
        (2, ['NCHW', 'NCHW'], 10)
    """
    modules = _modules_of(model)
    if modules is None:
        return None
    if len(modules) < 2:
        raise SplitError(f"a sequence of modules needs at least one block and a head, got {len(modules)} module(s)")
    if num_blocks is not None and num_blocks < 1:
        raise SplitError(f"num_blocks must be at least 1, got {num_blocks}")
    *trunk, (_, head) = modules
    root = nn.ModuleList(m for _, m in modules)
    x = example_input if example_input is not None else _guess_input(trunk[0][1])
    with training_mode(root, False):
        if num_blocks is None or num_blocks == len(trunk):
            blocks: list[nn.Module] = [m for _, m in trunk]
            names = [name for name, _ in trunk]
            _, states = _run(blocks, x)
        else:
            pieces = _pieces(trunk)
            if num_blocks > len(pieces):
                raise SplitError(
                    f"this sequence can be cut into at most {len(pieces)} blocks (one per module, nested "
                    f"nn.Sequential opened); asked for {num_blocks}"
                )
            flops, piece_states = _run([m for _, m in pieces], x, flops=True)
            ends = balance(flops, num_blocks)
            spans = list(zip([0, *ends[:-1]], ends))
            blocks = [pieces[a][1] if b - a == 1 else BlockSequence(*(m for _, m in pieces[a:b])) for a, b in spans]
            names = [pieces[a][0] if b - a == 1 else f"{pieces[a][0]}..{pieces[b - 1][0]}" for a, b in spans]
            states = [piece_states[b - 1] for b in ends]
        with torch.no_grad():
            logits = call_block(head, states[-1])
        layouts = _per_sample(blocks, x, states)
    features = [_feature(s, b) for b, s in enumerate(states)]
    size = tuple(int(s) for s in x.shape[-2:]) if x.dim() == 4 else None
    return BlockSplit(
        blocks=list(blocks),
        head=head,
        num_classes=int(logits.shape[-1]),
        feature_index=[f[0] for f in features],
        feature_format=[f[1] for f in features],
        names=names,
        in_chans=int(x.shape[1]) if x.dim() >= 2 else None,
        per_sample=layouts,
        **({"example_size": size} if size else {}),
    )


def __getattr__(name: str) -> Any:
    if name == "Chain":
        warnings.warn("ensemblekit.splitting's Chain is now BlockSequence (ek.topologies.Chain is the "
                      "multi-exit topology); import BlockSequence", DeprecationWarning, stacklevel=2)
        return BlockSequence
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
