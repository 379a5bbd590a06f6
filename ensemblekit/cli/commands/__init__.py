"""Subcommands of the ``ensemblekit`` command line (see `ensemblekit.cli.main`)."""
