"""Halting policies: per sample, when to stop adding members."""

from ensemblekit.halting.deadline import Deadline
from ensemblekit.halting.fixed import Fixed
from ensemblekit.halting.learned import Learned

BUILTIN_HALTING_POLICIES = {
    "fixed": Fixed,
    "deadline": Deadline,
    "learned": Learned,
}

__all__ = ["BUILTIN_HALTING_POLICIES", "Deadline", "Fixed", "Learned"]
