"""Halting policies: per sample, when to stop adding members."""

from ensemblekit.halting.budgeted import Budgeted
from ensemblekit.halting.confidence import Confidence
from ensemblekit.halting.deadline import Deadline
from ensemblekit.halting.fixed import Fixed
from ensemblekit.halting.learned import Learned

BUILTIN_HALTING_POLICIES = {
    "fixed": Fixed,
    "confidence": Confidence,
    "budgeted": Budgeted,
    "deadline": Deadline,
    "learned": Learned,
}

__all__ = ["BUILTIN_HALTING_POLICIES", "Budgeted", "Confidence", "Deadline", "Fixed", "Learned"]
