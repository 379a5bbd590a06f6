"""The base of every ensemblekit exception, and the errors that no single layer owns.

Every exception class the package defines derives from [`EnsembleKitError`][ensemblekit.errors.EnsembleKitError]
(``except ek.EnsembleKitError`` catches any of them); most also keep the
builtin class callers caught before (``ValueError``, ``TypeError``,
``KeyError``, ...) as a second base. Warnings derive from
[`EnsembleKitWarning`][ensemblekit.errors.EnsembleKitWarning].

This module is the bottom layer: it imports nothing from ensemblekit.
"""

from __future__ import annotations

__all__ = [
    "EnsembleKitError",
    "EnsembleKitWarning",
    "InvalidTypeError",
    "InvalidValueError",
    "PathExistsError",
    "PathNotFoundError",
    "SplitError",
    "UnknownNameError",
]


class EnsembleKitError(Exception):
    """Base class of every exception raised by ensemblekit."""


class EnsembleKitWarning(UserWarning):
    """Base class of every warning category ensemblekit defines."""


class InvalidValueError(EnsembleKitError, ValueError):
    """An argument or setting with a value that is not allowed; the message names it and what is allowed."""


class InvalidTypeError(EnsembleKitError, TypeError):
    """An argument of a type that is not accepted, or an option a function does not take; the message names it."""


class UnknownNameError(EnsembleKitError, KeyError, ValueError):
    """A name looked up among known ones (a dataset, a kind of component, ...) that is not one of them.

    A ``KeyError`` (a failed lookup) and a ``ValueError`` (a bad argument
    value); its message lists the known names.
    """

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PathNotFoundError(EnsembleKitError, FileNotFoundError):
    """A file or folder the user named does not exist, or is not what was expected there."""


class PathExistsError(EnsembleKitError, FileExistsError):
    """A file or folder that would be overwritten exists already; the message says how to go on."""


class SplitError(EnsembleKitError, ValueError):
    """A model cannot be cut into blocks as asked; the message says why and what to pass instead."""
