"""ensemblekit: adaptive ensembles from any timm backbone.

>>> import timm, ensemblekit as ek
>>> ens = ek.wrap(timm.create_model("resnet10t", num_classes=10), topology="tree", depth=2)
>>> ens.num_members
4
"""

from ensemblekit import _moved
from ensemblekit import methods as recipes
from ensemblekit.backbones import entrypoints as _timm_entrypoints  # noqa: F401  (registers ek_* with timm)
from ensemblekit.build import wrap
from ensemblekit.components import aggregators, halting, losses, topologies
from ensemblekit.core.blocks import BlockSplit
from ensemblekit.core.cache import NodeCache
from ensemblekit.core.ensemble import Ensemble, HaltedPrediction
from ensemblekit.core.graph import SharingTopology
from ensemblekit.core.interfaces import (
    Aggregator,
    EnsembleOutput,
    Executor,
    HaltingPolicy,
    HaltingStep,
    LossResult,
    LossStrategy,
)
from ensemblekit.core.registry import list_components
from ensemblekit.errors import EnsembleKitError
from ensemblekit.plugins import manager as _plugin_manager  # noqa: F401  (installs the registries' loader)
from ensemblekit.plugins.hookspecs import hookimpl
from ensemblekit.splitting import split
from ensemblekit.training.checkpoint import load, save

_moved.install()

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
