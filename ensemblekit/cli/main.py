"""The ``ensemblekit`` command: one subcommand per module in :mod:`ensemblekit.cli.commands`.

A command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. An error it raises (an ``EnsembleKitError``, a
``ValueError``, a missing or already existing file, ...) is printed on one
line, ``ensemblekit COMMAND: error: ...``, and the exit code is 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ensemblekit.cli import commands
from ensemblekit.errors import EnsembleKitError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ensemblekit", description="Adaptive ensembles from timm backbones.")
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"ensemblekit.cli.commands.{info.name}")
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (EnsembleKitError, ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError) as err:
        print(f"ensemblekit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
