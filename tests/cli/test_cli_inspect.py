"""``ensemblekit inspect --json``: machine-readable split, nodes, members, parameters and prefix costs;
``--image-size`` named as the config key, its old spellings kept with a warning."""

from __future__ import annotations

import json

import pytest

from ensemblekit.cli.main import main


def inspect_json(capsys, *args: str) -> dict:
    assert main(["inspect", "resnet10t", "--depth", "2", "--json", *args]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_inspect_json_is_the_split_nodes_members_params_and_prefix_costs(capsys):
    import ensemblekit as ek
    from ensemblekit.backbones import create_backbone

    data, err = inspect_json(capsys, "--image-size", "32")
    assert err == ""
    ens = ek.wrap(create_backbone("resnet10t", num_classes=10), "tree", depth=2)
    assert data["model"] == "resnet10t" and data["input_size"] == [3, 32, 32]
    assert data["params"] == sum(p.numel() for p in ens.parameters())
    assert (data["num_blocks"], data["num_nodes"], data["num_members"]) == (3, 7, 4)
    assert [block["copies"] for block in data["split"]] == [1, 2, 4]
    assert [node["parent"] for node in data["nodes"]] == [None, 0, 0, 1, 1, 2, 2]
    assert [m["path"] for m in data["members"]] == [list(m.path) for m in ens.graph.members]
    assert sorted(i for node in data["nodes"] for i in node["exit_of"]) == [0, 1, 2, 3]
    table = ens.cost_table(input_size=32)
    assert [row["flops"] for row in data["prefixes"]] == [row.flops for row in table]
    assert [row["params"] for row in data["prefixes"]] == [row.params for row in table]
    assert [row["new_nodes"] for row in data["prefixes"]] == [3, 1, 2, 1]
    assert data["prefixes"][0]["flops_vs_one_member"] == 1.0
    assert data["prefixes"][-1]["params"] == data["params"]  # all members: every parameter, shared ones once


@pytest.mark.parametrize("old", ["--img-size", "--input-size"])
def test_old_spellings_of_image_size_still_work_and_warn(capsys, old):
    data, err = inspect_json(capsys, old, "24", "32")
    assert data["input_size"] == [3, 24, 32]
    assert err == f"ensemblekit inspect: warning: {old} is deprecated and will be removed; use --image-size\n"


def test_help_names_image_size_only(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    out = capsys.readouterr().out
    assert "--image-size" in out and "--img-size" not in out and "--input-size" not in out
