"""``ensemblekit reproduce NAME``: re-run a paper's experiment; one module per experiment.

Each module in `ensemblekit.reproduce` defines ``NAME`` (e.g.
``"hne-table1"``), ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``
and becomes a subcommand here. An experiment's ``--smoke`` (a seconds-long
check) also answers to its old name ``--tiny``, with a warning.
"""

from __future__ import annotations

import argparse

__all__ = ["HELP", "NAME", "add_arguments", "run"]

NAME = "reproduce"
HELP = "Re-run an experiment of a paper (see `ensemblekit reproduce -h` for the list)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ensemblekit.cli.options import add_deprecated_alias
    from ensemblekit.reproduce import experiments

    sub = parser.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for module in experiments():
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        if any("--smoke" in action.option_strings for action in command._actions):
            add_deprecated_alias(command, "--tiny", "--smoke")
        command.set_defaults(experiment_run=module.run)


def run(args: argparse.Namespace) -> int:
    return args.experiment_run(args)
