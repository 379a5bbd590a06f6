"""The one exception the splitters raise (defined in [`ensemblekit.errors`][ensemblekit.errors], kept importable
here)."""

from __future__ import annotations

from ensemblekit.errors import SplitError

__all__ = ["SplitError"]
