"""IMTA's two-phase training as trainer stages (Li et al., ICCV 2019, Sec. 3).

IMTA trains a multi-exit network in two phases:

* phase I: the whole network with the exits' weighted cross-entropy
  (Eq. 1) and, when the recipe installed it, Gradient Equilibrium (Sec. 3.1);
* phase II: the backbone's blocks and their BatchNorm statistics frozen
  ([`start_phase2()`][ensemblekit.methods.imta.recipe.start_phase2]), only the exit
  heads trained, with Inline Subnetwork Collaboration (Sec. 3.2) added to
  the heads and One-for-all KD (Sec. 3.3, Eq. 7-8) switched on when asked.

[`two_phase()`][ensemblekit.methods.imta.schedule.two_phase] returns the two [`Stage`][ensemblekit.core.stages.Stage]
objects; it is registered as the ``"two_phase"`` schedule
(``train.stages = {name = "two_phase", isc = "concat", ofa = true}``).
Each phase gets a fresh optimizer and learning-rate schedule from the
training settings (the paper: SGD with Nesterov momentum, each phase with
its own steps).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ensemblekit.components.losses.multi_exit import MultiExitLoss
from ensemblekit.core.stages import ScheduleSettings, Stage
from ensemblekit.errors import InvalidValueError
from ensemblekit.methods.imta.isc import ISCExit, add_isc
from ensemblekit.methods.imta.recipe import start_phase2

__all__ = ["exits_only", "two_phase"]


def exits_only(name: str, parameter: nn.Parameter) -> bool:
    """Phase II's trainable parameters: everything but the backbone's blocks (``ensemble.nodes``)."""
    return not name.startswith("nodes.")


def two_phase(ensemble: Any, settings: ScheduleSettings, *, phase2_epochs: int | None = None,
              isc: str | bool | None = None, isc_detach: bool = True, ofa: bool | None = None,
              alpha: float | None = None, temperature: float | None = None) -> list[Stage]:
    """IMTA's phase I (everything) and phase II (exit heads only, ISC and OFA as asked).

    Args:
        ensemble: a multi-exit network (``ek.recipes.multi_exit``).
        settings: ``epochs`` of phase I; the optimizer and learning-rate
            schedule of both phases.
        phase2_epochs: epochs of phase II (None: ``settings.epochs``; the
            paper: 300 and 180 on CIFAR).
        isc: add ISC heads at the start of phase II: "concat" (``True``
            means this) or "add"; None/False: none. The ensemble must not
            have ISC heads already (then leave this unset).
        isc_detach: stop the gradient into the previous exit through ISC.
        ofa: phase II's loss with (True) or without (False) One-for-all KD;
            None: the ensemble's loss as it is.
        alpha: OFA's weight in phase II's loss (None: the ensemble's loss's).
        temperature: OFA's temperature (None: the ensemble's loss's).

    Returns:
        ``[phase I, phase II]``.
    """
    if isc is True:
        isc = "concat"
    if isc and any(isinstance(h, ISCExit) for h in ensemble.heads):
        raise InvalidValueError("the ensemble already has ISC heads (built with isc=...): leave the two_phase "
                                "schedule's isc unset, or build the ensemble without ISC to add it in phase II")
    if phase2_epochs is not None and (isinstance(phase2_epochs, bool) or phase2_epochs < 1):
        raise InvalidValueError(f"phase2_epochs must be an integer >= 1, got {phase2_epochs!r}")
    loss = None
    if ofa is not None or alpha is not None or temperature is not None:
        current = ensemble.loss_strategy
        base = current if isinstance(current, MultiExitLoss) else MultiExitLoss()
        loss = MultiExitLoss(weights=base.weights, ofa=base.ofa if ofa is None else ofa,
                             alpha=base.alpha if alpha is None else alpha,
                             temperature=base.temperature if temperature is None else temperature)

    def prepare(net: Any) -> None:
        if isc:
            add_isc(net, mode=str(isc), detach=isc_detach)
        start_phase2(net)

    return [Stage("phase I", settings.epochs),
            Stage("phase II", settings.epochs if phase2_epochs is None else phase2_epochs,
                  trainable=exits_only, loss=loss, prepare=prepare)]
