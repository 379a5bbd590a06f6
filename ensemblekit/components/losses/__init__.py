"""Loss strategies: (ensemble output, labels) -> total loss and named parts."""

from ensemblekit.components.losses.ensemble_losses import (
    CoDistillation,
    EnsembleNetCoDistillation,
    EnsembleNetEnsembling,
    HierarchicalDistillation,
    IndependentCE,
    IndependentNestedCE,
    NestedCE,
    kd_loss,
)
from ensemblekit.components.losses.learned_halting import IreneLoss
from ensemblekit.components.losses.multi_exit import MultiExitLoss

BUILTIN_LOSSES = {
    "independent": IndependentCE,
    "nested": NestedCE,
    "independent+nested": IndependentNestedCE,
    "codistillation": CoDistillation,
    "hierarchical_distillation": HierarchicalDistillation,
    "ensemblenet_ensembling": EnsembleNetEnsembling,
    "ensemblenet_codistillation": EnsembleNetCoDistillation,
    "multi_exit": MultiExitLoss,
    "irene": IreneLoss,
}

__all__ = [
    "BUILTIN_LOSSES",
    "CoDistillation",
    "EnsembleNetCoDistillation",
    "EnsembleNetEnsembling",
    "HierarchicalDistillation",
    "IndependentCE",
    "IndependentNestedCE",
    "IreneLoss",
    "MultiExitLoss",
    "NestedCE",
    "kd_loss",
]
