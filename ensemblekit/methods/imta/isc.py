"""Inline Subnetwork Collaboration (ISC): exit ``k`` also reads exit ``k-1``'s logits (IMTA, Sec. 3.2).

The paper adds a *knowledge transfer path* from each exit's logits to the
next exit, either a small network or an identity ("each classifier ... can be
considered as performing residual learning"), and discards its gradient into
the earlier exit. The authors' code projects the previous logits with
Linear-BN-ReLU to the width of the exit's features, concatenates the two and
applies the exit's linear classifier.

[`ISCExit`][ensemblekit.methods.imta.isc.ISCExit] wraps any head that ends in a linear classifier. Since
``W [f; p] + b = (W_f f + b) + W_p p``, the concatenation is computed as the
wrapped head's logits plus a bias-free linear map of the projected logits:
the same function, and it works on the backbone's own head unchanged.
An [`Ensemble`][ensemblekit.core.ensemble.Ensemble] calls a head whose ``takes_previous_logits``
is true as ``head(*state, previous=logits of member k-1)``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ensemblekit.build import record_preparation
from ensemblekit.core.blocks import call_block
from ensemblekit.errors import InvalidValueError

__all__ = ["ISC_MODES", "ISCExit", "add_isc", "classifier_width"]

ISC_MODES = ("concat", "add")


def classifier_width(head: nn.Module, num_classes: int) -> int:
    """Input width of the last ``nn.Linear`` with ``num_classes`` outputs in ``head``."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not linears:
        raise InvalidValueError(
            f"ISC 'concat' needs a head that ends in a linear classifier with {num_classes} outputs; "
            "none was found: pass width=... or use mode='add'"
        )
    return linears[-1].in_features


class ISCExit(nn.Module):
    """An exit head that adds a transfer path from the previous exit's logits (IMTA Sec. 3.2).

    ``mode="concat"`` (the authors' code): ``z_k = fc([f_k; LBR(z_{k-1})])``,
    computed as ``head(state) + W_p LBR(z_{k-1})`` with ``LBR`` a
    Linear(C, width)-BatchNorm-ReLU projection. ``mode="add"`` (the identity
    path of the paper's text): ``z_k = head(state) + z_{k-1}``.

    Args:
        head: the exit's own head (``state -> logits [B, C]``).
        num_classes: classes ``C``.
        mode: "concat" or "add".
        width: projection width for "concat"; default: the input width of the
            head's linear classifier (as in the authors' code).
        detach: stop the gradient into the previous exit (the paper's choice;
            the authors' released code lets it flow).
    """

    takes_previous_logits = True

    def __init__(self, head: nn.Module, num_classes: int, mode: str = "concat", width: int | None = None,
                 detach: bool = True):
        super().__init__()
        if mode not in ISC_MODES:
            raise InvalidValueError(f"ISC mode must be one of {ISC_MODES}, got {mode!r}")
        self.head = head
        self.mode = mode
        self.detach = detach
        if mode == "concat":
            width = classifier_width(head, num_classes) if width is None else width
            self.project = nn.Sequential(nn.Linear(num_classes, width), nn.BatchNorm1d(width), nn.ReLU())
            self.transfer = nn.Linear(width, num_classes, bias=False)

    def forward(self, *state: Any, previous: Tensor | None = None) -> Tensor:
        """Logits ``[B, C]`` of this exit.

        Args:
            *state: the block state the wrapped head reads.
            previous: the previous exit's logits ``[B, C]``; ``None`` stands
                for zero logits (used when the head's FLOPs are counted alone).
        """
        logits = call_block(self.head, state if len(state) > 1 else state[0])
        if previous is None:
            previous = logits.new_zeros(logits.shape)
        elif self.detach:
            previous = previous.detach()
        if self.mode == "add":
            return logits + previous
        return logits + self.transfer(self.project(previous))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, detach={self.detach}"


def add_isc(ensemble: nn.Module, mode: str = "concat", width: int | None = None, detach: bool = True) -> None:
    """Wrap the heads of members ``1..M-1`` of ``ensemble`` in
    [`ISCExit`][ensemblekit.methods.imta.isc.ISCExit], in place.

    Member ``k`` then also reads member ``k-1``'s logits, in
    [`forward_output()`][ensemblekit.core.ensemble.Ensemble.forward_output] as in anytime inference and
    [`predict()`][ensemblekit.core.ensemble.Ensemble.predict]. It is recorded in the ensemble's
    ``build_spec``, so that [`ensemblekit.load()`][ensemblekit.training.checkpoint.load] adds the heads again.

    Args:
        ensemble: an [`Ensemble`][ensemblekit.core.ensemble.Ensemble] (a chain, for IMTA).
        mode: "concat" (the authors' projection) or "add"; see [`ISCExit`][ensemblekit.methods.imta.isc.ISCExit].
        width: width of the projection (default: the classifier's input width).
        detach: stop the gradient into the earlier exit.
    """
    for k in range(1, ensemble.num_members):
        if isinstance(ensemble.heads[k], ISCExit):
            raise InvalidValueError(f"member {k} already has an ISC head")
        ensemble.heads[k] = ISCExit(ensemble.heads[k], ensemble.num_classes, mode, width, detach)
    ensemble._costs.clear()  # head FLOPs changed: measure again
    record_preparation(ensemble, "isc", mode=mode, width=width, detach=detach)
