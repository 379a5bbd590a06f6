"""ensemblekit: adaptive ensembles from any timm backbone.

>>> import timm, ensemblekit as ek
>>> ens = ek.wrap(timm.create_model("resnet10t", num_classes=10), topology="tree", depth=2)
>>> ens.num_members
4
"""

from ensemblekit import aggregators, halting, losses, recipes, topologies
from ensemblekit.blocks import BlockSplit
from ensemblekit.checkpoint import load
from ensemblekit.ensemble import Ensemble, HaltedPrediction, NodeCache
from ensemblekit.hookspecs import hookimpl
from ensemblekit.interfaces import (
    Aggregator,
    EnsembleOutput,
    HaltingPolicy,
    HaltingStep,
    LossResult,
    LossStrategy,
)
from ensemblekit.splitting import split
from ensemblekit.topologies import SharingTopology
from ensemblekit.wrap import wrap

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "BlockSplit",
    "Ensemble",
    "EnsembleOutput",
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
    "load",
    "losses",
    "recipes",
    "split",
    "topologies",
    "wrap",
]
