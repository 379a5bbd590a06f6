"""Multi-exit networks (MSDNet-style early exits) with IMTA's training techniques (Li et al., ICCV 2019).

``multi_exit(backbone)`` cuts a backbone into blocks, puts an exit head after
each chosen block (a ``chain``) and trains every exit with
``sum_k w_k CE(z_k, y)`` (IMTA Eq. 1). Each IMTA technique is switched on
its own: Gradient Equilibrium (Sec. 3.1, Eq. 4-5,
[`ensemblekit.methods.imta.gradient_equilibrium`][ensemblekit.methods.imta.gradient_equilibrium]), Inline
Subnetwork Collaboration (Sec. 3.2, [`ensemblekit.methods.imta.isc`][ensemblekit.methods.imta.isc]) and
One-for-all KD (Sec. 3.3, Eq. 7-8, [`MultiExitLoss`][ensemblekit.components.losses.multi_exit.MultiExitLoss]).
The paper trains in two phases: phase I the whole network with GE; phase II
([`start_phase2()`][ensemblekit.methods.imta.recipe.start_phase2]) only the exit heads and ISC modules, with ISC
and OFA; the ``"two_phase"`` training schedule
([`ensemblekit.methods.imta.schedule`][ensemblekit.methods.imta.schedule]) runs both through
[`ensemblekit.training.trainer.train()`][ensemblekit.training.trainer.train].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ensemblekit.build import recorded_recipe, wrap
from ensemblekit.components.aggregators import LastExit
from ensemblekit.components.losses.multi_exit import MultiExitLoss
from ensemblekit.components.topologies import Chain
from ensemblekit.core.ensemble import Ensemble
from ensemblekit.core.heads import ExitHead
from ensemblekit.methods.imta.gradient_equilibrium import apply_gradient_equilibrium
from ensemblekit.methods.imta.isc import add_isc

__all__ = ["multi_exit", "start_phase2"]


@recorded_recipe
def multi_exit(
    backbone: Any,
    exits: Sequence[int] | None = None,
    *,
    num_blocks: int | None = None,
    gradient_equilibrium: bool = True,
    isc: str | bool | None = None,
    isc_detach: bool = True,
    ofa: bool = False,
    alpha: float = 0.1,
    temperature: float = 1.0,
    weights: Sequence[float] | None = None,
    exit_head: Any = ExitHead,
    **wrap_options: Any,
) -> Ensemble:
    """A multi-exit network: one exit after each chosen block; members are the exits in depth order.

    Args:
        backbone: a timm model (or anything [`wrap()`][ensemblekit.build.wrap] takes).
        exits: 0-based blocks followed by an exit (None: every block). The
            last block's exit is the backbone's own head.
        num_blocks: blocks to cut the backbone into (None: natural stages).
        gradient_equilibrium: rescale gradients as IMTA Eq. 4-5.
        isc: inline subnetwork collaboration: "concat" (Linear-BN-ReLU
            projection of the previous exit's logits joined to the features,
            the authors' code; ``True`` means this), "add" (identity path),
            or None/False for none.
        isc_detach: stop the gradient from exit ``k`` into exit ``k-1`` through ISC.
        ofa: One-for-all KD from the last exit (IMTA Eq. 7-8).
        alpha: weight of the distillation term in OFA's ``L_k`` (Eq. 7: ``(1 - alpha) CE + alpha T^2 KL``;
            the authors' code: gamma = 0.1).
        temperature: OFA's temperature ``T``.
        weights: per-exit loss weights ``w_k`` (default 1, as in MSDNet).
        exit_head: factory ``(in_features, num_classes, fmt, num_prefix_tokens)
            -> nn.Module`` of the early exits (default global pool + linear).
        **wrap_options: passed to [`wrap()`][ensemblekit.build.wrap] (``num_classes``,
            ``halting``, ``init``, ``example_input``, ...).

    Returns:
        An [`Ensemble`][ensemblekit.core.ensemble.Ensemble] whose aggregator returns the latest
        exit's logits (so ``predict`` and halting policies see each exit's own
        prediction) and whose loss is the multi-exit loss.

    Examples:
        >>> import timm, torch, ensemblekit as ek
        >>> net = ek.recipes.multi_exit(timm.create_model("resnet10t", num_classes=10), isc="concat", ofa=True)
        >>> net.forward_members(torch.randn(2, 3, 32, 32)).shape[1] == net.num_members
        True
    """
    if isc is True:
        isc = "concat"
    loss = MultiExitLoss(weights=weights, ofa=ofa, alpha=alpha, temperature=temperature)
    ensemble = wrap(backbone, Chain(exits=None if exits is None else list(exits), num_blocks=num_blocks),
                    aggregator=LastExit(), loss=loss, exit_head=exit_head, **wrap_options)
    if isc:
        add_isc(ensemble, mode=isc, detach=isc_detach)
    if gradient_equilibrium:
        apply_gradient_equilibrium(ensemble)
    return ensemble


# **wrap_options go to wrap(): the option checks (configs, the registry) accept its keywords
multi_exit.passes_kwargs_to = wrap  # type: ignore[attr-defined]


def _keep_eval(module: nn.Module, args: Any) -> None:
    module.training = False


def start_phase2(ensemble: Ensemble) -> list[nn.Parameter]:
    """IMTA phase II: freeze the backbone's blocks, train only the heads (exits and ISC modules).

    Every node parameter gets ``requires_grad=False`` and every BatchNorm
    in the nodes stays in eval mode (running statistics used, never updated)
    even when ``ensemble.train()`` is called later. The ``"two_phase"``
    schedule ([`ensemblekit.methods.imta.schedule.two_phase()`][ensemblekit.methods.imta.schedule.two_phase]) calls it
    when phase II starts; idempotent.

    Returns:
        The parameters left trainable, for the optimizer.
    """
    for p in ensemble.nodes.parameters():
        p.requires_grad_(False)
    for module in ensemble.nodes.modules():
        if isinstance(module, _BatchNorm) and _keep_eval not in module._forward_pre_hooks.values():
            module.eval()
            module.register_forward_pre_hook(_keep_eval)
    return [p for p in ensemble.parameters() if p.requires_grad]
