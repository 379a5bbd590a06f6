"""Halting policies: per sample, when to stop adding members."""

from ensemblekit.components.halting.budgeted import Budgeted
from ensemblekit.components.halting.confidence import Confidence
from ensemblekit.components.halting.deadline import Deadline
from ensemblekit.components.halting.fixed import Fixed
from ensemblekit.components.halting.learned import Learned

BUILTIN_HALTING_POLICIES = {
    "fixed": Fixed,
    "confidence": Confidence,
    "budgeted": Budgeted,
    "deadline": Deadline,
    "learned": Learned,
}

__all__ = ["BUILTIN_HALTING_POLICIES", "Budgeted", "Confidence", "Deadline", "Fixed", "Learned"]
