"""The entry point ``moe``: registers this package's aggregator with ensemblekit."""

from __future__ import annotations

import ensemblekit
from ensemblekit.plugins.hookspecs import Register
from ensemblekit_moe.gate import GatedMixture


@ensemblekit.hookimpl
def register_aggregators(register: Register) -> None:
    register("moe_gate", GatedMixture)
