"""The entry point ``snapshot``: registers this package's training schedules with ensemblekit."""

from __future__ import annotations

import ensemblekit
from ensemblekit.plugins.hookspecs import Register
from ensemblekit_snapshot.schedules import fge, snapshot


@ensemblekit.hookimpl
def register_schedules(register: Register) -> None:
    register("snapshot", snapshot)
    register("fge", fge)
