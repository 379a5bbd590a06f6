"""Old module paths of ensemblekit, kept importable with a ``DeprecationWarning``.

Before the layered layout every module sat directly under ``ensemblekit``;
``import ensemblekit.topologies`` (and the like) still works and returns the
module's new home.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

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
