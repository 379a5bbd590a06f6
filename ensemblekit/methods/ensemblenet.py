"""EnsembleNet (Lee et al.): a shared trunk and N narrower branches, co-distilled."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ensemblekit.build import recorded_recipe, wrap
from ensemblekit.components.topologies import MultiBranch
from ensemblekit.core.blocks import BlockSplit, State, call_block
from ensemblekit.core.ensemble import Ensemble
from ensemblekit.core.heads import feature_dim, replace_classifier

__all__ = ["WIDTH", "AdaptedBlock", "ChannelAdapter", "ensemblenet"]

WIDTH = 1 / 1.5
"""The paper's branch width: "typically our shrinking ratio is about 1.5" (Sec. 3)."""


class ChannelAdapter(nn.Module):
    """Maps the trunk's features to the width a narrow branch expects.

    A 1x1 convolution and batch norm for ``NCHW`` feature maps, a linear
    layer over the last dimension for ``NHWC``, ``NLC`` and ``NC`` features.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str):
        super().__init__()
        if fmt == "NCHW":
            self.proj = nn.Sequential(nn.Conv2d(in_features, out_features, 1, bias=False),
                                      nn.BatchNorm2d(out_features))
        else:
            self.proj = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class AdaptedBlock(nn.Module):
    """A branch's first block behind a [`ChannelAdapter`][ensemblekit.methods.ensemblenet.ChannelAdapter]."""

    def __init__(self, adapter: ChannelAdapter, block: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.block = block

    def forward(self, x: torch.Tensor) -> State:
        return call_block(self.block, self.adapter(x))


@recorded_recipe
def ensemblenet(
    backbone: nn.Module | str,
    branches: int = 2,
    fork: int = -2,
    width: float = WIDTH,
    *,
    loss: Any = "ensemblenet_codistillation",
    aggregator: Any = "mean",
    halting: Any = None,
    num_classes: int | None = None,
    num_blocks: int | None = None,
    init: str | dict[str, Any] = "reinit",
    execution: Any = "loop",
    example_input: torch.Tensor | None = None,
) -> Ensemble:
    """A multi-headed EnsembleNet built from a timm backbone (Lee et al., Sec. 3).

    The blocks before ``fork`` form the shared trunk; from ``fork`` on, each of
    the ``branches`` members has its own copy of the blocks of the same
    architecture narrowed to ``width`` (made by
    [`narrow_model()`][ensemblekit.backbones.narrow.narrow_model] from the width the backbone
    was created with, where [`create_backbone()`][ensemblekit.backbones.factory.create_backbone]
    recorded it, and split into the same blocks), with the narrow model's
    head. Where the trunk's output width
    differs from what the narrow branch expects, a 1x1 convolution (or linear)
    [`ChannelAdapter`][ensemblekit.methods.ensemblenet.ChannelAdapter] starts each branch. With two branches at width
    1/1.5 forked at the upper half, the whole ensemble has about as many
    parameters as the backbone (the paper: "smaller size and better performance").
    Trained with the co-distillation loss (Eq. 3, ``mu = 3``) by default, or
    ``loss={"name": "ensemblenet_ensembling", "lam": -1.5}`` (Eq. 2).

    Args:
        backbone: a timm model or a timm model name (``pretrained=False``).
        branches: number of branches (members).
        fork: first branched block; negative counts from the end (-2: the
            upper half of a four-stage ResNet, as in the paper).
        width: channel multiplier of the branches.
        loss: the training objective (name, mapping or object).
        aggregator: how branch logits combine (the paper: simple average).
        halting: optional halting policy.
        num_classes: classes (default: the backbone's).
        num_blocks: blocks to cut the backbone into (default: its natural stages).
        init: how the trunk starts (see [`ensemblekit.core.initialisation`][ensemblekit.core.initialisation]).
            The narrowed branches have no given weights: each is an independent draw of the narrow model by the
            backbone's own initialisation, whatever ``init`` says, except ``"copy"`` (identical branches).
        execution: how the nodes of a level run (see [`ensemblekit.wrap()`][ensemblekit.build.wrap]).
        example_input: an input the backbone accepts (for splitting and sizing the adapter).

    Returns:
        An [`Ensemble`][ensemblekit.core.ensemble.Ensemble] whose branch nodes are narrow blocks.

    Examples:
        >>> import timm
        >>> base = timm.create_model("resnet10t", num_classes=10)
        >>> ens = ensemblenet(base, branches=2)
        >>> ens.num_members, sum(p.numel() for p in ens.parameters()) < sum(p.numel() for p in base.parameters())
        (2, True)
    """
    from ensemblekit.backbones import create_backbone, narrow_model
    from ensemblekit.backbones.spec import backbone_spec
    from ensemblekit.splitting import SplitError, split

    if isinstance(backbone, str):
        backbone = create_backbone(backbone, **({} if num_classes is None else {"num_classes": num_classes}))
    if not 0 < width <= 1:
        raise ValueError(f"width must be in (0, 1], got {width}")
    wide = split(backbone, num_blocks, example_input=example_input)
    narrow_kwargs = _recorded_kwargs(backbone_spec(backbone))
    if num_classes is not None:
        narrow_kwargs["num_classes"] = num_classes

    def draw_narrow() -> BlockSplit:
        """A new draw of the narrowed backbone by its own (timm's) initialisation, cut into the backbone's blocks."""
        return split(narrow_model(backbone, width, **narrow_kwargs), len(wide), example_input=example_input)

    narrow = draw_narrow()
    if narrow.names != wide.names:
        raise SplitError(f"the narrowed backbone splits into blocks {narrow.names}, the backbone into {wide.names}; "
                         "pass num_blocks so that both split alike")
    if num_classes is not None and num_classes != wide.num_classes:
        wide.head = replace_classifier(copy.deepcopy(wide.head), wide.num_classes, num_classes)
        wide.num_classes = num_classes
    topology = MultiBranch(branches, fork, num_blocks=len(wide))
    first = topology.fork_block(len(wide))
    wider = [wide.names[b] for b in range(first, len(wide)) if _params(narrow.blocks[b]) > _params(wide.blocks[b])]
    if wider:
        raise ValueError(
            f"the narrowed blocks {', '.join(wider)} are larger than the backbone's own: narrow_model scales the "
            "width that ensemblekit.backbones.create_backbone recorded, else the architecture's default width, so "
            "a backbone made by timm.create_model with a custom width cannot be narrowed; create it with "
            "create_backbone (or with its default width)")
    adapter = _adapter_size(wide, narrow, first, example_input)
    adapters = [None if adapter is None else ChannelAdapter(*adapter) for _ in range(branches)]
    if (init.get("name") if isinstance(init, dict) else init) == "copy":  # identical branches
        draws, adapters = [copy.deepcopy(narrow) for _ in adapters], [copy.deepcopy(adapters[0]) for _ in adapters]
    else:  # independent draws of the narrow model: the branches have no given weights to start from
        draws = [narrow, *(draw_narrow() for _ in range(branches - 1))]

    graph = topology.build(len(wide))
    node_modules: dict[int, nn.Module] = {}
    for node in graph.nodes:
        if node.block < first:
            continue
        branch = sum(1 for other in graph.nodes[: node.index] if other.block == node.block)
        block = draws[branch].blocks[node.block]
        branch_adapter = adapters[branch]
        if node.block == first and branch_adapter is not None:
            block = AdaptedBlock(branch_adapter, block)
        node_modules[node.index] = block
    head_modules = {m: draws[m].head for m in range(branches)}
    return wrap(wide, topology, aggregator=aggregator, loss=loss, halting=halting, init=init, execution=execution,
                node_modules=node_modules, head_modules=head_modules)


def _recorded_kwargs(spec: dict[str, Any] | None) -> dict[str, Any]:
    """The keywords the backbone was created with (its width among them), less ``num_classes``; {} if unknown."""
    return {k: v for k, v in (spec or {}).get("kwargs", {}).items() if k != "num_classes"}


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def _adapter_size(wide: BlockSplit, narrow: BlockSplit, fork: int,
                  example_input: torch.Tensor | None) -> tuple[int, int, str] | None:
    """``(trunk channels, branch channels, format)`` when they differ at the fork, else None."""
    h, w = wide.input_size or wide.example_size
    x = example_input if example_input is not None else torch.zeros(2, wide.in_chans or 3, h, w)
    x = x.expand(2, *x.shape[1:]) if x.shape[0] == 1 else x
    features = []
    for s in (wide, narrow):
        modes = [b.training for b in s.blocks]
        state: State = x
        try:
            for b in s.blocks[:fork]:
                state = call_block(b.eval(), state)
        finally:
            for b, mode in zip(s.blocks, modes):
                b.train(mode)
        if not isinstance(state, torch.Tensor):
            raise ValueError(
                f"the backbone passes a tuple between blocks {wide.names[fork - 1]} and {wide.names[fork]}; "
                "ensemblenet() inserts its channel adapter into plain tensor states only: choose another fork")
        features.append(feature_dim(state, s.feature_format[fork - 1]))
    if features[0] == features[1]:
        return None
    return features[0], features[1], wide.feature_format[fork - 1]

