"""The entry point ``poe``: registers this package's components with ensemblekit."""

from __future__ import annotations

import ensemblekit
from ensemblekit.plugins.hookspecs import Register
from ensemblekit_poe.product import ProductOfExperts, ProductSupportHalting


@ensemblekit.hookimpl
def register_aggregators(register: Register) -> None:
    register("poe", ProductOfExperts)


@ensemblekit.hookimpl
def register_halting_policies(register: Register) -> None:
    register("poe_support", ProductSupportHalting)
