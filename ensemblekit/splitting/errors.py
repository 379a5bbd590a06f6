"""The one exception the splitters raise."""

from __future__ import annotations


class SplitError(ValueError):
    """A model cannot be cut into blocks as asked; the message says why and what to pass instead."""
