"""What the tests of the paper tables share: each table run once on smoke settings, and a guard that nothing trains."""

from __future__ import annotations

import contextlib
import io

import pytest

from ensemblekit.cli.main import main

TABLES = {
    "hne-table1": (("--seeds", "2"), 8),
    "ensemblenet-table1": (("--seeds", "2"), 8),
    "imta-table2": (("--seeds", "2"), 14),
    "irene": (("--seeds", "2"), 4),
    "pareto": ((), 8),
}
"""Experiment -> (the arguments of its smoke table beyond ``--smoke``, the runs that table stores)."""


def table_command(name: str, out, *extra: str) -> list[str]:
    """``ensemblekit reproduce NAME`` on digits, smoke settings, without progress bars, into ``out``."""
    return ["reproduce", name, "--data", "digits", "--smoke", "--progress", "none", "--out", str(out),
            *TABLES[name][0], *extra]


def run_table(argv: list[str]) -> tuple[int, str, str]:
    """``ensemblekit`` with ``argv``: exit code, standard output, standard error."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def smoke_table(tmp_path_factory):
    """``smoke_table(name)``: the smoke table of experiment ``name``, run once per session: (its folder, exit code,
    standard output). Tests that change it work on a copy."""
    finished: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in finished:
            out = tmp_path_factory.mktemp(name) / "table"
            code, text, _ = run_table(table_command(name, out))
            finished[name] = (out, code, text)
        return finished[name]

    return get


@pytest.fixture
def trains_nothing(monkeypatch):
    """Any training (a whole run or a training loop) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a run was trained")

    monkeypatch.setattr("ensemblekit.training.trainer.run", refuse)
    monkeypatch.setattr("ensemblekit.training.trainer.train", refuse)
