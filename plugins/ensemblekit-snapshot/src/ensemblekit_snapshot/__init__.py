"""Snapshot Ensembles and Fast Geometric Ensembling for ensemblekit: M members for one network's training.

Installing the package registers two training schedules (no import needed in
user code):

* ``"snapshot"``: [`snapshot()`][ensemblekit_snapshot.schedules.snapshot], Huang et al. (2017),
  cyclic cosine annealing (Eq. 2), a snapshot at the end of each cycle;
* ``"fge"``: [`fge()`][ensemblekit_snapshot.schedules.fge], Garipov et al. (2018), a
  piecewise-linear cyclic rate after a first training, a snapshot at each cycle's minimum.

Each trains one network and leaves snapshot ``k`` in member ``k`` of an
ordinary ensemble of independent members (``topology = "independent"``).

Example:
    >>> import ensemblekit as ek
    >>> ens = ek.wrap(model, "independent", members=5, aggregator="mean_probs")  # doctest: +SKIP
    >>> train(ens, data, TrainConfig(epochs=40, lr=0.2, stages="snapshot"))      # doctest: +SKIP
"""

from ensemblekit_snapshot.schedules import (
    FGE_LOW_RATIO,
    ORDERS,
    CyclicLR,
    copy_member,
    fge,
    fge_lr,
    member_modules,
    snapshot,
    snapshot_lr,
    training_order,
)

__version__ = "0.1.0"

__all__ = [
    "FGE_LOW_RATIO",
    "ORDERS",
    "CyclicLR",
    "copy_member",
    "fge",
    "fge_lr",
    "member_modules",
    "snapshot",
    "snapshot_lr",
    "training_order",
]
