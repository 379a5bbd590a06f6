"""Options the commands share: old spellings of a flag kept working, with a warning.

One idea has one name on the command line (``--smoke`` for a seconds-long
check, ``--image-size`` as the config key ``image_size``); an older name stays
accepted, hidden from ``--help``, and says on stderr which name to use.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["add_deprecated_alias"]


class _DeprecatedAlias(argparse.Action):
    """Stores what the new flag would, and prints ``PROG: warning: OLD is deprecated; use NEW`` on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed; use {self.new}",
              file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """Accept ``old`` as ``new`` (added to ``parser`` before), hidden from the help, with a warning when used.

    ``kwargs`` are those of the new flag that read its value (``type``, ``nargs``); a flag without a value
    (``store_true``) needs none.

    Examples:
        >>> parser = argparse.ArgumentParser(prog="demo")
        >>> _ = parser.add_argument("--smoke", action="store_true")
        >>> add_deprecated_alias(parser, "--tiny", "--smoke")
        >>> parser.parse_args(["--tiny"]).smoke  # prints "demo: warning: --tiny is deprecated ..." on stderr
        True
    """
    action = next(a for a in parser._actions if new in a.option_strings)
    if not kwargs and action.nargs == 0:
        kwargs = {"nargs": 0, "const": action.const}
    parser.add_argument(old, action=_DeprecatedAlias, new=new, dest=action.dest, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, metavar=action.metavar, **kwargs)
