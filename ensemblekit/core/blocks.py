"""A backbone cut into blocks: the one shape every other module speaks.

A block maps a *state* to a state. Most models pass one tensor between
stages; some pass a tuple (side inputs, sizes, parallel streams), so a state
is either a tensor or a tuple of values. The head maps the last state to
logits. Composing ``head(blocks[-1](...blocks[0](x)))`` reproduces the
backbone's ``model(x)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast, runtime_checkable

import torch
from torch import fx, nn

from ensemblekit.core.batching import StateLayout
from ensemblekit.errors import InvalidValueError

__all__ = ["BlockSplit", "FeatureFormat", "State", "TracedBlock", "call_block"]

State = torch.Tensor | tuple[Any, ...]
FeatureFormat = Literal["NCHW", "NHWC", "NLC", "NC"]


@dataclass
class BlockSplit:
    """The result of [`ensemblekit.split()`][ensemblekit.splitting.split].

    Attributes:
        blocks: the stem-and-stage blocks, in order; block ``b`` maps the state
            after block ``b-1`` (the input image for ``b=0``) to a new state.
        head: maps the state after the last block to logits ``[B, C]``.
        num_classes: number of classes the head predicts.
        feature_index: where the feature map lives inside a tuple state
            (``None`` when the state is a plain tensor). One entry per block.
        feature_format: layout of each block's feature map ("NCHW" for CNNs,
            "NHWC" for Swin-like models, "NLC" for token models, "NC" for flat
            features). One entry per block.
        num_prefix_tokens: leading non-spatial tokens (cls, registers) of an
            "NLC" feature map; exit heads pool over the rest.
        names: a readable name per block (for ``inspect``).
        in_chans: input channels the first block expects (checked on input).
        input_size: ``(H, W)`` when the backbone only accepts that size,
            else ``None``.
        example_size: a small ``(H, W)`` that the backbone accepts, used to
            trace shapes (and to count FLOPs when ``native_size`` is unknown).
        native_size: ``(H, W)`` the backbone was made for (timm's
            ``pretrained_cfg["input_size"]``; ``None`` when unknown):
            [`cost_table()`][ensemblekit.core.ensemble.Ensemble.cost_table] reports FLOPs at this
            size unless given another.
        per_sample: which values of each block's output state are per-sample
            (computed from the input batch), so that samples that stopped can
            be dropped from them ([`ensemblekit.core.batching`][ensemblekit.core.batching]): ``True``
            for a tensor state, a tuple of flags for a tuple state (``False``
            for side inputs such as a RoPE table or an attention bias, and for
            sizes). One entry per block; ``None`` when the splitter does not
            say (a tensor state is then per-sample, a tuple state cannot be compacted).
        fresh: draws a new split of the same backbone, initialised anew by the
            backbone's own rule (independent modules with the same parameter
            names and shapes; each call a new draw from the global torch RNG).
            [`ensemblekit.wrap()`][ensemblekit.build.wrap] sets it for timm backbones; ``None`` when
            unknown, and then copies are redrawn by each submodule's
            ``reset_parameters`` (see ``docs/concepts.md``, "Initialisation").
        pretrained_cfg: the backbone's timm ``pretrained_cfg`` (input size,
            mean, std, crop, interpolation), with ``input_size`` giving the
            input channels and size the split takes; an ensemble carries it, so
            that ``timm.data.resolve_model_data_config(ensemble)`` resolves the
            backbone's data config. ``None`` when the backbone has none.
    """

    blocks: list[nn.Module]
    head: nn.Module
    num_classes: int
    feature_index: list[int | None]
    feature_format: list[FeatureFormat]
    num_prefix_tokens: int = 0
    names: list[str] | None = None
    in_chans: int | None = None
    input_size: tuple[int, int] | None = None
    example_size: tuple[int, int] = (32, 32)
    native_size: tuple[int, int] | None = None
    per_sample: list[StateLayout] | None = None
    fresh: Callable[[], BlockSplit] | None = field(default=None, repr=False, compare=False)
    pretrained_cfg: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.blocks)
        if n == 0:
            raise InvalidValueError("a BlockSplit needs at least one block")
        if len(self.feature_index) != n or len(self.feature_format) != n:
            raise InvalidValueError(
                f"feature_index ({len(self.feature_index)}) and feature_format "
                f"({len(self.feature_format)}) need one entry per block ({n})"
            )
        if self.names is None:
            self.names = [f"block{b}" for b in range(n)]
        if self.per_sample is not None and len(self.per_sample) != n:
            raise InvalidValueError(f"per_sample ({len(self.per_sample)}) needs one entry per block ({n})")

    def __len__(self) -> int:
        return len(self.blocks)

    def feature(self, state: State, block: int) -> torch.Tensor:
        """The feature-map tensor inside the state produced by ``block``."""
        index = self.feature_index[block]
        # feature_index is None exactly where the block's state is the feature tensor itself
        return cast(torch.Tensor, state if index is None else state[index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run blocks then head: equals the backbone's ``model(x)``."""
        state: State = x
        for block in self.blocks:
            state = call_block(block, state)
        return cast(torch.Tensor, call_block(self.head, state))  # the head returns the logits


def call_block(block: nn.Module, state: State) -> State:
    """Apply a block to a state: a tuple state is unpacked into arguments."""
    if isinstance(state, tuple):
        return block(*state)
    return block(state)


@runtime_checkable
class TracedBlock(Protocol):
    """A block that runs ``torch.fx`` graphs and shows them, one per training flag.

    `GraphBlock` is one; executors read
    the graphs to see which operations a block performs.
    """

    @property
    def graphs(self) -> Mapping[bool, fx.Graph]:
        """``{False: eval graph, True: train graph}``."""
        ...
