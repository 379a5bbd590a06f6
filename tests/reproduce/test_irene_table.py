"""``ensemblekit reproduce irene`` on smoke settings: outputs, utility, claim, resume, refused settings."""

from __future__ import annotations

import argparse
import json

import pytest

from ensemblekit.methods.irene.woc import utility
from ensemblekit.reproduce import irene_table
from tests.reproduce.conftest import run_table, table_command


def command(out, *extra: str) -> list[str]:
    return table_command("irene", out, *extra)


@pytest.fixture(scope="module")
def finished(smoke_table):
    """A smoke table over two seeds: (its folder, exit code, standard output)."""
    return smoke_table("irene")


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
    assert "1 epoch(s) per member on a stratified subset of 128 images" in record["settings_text"]
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
    code, text, _ = run_table(["reproduce", "irene", "--smoke", "--seeds", "1", "--progress", "none",
                               "--out", str(out)])
    assert code == 0 and "settings: fashion-mnist --smoke" in text
    record = json.loads((out / "irene_table.json").read_text())
    assert record["data"] == "fashion-mnist" and record["complete"]
