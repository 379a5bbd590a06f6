"""Numbers in reports and tables: one formatter for FLOPs, parameters and other counts.

It lives in the core so that the core's own tables (the cost table of an
ensemble) and the reports of the evaluation layer print numbers the same way.
"""

from __future__ import annotations

__all__ = ["format_si"]

_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def format_si(x: float) -> str:
    """``x`` with an SI prefix and two decimals from a thousand up, else 4 significant digits.

    Examples:
        >>> format_si(1.5e9), format_si(2048), format_si(576), format_si(0.25)
        ('1.50G', '2.05k', '576', '0.25')
    """
    for scale, unit in _PREFIXES:
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.4g}"
