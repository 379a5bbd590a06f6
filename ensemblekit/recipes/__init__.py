"""Recipes: each configures topology, aggregator and loss as its paper did.

``ek.recipes.hne``, ``ek.recipes.ensemblenet``, ``ek.recipes.multi_exit`` and
``ek.recipes.irene`` each live in their own module and are imported on first use.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_RECIPES = {
    "hne": "ensemblekit.recipes.hne",
    "ensemblenet": "ensemblekit.recipes.ensemblenet",
    "multi_exit": "ensemblekit.recipes.multi_exit",
    "irene": "ensemblekit.recipes.irene",
}

__all__ = sorted(_RECIPES)


def __getattr__(name: str) -> Any:
    if name not in _RECIPES:
        raise AttributeError(f"module 'ensemblekit.recipes' has no recipe {name!r}; recipes: {', '.join(__all__)}")
    return getattr(importlib.import_module(_RECIPES[name]), name)


class _RecipesModule(types.ModuleType):
    """Keeps ``recipes.<name>`` the recipe function once its submodule has been imported.

    Importing ``ensemblekit.recipes.hne`` (directly or through ``__getattr__``)
    binds the submodule to the package under the recipe's own name; this binds
    the recipe function instead.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _RECIPES and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _RecipesModule
