"""Recipes: each configures topology, aggregator and loss as its paper did.

* [`hne()`][ensemblekit.methods.hne]: HNE's tree with hierarchical distillation (Ruiz & Verbeek).
* [`ensemblenet()`][ensemblekit.methods.ensemblenet]: a shared trunk with narrow co-distilled branches (Lee et al.).
* [`multi_exit()`][ensemblekit.methods.imta.recipe.multi_exit]: a multi-exit chain with IMTA's training
  techniques (Li et al., ICCV 2019).
* `irene()`: a cascade with IRENE's learned halting selector (Li et al., AAAI 2023).
"""

from ensemblekit.methods.ensemblenet import ensemblenet
from ensemblekit.methods.hne import hne
from ensemblekit.methods.imta.recipe import multi_exit
from ensemblekit.methods.irene.recipe import irene

__all__ = ["ensemblenet", "hne", "irene", "multi_exit"]
