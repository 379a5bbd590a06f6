"""Recipes: each configures topology, aggregator and loss as its paper did.

* :func:`hne`: HNE's tree with hierarchical distillation (Ruiz & Verbeek).
* :func:`ensemblenet`: a shared trunk with narrow co-distilled branches (Lee et al.).
* :func:`multi_exit`: a multi-exit chain with IMTA's training techniques (Li et al., ICCV 2019).
* :func:`irene`: a cascade with IRENE's learned halting selector (Li et al., AAAI 2023).
"""

from ensemblekit.methods.ensemblenet import ensemblenet
from ensemblekit.methods.hne import hne
from ensemblekit.methods.imta.recipe import multi_exit
from ensemblekit.methods.irene.recipe import irene

__all__ = ["ensemblenet", "hne", "irene", "multi_exit"]
