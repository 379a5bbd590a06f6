"""HNE (Ruiz & Verbeek): a tree of networks, mean of logits, hierarchical distillation."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ensemblekit.backbones import create_backbone
from ensemblekit.build import recorded_recipe, wrap
from ensemblekit.components.losses import HierarchicalDistillation
from ensemblekit.components.topologies import Tree
from ensemblekit.core.blocks import BlockSplit
from ensemblekit.core.ensemble import Ensemble
from ensemblekit.errors import InvalidTypeError

__all__ = ["hne"]


@recorded_recipe
def hne(
    backbone: nn.Module | BlockSplit | str,
    depth: int = 4,
    branching: int = 2,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    loss: Any = None,
    T: float | None = None,
    **options: Any,
) -> Ensemble:
    """A Hierarchical Neural Ensemble as in the paper (HNE AAAI Sec. 3, Eq. 1 and 6).

    The backbone is cut into ``depth + 1`` blocks; block ``b`` has
    ``branching^b`` copies (each extra copy freshly initialised), giving
    ``branching^depth`` members evaluated depth-first. Members are combined
    by the mean of their logits (Eq. 1) and trained with
    ``(1 - alpha) L_I + alpha L_HD`` (Eq. 3 and 6) at temperature ``temperature``.

    Args:
        backbone: a timm model (or its name, created with ``pretrained=False``),
            a module sequence or a ready BlockSplit.
        depth: tree depth ``B`` (the paper: 4, i.e. 16 members).
        branching: children per node (the paper: 2).
        alpha: weight of hierarchical distillation (the paper: 0.5).
        temperature: distillation temperature T (the paper: 2).
        loss: another loss for ablations (e.g. "independent"); default L_HD.
        T: deprecated name of ``temperature`` (a ``DeprecationWarning``).
        **options: passed to [`ensemblekit.wrap()`][ensemblekit.build.wrap] (``num_classes``,
            ``init``, ``halting``, ``example_input``, ...).

    Returns:
        An [`Ensemble`][ensemblekit.core.ensemble.Ensemble].

    Examples:
        >>> import timm
        >>> ens = hne(timm.create_model("resnet10t", num_classes=10), depth=2)
        >>> ens.num_members, type(ens.loss_strategy).__name__
        (4, 'HierarchicalDistillation')
    """
    if T is not None:
        warnings.warn("hne(T=...) is deprecated; pass temperature=... instead", DeprecationWarning, stacklevel=2)
        temperature = T
    if isinstance(backbone, str):
        backbone = create_backbone(backbone, num_classes=options.pop("num_classes", 1000))
    for key in ("topology", "aggregator"):
        if key in options:
            raise InvalidTypeError(f"hne() fixes the {key} (a tree and the mean of logits); use ensemblekit.wrap for "
                                   "another")
    return wrap(backbone, Tree(depth, branching), aggregator="mean",
                loss=HierarchicalDistillation(alpha, temperature) if loss is None else loss, **options)


# **options go to wrap(): the option checks (configs, the registry) accept its keywords
hne.passes_kwargs_to = wrap  # type: ignore[attr-defined]
