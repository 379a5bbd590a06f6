"""Old module paths and names of ensemblekit, kept importable with a ``DeprecationWarning``.

Before the layered layout every module sat directly under ``ensemblekit``;
``import ensemblekit.topologies`` (and the like) still works and returns the
module's new home. Names that moved to a module of a higher layer
(``ensemblekit.splitting.narrow_model`` is now ``ensemblekit.backbones.narrow_model``)
are handed out by the old module's ``__getattr__`` through `moved_name()`,
which imports their new home by name, so the old module does not import upward.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

MOVED = {
    "ensemblekit.aggregators": "ensemblekit.components.aggregators",
    "ensemblekit.anytime": "ensemblekit.core.anytime",
    "ensemblekit.batching": "ensemblekit.core.batching",
    "ensemblekit.bench_memory": "ensemblekit.bench.memory",
    "ensemblekit.blocks": "ensemblekit.core.blocks",
    "ensemblekit.budget_eval": "ensemblekit.evaluation.budget",
    "ensemblekit.builtins": "ensemblekit.plugins.builtins",
    "ensemblekit.checkpoint": "ensemblekit.training.checkpoint",
    "ensemblekit.config": "ensemblekit.training.config",
    "ensemblekit.cost": "ensemblekit.core.cost",
    "ensemblekit.data": "ensemblekit.training.data",
    "ensemblekit.distributed": "ensemblekit.training.distributed",
    "ensemblekit.ensemble": "ensemblekit.core.ensemble",
    "ensemblekit.flops": "ensemblekit.core.flops",
    "ensemblekit.gradient_equilibrium": "ensemblekit.methods.imta.gradient_equilibrium",
    "ensemblekit.halting": "ensemblekit.components.halting",
    "ensemblekit.heads": "ensemblekit.core.heads",
    "ensemblekit.hookspecs": "ensemblekit.plugins.hookspecs",
    "ensemblekit.interfaces": "ensemblekit.core.interfaces",
    "ensemblekit.irene": "ensemblekit.methods.irene.woc",
    "ensemblekit.isc": "ensemblekit.methods.imta.isc",
    "ensemblekit.losses": "ensemblekit.components.losses",
    "ensemblekit.metrics": "ensemblekit.evaluation.reports",
    "ensemblekit.recipes": "ensemblekit.methods",
    "ensemblekit.registry": "ensemblekit.core.registry",
    "ensemblekit.topologies": "ensemblekit.components.topologies",
    "ensemblekit.train": "ensemblekit.training.trainer",
    "ensemblekit.wrap": "ensemblekit.build",
}

_BACKBONES = {name: "ensemblekit.backbones" for name in ("WIDTH_ARGS", "create_backbone", "narrow_model", "width_arg")}

MOVED_NAMES = {
    "ensemblekit.splitting": {**_BACKBONES, "UnknownBackboneError": "ensemblekit.backbones"},
    "ensemblekit.splitting.timm": _BACKBONES,
}
"""``{old module: {name: new module}}``: names that moved out of a module that still exists."""


def moved_name(module: str, name: str) -> Any:
    """``module.name`` for a name that moved (see `MOVED_NAMES`), with a ``DeprecationWarning``.

    Meant for the old module's ``__getattr__``: raises ``AttributeError`` for any other name.
    """
    new = MOVED_NAMES.get(module, {}).get(name)
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(new), name)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and hands out the module at its new one."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):  # noqa: ANN201
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> ModuleType:  # noqa: ANN001
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The module is the new one, already executed."""


def install() -> None:
    """Make the old paths importable (once per process)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
