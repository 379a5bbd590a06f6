"""ensemblekit: adaptive ensembles from any timm backbone.

>>> import timm, ensemblekit as ek
>>> ens = ek.wrap(timm.create_model("resnet10t", num_classes=10), topology="tree", depth=2)
>>> ens.num_members
4
"""

from importlib import import_module
from typing import Any

from ensemblekit import _moved, _timm_hook
from ensemblekit.core.registry import list_components
from ensemblekit.errors import EnsembleKitError
from ensemblekit.plugins import manager as _plugin_manager  # noqa: F401  (installs the registries' loader)
from ensemblekit.plugins.hookspecs import hookimpl

_moved.install()
_timm_hook.install()  # timm.create_model('ek_hne_resnet18') works once timm is imported

_LAZY = {
    "Aggregator": "ensemblekit.core.interfaces",
    "BlockSplit": "ensemblekit.core.blocks",
    "Ensemble": "ensemblekit.core.ensemble",
    "EnsembleOutput": "ensemblekit.core.interfaces",
    "Executor": "ensemblekit.core.interfaces",
    "HaltedPrediction": "ensemblekit.core.ensemble",
    "HaltingPolicy": "ensemblekit.core.interfaces",
    "HaltingStep": "ensemblekit.core.interfaces",
    "LossResult": "ensemblekit.core.interfaces",
    "LossStrategy": "ensemblekit.core.interfaces",
    "NodeCache": "ensemblekit.core.cache",
    "SharingTopology": "ensemblekit.core.graph",
    "aggregators": "ensemblekit.components.aggregators",
    "halting": "ensemblekit.components.halting",
    "load": "ensemblekit.training.checkpoint",
    "losses": "ensemblekit.components.losses",
    "recipes": "ensemblekit.methods",
    "save": "ensemblekit.training.checkpoint",
    "split": "ensemblekit.splitting",
    "topologies": "ensemblekit.components.topologies",
    "wrap": "ensemblekit.build",
}
"""Public names imported on first use, so that ``import ensemblekit`` (and ``ensemblekit --help``)
does not load torch and timm."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ensemblekit' has no attribute {name!r}")
    value = import_module(module)
    if not (name == module.rsplit(".", 1)[-1] or name == "recipes"):
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "BlockSplit",
    "Ensemble",
    "EnsembleKitError",
    "EnsembleOutput",
    "Executor",
    "HaltedPrediction",
    "HaltingPolicy",
    "HaltingStep",
    "LossResult",
    "LossStrategy",
    "NodeCache",
    "SharingTopology",
    "aggregators",
    "halting",
    "hookimpl",
    "list_components",
    "load",
    "losses",
    "recipes",
    "save",
    "split",
    "topologies",
    "wrap",
]
