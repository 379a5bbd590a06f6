"""Numbers in reports and tables: the one formatter, [`format_si`][ensemblekit.core.formatting.format_si].

Defined in the core (whose cost tables print with it) and re-exported here for the reports.
"""

from __future__ import annotations

from ensemblekit.core.formatting import format_si

__all__ = ["format_si"]
