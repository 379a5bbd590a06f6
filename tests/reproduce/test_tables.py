"""What every paper table does alike (``ensemblekit.reproduce.runs``): resume from its finished runs, refuse a
folder of other settings before training anything, and report a wrong argument on one line."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from ensemblekit.reproduce import experiments
from tests.reproduce.conftest import TABLES, run_table, table_command

STARTED = re.compile(r"^== .*, seed \d+$", re.MULTILINE)
"""The line a run prints when it starts training (a reused run's line goes on)."""


@pytest.fixture
def finished(name, smoke_table):
    """The smoke table of experiment ``name`` (request it before ``trains_nothing``, which would refuse building it)."""
    return smoke_table(name)


def test_every_experiment_is_covered():
    assert {module.NAME for module in experiments()} == set(TABLES)


@pytest.mark.parametrize("name", TABLES)
def test_a_second_run_reuses_every_finished_run(name, finished, tmp_path, trains_nothing):
    folder, code, _ = finished
    assert code == 0
    out = tmp_path / "table"
    shutil.copytree(folder, out)
    code, text, err = run_table(table_command(name, out))
    assert (code, err) == (0, "")
    assert text.count("finished earlier, reused") == TABLES[name][1] and not STARTED.search(text)


@pytest.mark.parametrize("name", TABLES)
def test_other_settings_in_the_same_folder_are_refused_before_anything_trains(name, finished, tmp_path,
                                                                              trains_nothing):
    out = tmp_path / "table"
    shutil.copytree(finished[0], out)
    unfinished = sorted(out.glob("seed-*/*/run.json"))[0]
    unfinished.unlink()  # a run that other settings would train before reaching a finished one
    code, text, err = run_table(table_command(name, out, "--lr", "0.2"))
    assert code == 2 and not STARTED.search(text) and "== " not in text
    assert err.startswith("ensemblekit reproduce: error: ") and "other settings" in err
    assert len(err.strip().splitlines()) == 1
    assert not unfinished.exists()


@pytest.mark.parametrize("name", TABLES)
def test_fewer_than_one_seed_is_refused_on_one_line(name, tmp_path):
    code, text, err = run_table(table_command(name, tmp_path / "table", "--seeds", "0"))
    assert code == 2 and text == "" and not (tmp_path / "table").exists()
    assert re.fullmatch(r"ensemblekit reproduce: error: (--seeds|--seeds, .*) must be at least 1\n", err)


@pytest.mark.parametrize("name", [name for name in TABLES if name != "pareto"])
def test_full_needs_a_dataset_with_the_papers_schedule(name, tmp_path):
    code, _, err = run_table(table_command(name, tmp_path / "table", "--full"))
    assert code == 2 and re.search(r"--full: .* schedule for digits; choose --data from ", err)


def test_a_stored_run_keeps_its_settings(smoke_table):
    """``run.json`` holds the settings and the result, with the time the run took and whether it resumed."""
    finished, _, _ = smoke_table("irene")
    record = json.loads((finished / "seed-0" / "irene" / "run.json").read_text())
    assert record["settings"]["seed"] == 0 and record["settings"]["members"] == 3
    assert record["result"]["resumed"] is False and record["result"]["seconds"] > 0
