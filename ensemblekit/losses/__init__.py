"""Loss strategies: (ensemble output, labels) -> total loss and named parts."""

from ensemblekit.losses.ensemble_losses import IndependentCE

BUILTIN_LOSSES = {
    "independent": IndependentCE,
}

__all__ = ["BUILTIN_LOSSES", "IndependentCE"]
