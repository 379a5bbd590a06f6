"""Subcommands of the ``ensemblekit`` command line (see :mod:`ensemblekit.cli.main`)."""
