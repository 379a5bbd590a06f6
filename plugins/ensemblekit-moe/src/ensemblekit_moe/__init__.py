"""A mixture-of-experts aggregator for ensemblekit: a learned gate weights members per sample.

Installing the package registers the aggregator ``"moe_gate"``
(:class:`GatedMixture`); no import is needed in user code.

Example:
    >>> import ensemblekit as ek
    >>> ens = ek.wrap(model, "tree", depth=2, aggregator="moe_gate", loss="nested")  # doctest: +SKIP
"""

from ensemblekit_moe.gate import GatedMixture, confidence_features

__version__ = "0.1.0"

__all__ = ["GatedMixture", "confidence_features"]
