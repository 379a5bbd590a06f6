"""``wrap()``: one construction path from a backbone to an :class:`Ensemble`."""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from ensemblekit.core.blocks import BlockSplit
from ensemblekit.core.ensemble import Ensemble
from ensemblekit.core.heads import ExitHead, replace_classifier
from ensemblekit.core.registry import AGGREGATORS, EXECUTORS, HALTING_POLICIES, LOSSES, TOPOLOGIES

__all__ = ["wrap"]


def wrap(
    model: nn.Module | BlockSplit | list[nn.Module],
    topology: Any = "tree",
    *,
    aggregator: Any = "mean",
    loss: Any = "independent",
    halting: Any = None,
    num_classes: int | None = None,
    num_blocks: int | None = None,
    init: str = "reinit",
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
            the head), or a ready :class:`~ensemblekit.core.blocks.BlockSplit`.
        topology: "tree", "independent", "multi_branch", "chain", "cascade", ...
        aggregator: "mean" (of logits, HNE's choice), "mean_probs", "vote", "weighted".
        loss: the training objective used by ``ensemble.loss``.
        halting: the per-sample stopping policy used by ``ensemble.predict``.
        num_classes: replace the backbone's classifier with one of this size.
        num_blocks: blocks to cut the backbone into (default: what the
            topology needs, e.g. ``depth + 1`` for a tree, else the natural stages).
        init: "reinit" (each extra copy redrawn) or "copy" (all copies start
            from the backbone's weights).
        exit_head: factory for early-exit heads of a chain.
        execution: how the nodes of a level run: "loop", "loop_nhwc", "vmap",
            "grouped", "grouped_nhwc", "auto" (see :mod:`ensemblekit.execution`)
            or an :class:`~ensemblekit.core.interfaces.Executor`.
        example_input: an input the backbone accepts, used when splitting.
        node_modules: node index -> module used as that node instead of a
            copy of the backbone's block (EnsembleNet's narrow branches); used
            as given, neither copied nor re-initialised.
        head_modules: member index -> module used as that member's head
            instead of a copy of the backbone's head; used as given.
        **topology_options: options of a topology given by name (``depth=4``).

    Returns:
        An :class:`~ensemblekit.Ensemble`.

    Examples:
        >>> import timm, torch, ensemblekit as ek
        >>> ens = ek.wrap(timm.create_model("resnet10t", num_classes=10), topology="tree", depth=2)
        >>> ens.num_members
        4
        >>> ens(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    _check_arguments(num_classes, num_blocks, exit_head, example_input)
    topo = TOPOLOGIES.create(topology, **topology_options)
    split = _split(model, num_blocks or topo.num_blocks, example_input, topo)
    if num_classes is not None and num_classes != split.num_classes:
        split.head = replace_classifier(copy.deepcopy(split.head), split.num_classes, num_classes)
        split.num_classes = num_classes
    context = {"num_members": topo.build(len(split)).num_members}
    agg = AGGREGATORS.create(aggregator, context=context)
    loss_strategy = None if loss is None else LOSSES.create(loss)
    policy = None if halting is None else HALTING_POLICIES.create(halting, context=context)
    return Ensemble(split, topo, agg, loss=loss_strategy, halting=policy, init=init, exit_head=exit_head,
                    execution=EXECUTORS.create(execution), node_modules=node_modules, head_modules=head_modules)


def _check_arguments(num_classes: Any, num_blocks: Any, exit_head: Any, example_input: Any) -> None:
    for name, value, minimum in (("num_classes", num_classes, 1), ("num_blocks", num_blocks, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise ValueError(f"{name} must be an integer >= {minimum} or None, got {value!r}")
    if not callable(exit_head):
        raise TypeError(f"exit_head must be a callable (in_features, num_classes, fmt, num_prefix_tokens) -> module, "
                        f"got {exit_head!r}")
    if example_input is not None and not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a tensor the backbone accepts, got {type(example_input).__name__}")


def _split(model: Any, num_blocks: int | None, example_input: Tensor | None, topology: Any) -> BlockSplit:
    from ensemblekit.splitting import SplitError, split

    if isinstance(model, BlockSplit):
        if num_blocks is not None and num_blocks != len(model):
            raise ValueError(f"topology {topology!r} needs {num_blocks} blocks but the given split has {len(model)}")
        return model
    try:
        return split(model, num_blocks, example_input=example_input)
    except SplitError as err:
        if num_blocks is None:
            raise
        raise SplitError(f"topology {topology!r} needs the backbone in {num_blocks} blocks: {err}") from err
