"""``ensemblekit reproduce ensemblenet-table1`` on smoke settings, and the EnsembleNet recipe it trains."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ensemblekit as ek
from ensemblekit.backbones import create_backbone
from ensemblekit.reproduce import ensemblenet_table1 as table1
from tests.reproduce.conftest import run_table, table_command

QUARTER = {"stem_width": 8, "channels": [16, 32, 64, 128]}
ROW_FOLDERS = ("baseline", "lambda-0", "lambda--1.5", "mu-3")


def command(out, *extra: str) -> list[str]:
    return table_command("ensemblenet-table1", out, *extra)


@pytest.fixture(scope="module")
def finished(smoke_table):
    """A smoke table over two seeds: (its folder, exit code, standard output)."""
    return smoke_table("ensemblenet-table1")


def test_the_table_runs_and_writes_its_outputs(finished):
    out, code, text = finished
    assert code == 0
    assert "EnsembleNet Table 1 on digits" in text and "paper ResNet-152" in text
    for label in table1.ROWS:
        assert f"\n{label} " in text
    record = json.loads((out / "ensemblenet_table1.json").read_text())
    assert record["complete"] and record["runs_finished"] == 8 and record["seeds"] == [0, 1]
    assert set(record["ours"]) == set(table1.ROWS) and set(record["ours"]["mu=3"]) == {"ensemble", "branches"}
    assert record["paper"]["ResNet-152"]["mu=3"]["top1"] == 80.58
    assert record["settings"]["train_items"] == 128 and record["settings"]["width"] == table1.PAPER_WIDTH
    assert "1 epoch on a stratified subset of 128 images" in record["settings_text"] and record["settings_text"] in text
    markdown = (out / "ensemblenet_table1.md").read_text()
    assert "| mu=3 |" in markdown and "80.58" in markdown and record["settings_text"] in markdown
    for seed in (0, 1):
        assert all((out / f"seed-{seed}" / row / "run.json").is_file() for row in ROW_FOLDERS)


def test_rows_have_equal_parameters_within_the_stated_tolerance(finished):
    out, _, text = finished
    record = json.loads((out / "ensemblenet_table1.json").read_text())
    sizes = record["sizes"]
    assert sizes["Baseline"]["relative_params"] == 0
    for label in ("lambda=0", "lambda=-1.5", "mu=3"):
        assert abs(sizes[label]["relative_params"]) <= table1.PARAMS_TOLERANCE == record["params_tolerance"]
        assert sizes[label]["block_widths"][-2:] == [48, 88]  # 64 and 128 channels narrowed by 176/256
        assert f"{sizes[label]['params']:,} params" in text
    for row, label in zip(ROW_FOLDERS, table1.ROWS):  # what was trained is what was counted
        report = json.loads((out / "seed-0" / row / "run.json").read_text())["result"]["report"]
        assert report["prefix_params"][-1] == sizes[label]["params"]


def test_claims_are_judged_and_stored(finished):
    out, _, text = finished
    record = json.loads((out / "ensemblenet_table1.json").read_text())
    chain, negative = record["claims"]
    assert chain["claim"].startswith("co-distillation (mu=3) >= lambda=0 >= single backbone")
    assert [(c["left"], c["right"]) for c in chain["comparisons"]] == [("mu=3", "lambda=0"), ("lambda=0", "Baseline")]
    assert [(c["left"], c["right"]) for c in negative["comparisons"]] == [("lambda=-1.5", "lambda=0")]
    per_seed = record["per_seed"]
    differences = [per_seed[s]["mu=3"]["ensemble"] - per_seed[s]["lambda=0"]["ensemble"] for s in ("0", "1")]
    assert chain["comparisons"][0]["margin"] == pytest.approx(sum(differences) / 2)
    assert chain["holds"] == all(c["margin"] >= 0 for c in chain["comparisons"])
    assert "mu=3 >= lambda=0: margin" in text and ("holds" in text or "does not hold" in text)


def test_a_table_killed_halfway_continues_from_its_finished_runs(finished, tmp_path):
    out = tmp_path / "t1"
    shutil.copytree(finished[0], out)
    (out / "seed-1" / "mu-3" / "run.json").unlink()  # killed after its last checkpoint, before its record
    code, text, _ = run_table(command(out))
    assert code == 0 and text.count("finished earlier, reused") == 7 and "== mu=3, seed 1\n" in text
    assert json.loads((out / "seed-1" / "mu-3" / "run.json").read_text())["result"]["resumed"]


@pytest.mark.parametrize("full", [False, True])
def test_default_and_full_settings_keep_parameters_equal(fashion_mnist_env, full):
    args = table1_args("--data", "fashion-mnist", *(["--full"] if full else []))
    chosen = table1.settings(args)
    assert (chosen["backbone"], chosen["train_split"]) == (("resnet18", "trainval") if full else ("resnet10t", "train"))
    sizes = table1.model_sizes(table1.configs(args))
    assert all(abs(size["relative_params"]) <= table1.PARAMS_TOLERANCE for size in sizes.values())


def table1_args(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    table1.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_claims_pair_the_seeds():
    accuracy = {seed: {label: {"ensemble": value + seed, "branches": value}
                       for label, value in (("Baseline", 90.0), ("lambda=0", 91.0), ("lambda=-1.5", 90.5),
                                            ("mu=3", 91.5))} for seed in (0, 1)}
    chain, negative = table1.claims(accuracy)
    assert chain.holds and [c.margin for c in chain.comparisons] == [0.5, 1.0]
    assert not negative.holds and negative.comparisons[0].margin == -0.5
    del accuracy[1]["mu=3"]  # a seed with a row unfinished is left out of the pairs
    assert table1.claims(accuracy)[0].comparisons[0].left_values == [91.5]


# ------------------------------------------------------------------ the recipe (methods/ensemblenet.py)
def branch_nodes(ens, member: int) -> list[torch.nn.Module]:
    fork = ens.topology.fork_block(len(ens.graph.levels))
    return [ens.nodes[i] for i in ens.graph.members[member].path if ens.graph.nodes[i].block >= fork]


def named(modules, suffix: str) -> list[torch.Tensor]:
    return [p for m in modules for name, p in m.named_parameters() if name.endswith(suffix)]


def test_ensemblenet_narrows_the_width_a_backbone_was_created_with():
    torch.manual_seed(0)
    base = create_backbone("resnet10t", num_classes=10, **QUARTER)
    ens = ek.recipes.ensemblenet(base, width=table1.PAPER_WIDTH)
    assert ens.heads[0].fc.in_features == 88  # 128 channels, not timm's default 512, narrowed
    size = sum(p.numel() for p in ens.parameters()) / sum(p.numel() for p in base.parameters()) - 1
    assert abs(size) <= table1.PARAMS_TOLERANCE


def test_ensemblenet_branches_are_independent_draws_of_the_backbones_own_init():
    torch.manual_seed(0)
    ens = ek.recipes.ensemblenet(create_backbone("resnet10t", num_classes=10, **QUARTER), width=0.5)
    branches = [branch_nodes(ens, m) for m in range(2)]
    for nodes in branches:  # timm's zero_init_last: every residual's last norm starts at 0 in every branch
        assert all(bool((w == 0).all()) for w in named(nodes, "bn2.weight"))
    first, second = (named(nodes, "conv1.weight") for nodes in branches)
    for a, b in zip(first, second):  # timm's kaiming fan-out draw in both, not reset_parameters' in the second
        assert not torch.equal(a, b) and b.std().item() == pytest.approx(a.std().item(), rel=0.2)


@pytest.mark.parametrize("init", ["pretrained", "auto", {"name": "pretrained+noise", "scale": 0.1}])
def test_ensemblenet_branches_differ_under_every_init_but_copy(init):
    torch.manual_seed(0)
    base = create_backbone("resnet10t", num_classes=10, **QUARTER)
    differ = ek.recipes.ensemblenet(base, width=0.5, init=init)
    same = ek.recipes.ensemblenet(base, width=0.5, init="copy")
    assert not torch.equal(differ.heads[0].fc.weight, differ.heads[1].fc.weight)
    assert torch.equal(same.heads[0].fc.weight, same.heads[1].fc.weight)
    for ens, equal in ((differ, False), (same, True)):
        pairs = zip(*(named(branch_nodes(ens, m), "conv1.weight") for m in range(2)))
        assert all(torch.equal(a, b) == equal for a, b in pairs)
