"""Gradient Equilibrium (GE) for multi-exit chains (Li et al., IMTA, Sec. 3.1).

GE is a gradient re-scaling op ``R(x; s)``: the identity forward, the
gradient times ``s`` backward (Eq. 4). With ``n`` exits and exit ``i``
(0-based) after block ``b_i``, the state leaving block ``b_i`` is rescaled
twice: by ``1/(n-i)`` on its way into exit ``i``'s head and by
``(n-i-1)/(n-i)`` on its way into the next block. The gradient that loss
``L_j`` (``j >= i``) sends into block ``b_i`` is then
``prod_{i<=h<j} (n-h-1)/(n-h) * 1/(n-j) * grad L_j = 1/(n-i) * grad L_j``
(Eq. 5): each block receives the mean, not the sum, of the gradients of the
exits it feeds. The authors' code applies ``1/(n-i)`` before exit ``i`` and
then ``(n-i-1)`` before block ``i+1``; the products are the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ensemblekit.build import record_preparation
from ensemblekit.errors import InvalidValueError

__all__ = [
    "GradientRescale", "RescaleInputGradient", "apply_gradient_equilibrium", "chain_exit_nodes",
    "equilibrium_scales", "has_gradient_equilibrium", "rescale_gradient", "rescale_state"
]


class GradientRescale(torch.autograd.Function):
    """``R(x; s)``: identity forward, ``s * grad`` backward (IMTA Eq. 4)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()  # a copy, so that later in-place ops cannot bypass the backward

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def rescale_gradient(x: Tensor, scale: float) -> Tensor:
    """``R(x; scale)`` (IMTA Eq. 4): ``x`` unchanged, its gradient multiplied by ``scale``.

    Without autograd (inference, or ``x`` needs no gradient) ``x`` itself is returned.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return GradientRescale.apply(x, scale)


def rescale_state(state: Any, scale: float) -> Any:
    """Apply [`rescale_gradient()`][ensemblekit.methods.imta.gradient_equilibrium.rescale_gradient] to every
    floating-point tensor of a (tuple) state."""
    if isinstance(state, Tensor):
        return rescale_gradient(state, scale) if state.is_floating_point() else state
    if isinstance(state, tuple):
        return tuple(rescale_state(s, scale) for s in state)
    return state


class RescaleInputGradient:
    """A forward pre-hook that passes a module's positional inputs through ``R(.; scale)``.

    Args:
        scale: the gradient factor.
    """

    def __init__(self, scale: float):
        self.scale = float(scale)

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return rescale_state(args, self.scale)

    def __repr__(self) -> str:
        return f"RescaleInputGradient({self.scale!r})"


def equilibrium_scales(num_exits: int) -> list[tuple[float, float]]:
    """``(exit scale, later-blocks scale) = (1/(n-i), (n-i-1)/(n-i))`` for exits ``i = 0..n-1``.

    Examples:
        >>> equilibrium_scales(3)
        [(0.3333333333333333, 0.6666666666666666), (0.5, 0.5), (1.0, 0.0)]
    """
    if num_exits < 1:
        raise InvalidValueError(f"num_exits must be >= 1, got {num_exits}")
    return [(1.0 / (num_exits - i), (num_exits - i - 1) / (num_exits - i)) for i in range(num_exits)]


def chain_exit_nodes(ensemble: nn.Module) -> list[int]:
    """Node index each member exits after, checking that members are exits of one chain."""
    members = ensemble.graph.members
    spine = max((m.path for m in members), key=len)
    exits = [m.exit_node for m in members]
    for m in members:
        if tuple(spine[: len(m.path)]) != m.path:
            raise InvalidValueError(
                "gradient equilibrium needs a chain (members are exits along one path); "
                f"member {m.index} leaves that path; use topology='chain'"
            )
    if sorted(exits, key=spine.index) != exits or len(set(exits)) != len(exits):
        raise InvalidValueError("gradient equilibrium needs the members in depth order, one exit per node")
    return exits


def apply_gradient_equilibrium(ensemble: nn.Module) -> list[RemovableHandle]:
    """Install GE on a multi-exit chain: ``R(.; 1/(n-i))`` before exit ``i``, ``R(.; (n-i-1)/(n-i))``
    before the block after it (IMTA Eq. 4-5).

    The ops are forward pre-hooks on ``ensemble.heads[i]`` and on the node
    after exit ``i``'s node, so parameters, ``state_dict`` keys and outputs are
    unchanged; only gradients are rescaled. Remove them with the returned
    handles (``handle.remove()``). It is recorded in the ensemble's
    ``build_spec``, so that [`ensemblekit.load()`][ensemblekit.training.checkpoint.load] installs it again (while
    the hooks are in place).

    Args:
        ensemble: an [`Ensemble`][ensemblekit.core.ensemble.Ensemble] built on a chain.

    Returns:
        One handle per hook.
    """
    exits = chain_exit_nodes(ensemble)
    if has_gradient_equilibrium(ensemble):
        raise InvalidValueError("gradient equilibrium is already applied to this ensemble")
    nodes = ensemble.graph.nodes
    children = {n.parent: n.index for n in nodes if n.parent is not None}
    handles = []
    for i, (exit_scale, later_scale) in enumerate(equilibrium_scales(len(exits))):
        handles.append(ensemble.heads[i].register_forward_pre_hook(RescaleInputGradient(exit_scale)))
        nxt = children.get(exits[i])
        if nxt is not None and i + 1 < len(exits):
            handles.append(ensemble.nodes[nxt].register_forward_pre_hook(RescaleInputGradient(later_scale)))
    record_preparation(ensemble, "gradient_equilibrium")
    return handles


def has_gradient_equilibrium(ensemble: nn.Module) -> bool:
    """Whether
    [`apply_gradient_equilibrium()`][ensemblekit.methods.imta.gradient_equilibrium.apply_gradient_equilibrium]
    hooks are installed on ``ensemble``."""
    modules = list(ensemble.heads) + list(ensemble.nodes)
    return any(isinstance(h, RescaleInputGradient) for m in modules for h in m._forward_pre_hooks.values())
