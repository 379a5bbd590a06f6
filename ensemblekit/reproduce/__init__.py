"""Paper experiments for ``ensemblekit reproduce``: one module per experiment, found by name.

A module here defines ``NAME`` (the subcommand, e.g. ``"hne-table1"``),
``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``;
`runs` holds what the tables share.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ["experiments"]


def experiments() -> list[ModuleType]:
    """Every experiment module of this package (those defining ``NAME``), sorted by module name."""
    names = sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
    modules = [importlib.import_module(f"{__name__}.{name}") for name in names]
    return [module for module in modules if hasattr(module, "NAME")]
