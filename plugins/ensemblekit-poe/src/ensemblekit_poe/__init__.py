"""Product-of-experts aggregation for ensemblekit, and halting on the product's support.

Installing the package registers (no import needed in user code):

* aggregator ``"poe"``: :class:`ProductOfExperts`;
* halting policy ``"poe_support"``: :class:`ProductSupportHalting`.

Example:
    >>> import ensemblekit as ek
    >>> ens = ek.wrap(model, "tree", depth=2, aggregator="poe", halting="poe_support")  # doctest: +SKIP
"""

from ensemblekit_poe.product import ProductOfExperts, ProductSupportHalting, support_size

__version__ = "0.1.0"

__all__ = ["ProductOfExperts", "ProductSupportHalting", "support_size"]
