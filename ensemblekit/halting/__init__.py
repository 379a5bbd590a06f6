"""Halting policies: per sample, when to stop adding members."""

from ensemblekit.halting.fixed import Fixed

BUILTIN_HALTING_POLICIES = {
    "fixed": Fixed,
}

__all__ = ["BUILTIN_HALTING_POLICIES", "Fixed"]
