"""The base of every ensemblekit exception, and the errors that no single layer owns.

Every exception class the package defines derives from [`EnsembleKitError`][ensemblekit.errors.EnsembleKitError]
(``except ek.EnsembleKitError`` catches any of them); most also keep the
builtin class callers caught before (``ValueError``, ``TypeError``,
``KeyError``, ...) as a second base. Warnings derive from
[`EnsembleKitWarning`][ensemblekit.errors.EnsembleKitWarning].

This module is the bottom layer: it imports nothing from ensemblekit.
"""

from __future__ import annotations

__all__ = ["EnsembleKitError", "EnsembleKitWarning", "SplitError"]


class EnsembleKitError(Exception):
    """Base class of every exception raised by ensemblekit."""


class EnsembleKitWarning(UserWarning):
    """Base class of every warning category ensemblekit defines."""


class SplitError(EnsembleKitError, ValueError):
    """A model cannot be cut into blocks as asked; the message says why and what to pass instead."""
