"""``ensemblekit reproduce irene`` on tiny settings: outputs, utility, claim, resume, refused settings."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil

import pytest

from ensemblekit.cli.main import main
from ensemblekit.methods.irene.woc import utility
from ensemblekit.reproduce import irene_table


def command(out, *extra: str) -> list[str]:
    return ["reproduce", "irene", "--data", "digits", "--tiny", "--progress", "none", "--out", str(out), *extra]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny table over two seeds: (its folder, exit code, standard output)."""
    out = tmp_path_factory.mktemp("irene-table") / "t"
    code, text, _ = run_cli(command(out, "--seeds", "2"))
    return out, code, text


@pytest.fixture
def trains_nothing(monkeypatch):
    """Any training fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a run was trained")

    monkeypatch.setattr("ensemblekit.training.trainer.train", refuse)


def test_the_table_runs_and_writes_its_outputs(finished):
    out, code, text = finished
    assert code == 0
    for method in irene_table.METHODS:
        assert f"| {method} |" in text
    assert "Top-1 (%)" in text and "Utility" in text
    record = json.loads((out / "irene_table.json").read_text())
    assert record["complete"] and record["runs_finished"] == 4 and record["seeds"] == [0, 1]
    assert list(record["ours"]) == list(irene_table.METHODS)
    assert record["settings"]["train_items"] == 128 and record["settings"]["members"] == 3
    assert "1 epoch(s) per member on the first 128 images" in record["settings_text"]
    assert record["settings_text"] in text
    for seed in ("0", "1"):
        assert 1.0 <= record["per_seed"][seed]["IRENE"]["cost"] <= 3.0
        assert record["per_seed"][seed]["Average ensemble"]["cost"] == 3.0
        assert sum(record["stops"][seed]["IRENE"]) == pytest.approx(1.0)
    assert len(record["woc_thresholds"]) == 2
    markdown = (out / "irene_table.md").read_text()
    assert "| IRENE |" in markdown and record["settings_text"] in markdown and "IRENE cost" in markdown
    for seed in (0, 1):
        for run in ("average", "irene"):
            assert (out / f"seed-{seed}" / run / "run.json").is_file()
            assert (out / f"seed-{seed}" / run / "model" / "model.safetensors").is_file()


def test_utility_is_eq14_relative_to_the_same_seeds_models(finished):
    record = json.loads((finished[0] / "irene_table.json").read_text())
    for rows in record["per_seed"].values():
        single, full = rows["Single model"]["top1"], rows["Average ensemble"]["top1"]
        for row in rows.values():
            expected = utility(row["top1"], row["cost"], single, full, 3) if full > single else None
            assert row["utility"] == (None if expected is None else pytest.approx(expected))


def test_the_claim_is_judged_and_stored(finished):
    out, _, text = finished
    record = json.loads((out / "irene_table.json").read_text())
    (claim,) = record["claims"]
    cost, accuracy = claim["comparisons"]
    assert (cost["left"], cost["right"], cost["strict"], cost["unit"]) == (
        "Average ensemble cost", "IRENE cost", True, "members")
    assert (accuracy["left"], accuracy["right"], accuracy["offset"], accuracy["unit"]) == (
        "IRENE top-1", "Average ensemble top-1", -irene_table.ACCURACY_TOLERANCE, "points")
    rows = record["per_seed"].values()
    assert cost["margin"] == pytest.approx(sum(3.0 - r["IRENE"]["cost"] for r in rows) / 2)
    assert accuracy["margin"] == pytest.approx(
        sum(r["IRENE"]["top1"] - r["Average ensemble"]["top1"] for r in rows) / 2 + 0.5)
    assert claim["holds"] == (cost["margin"] > 0 and accuracy["margin"] >= 0)
    assert "Average ensemble cost > IRENE cost: margin" in text and " members (seed std" in text


def test_a_second_run_reuses_every_finished_run(finished, tmp_path, trains_nothing):
    out = tmp_path / "t"
    shutil.copytree(finished[0], out)
    code, text, _ = run_cli(command(out, "--seeds", "2"))
    assert code == 0 and text.count("finished earlier, reused") == 4


def test_other_settings_in_the_same_folder_are_refused(finished, tmp_path, trains_nothing):
    out = tmp_path / "t"
    shutil.copytree(finished[0], out)
    code, _, err = run_cli(command(out, "--seeds", "2", "--cost-weight", "0.3"))
    assert code == 2 and "other settings" in err and len(err.strip().splitlines()) == 1


def test_full_needs_a_dataset_with_the_papers_schedule(tmp_path):
    code, _, err = run_cli(command(tmp_path / "t", "--full"))
    assert code == 2 and "no paper schedule for digits" in err


def test_default_and_full_settings():
    parser = argparse.ArgumentParser()
    irene_table.add_arguments(parser)
    default = irene_table.settings(parser.parse_args(["--data", "fashion-mnist"]))
    assert (default["backbone"], default["backbone_options"], default["image_size"]) == (
        "resnet10t", {"stem_width": 8, "channels": [16, 32, 64, 128]}, 28)
    assert (default["epochs"], default["batch_size"], default["train_items"], default["augment"]) == (
        3, 128, None, False)
    full = irene_table.settings(parser.parse_args(["--data", "cifar10", "--full"]))
    assert (full["backbone"], full["epochs"], full["batch_size"], full["lr"], full["train_items"]) == (
        "resnet18", 200, 128, 0.1, None)


def test_the_table_shows_the_papers_numbers():
    rows = {m: {"top1": 90.0 + i, "cost": 1.0 + i, "utility": 1.0} for i, m in enumerate(irene_table.METHODS)}
    mean, std = irene_table.summarise({0: rows})
    record = {"data": "cifar10", "seeds": [0], "runs_finished": 2, "runs_total": 2, "ours": mean, "std": std,
              "per_seed": {"0": rows}, "woc_thresholds": [0.5], "stops": {}, "paper": irene_table.PAPER["cifar10"]}
    text = irene_table.table(record)
    assert "paper ResNet-18 Top-1" in text
    assert "| IRENE | 93.00 | 4.00 | 1.00 | 94.46 | 2.21 | 1.37 | 95.81 | 1.32 | 3.10 |" in text


def test_fashion_mnist_is_the_default_where_its_files_are(fashion_mnist_env, tmp_path):
    out = tmp_path / "t"
    code, text, _ = run_cli(["reproduce", "irene", "--tiny", "--seeds", "1", "--progress", "none", "--out", str(out)])
    assert code == 0 and "settings: fashion-mnist --tiny" in text
    record = json.loads((out / "irene_table.json").read_text())
    assert record["data"] == "fashion-mnist" and record["complete"]
