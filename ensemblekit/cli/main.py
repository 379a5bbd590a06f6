"""The ``ensemblekit`` command: one subcommand per module in `ensemblekit.cli.commands`.

A command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. A ``--device`` option is checked before the command
runs (a name torch does not know, or a device this machine lacks). A user's mistake, an
[`EnsembleKitError`][ensemblekit.errors.EnsembleKitError] (what ensemblekit
raises for bad input, a missing or already existing file, ...), is printed
on one line, ``ensemblekit COMMAND: error: ...``, and the exit code is 2
(``--debug`` raises it, with its traceback). Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ensemblekit.cli import commands
from ensemblekit.errors import EnsembleKitError

__all__ = ["build_parser", "is_user_error", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ensemblekit", description="Adaptive ensembles from timm backbones.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"ensemblekit.cli.commands.{info.name}")
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def _version() -> str:
    """``ensemblekit X (torch Y, timm Z)``, read from the installed packages' metadata (no import)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return f"ensemblekit {of('ensemblekit')} (torch {of('torch')}, timm {of('timm')})"


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is a user's mistake: an [`EnsembleKitError`][ensemblekit.errors.EnsembleKitError].

    ensemblekit raises one of these for every mistake of its user; a builtin
    ``ValueError``, ``TypeError``, ``OSError``, ... (raised by torch, say, or
    by a plugin) is not one, so it keeps its traceback.
    """
    return isinstance(err, EnsembleKitError)


def _check_device(args: argparse.Namespace) -> None:
    """Refuse a ``--device`` that is not one (``banana``) or that this machine lacks, before any work."""
    name = getattr(args, "device", None)
    if name is None:
        return
    from ensemblekit.training.trainer import DeviceError, select_device

    try:
        select_device(name)
    except DeviceError as err:
        raise DeviceError(f"--device: {err}") from None


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user's mistake prints one line and returns 2 (``--debug``: its traceback too)."""
    args = build_parser().parse_args(argv)
    try:
        _check_device(args)
        return args.run(args)
    except Exception as err:
        if args.debug or not is_user_error(err):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"ensemblekit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
