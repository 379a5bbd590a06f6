"""``wrap()`` leaves what it is given unchanged, and records how to build the ensemble again."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import ensemblekit as ek
from tests.conftest import toy_split


def test_wrap_leaves_the_callers_split_and_model_unchanged():
    split = toy_split(2, num_classes=5)
    head, blocks = split.head, list(split.blocks)
    ens = ek.wrap(split, "tree", depth=1, num_classes=7)  # replaced the split's head and num_classes before
    assert ens.num_classes == 7 and ens(torch.randn(2, 3, 8, 8)).shape == (2, 7)
    assert split.num_classes == 5 and split.head is head and split.blocks == blocks
    assert head[-1].out_features == 5
    model = timm.create_model("test_resnet", num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ek.wrap(model, "tree", depth=1, num_classes=7)
    assert model.num_classes == 5 and model.get_classifier().out_features == 5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_wrap_records_a_json_build_spec():
    ens = ek.wrap(timm.create_model("test_resnet", num_classes=5), "tree", depth=1, num_classes=7,
                  halting={"name": "budgeted", "q": 0.5})
    spec = json.loads(json.dumps(ens.build_spec))
    assert spec["wrap"]["backbone"] == {"kind": "timm", "name": "test_resnet", "kwargs": {"num_classes": 5}}
    assert spec["wrap"]["num_classes"] == 7 and spec["preparations"] == [] and spec["unsaveable"] == []
    from ensemblekit.build import component_spec

    assert component_spec(ens.halting, "halting") == {"name": "budgeted", "q": 0.5}  # the spec it was made from
    assert component_spec(ek.halting.Budgeted(thresholds=[0.5, -float("inf")]), "halting") == {
        "name": "budgeted", "q": None, "thresholds": [0.5, {"$float": "-inf"}], "ties": "early"}


def test_an_ensemble_whose_weights_cannot_fit_is_refused_before_it_is_built():
    """tree(depth=3, branching=40) is 64,000 members: refused with the numbers, in well under a second."""
    import time

    import timm

    backbone = timm.create_model("resnet18", num_classes=10)
    start = time.perf_counter()
    with pytest.raises(ek.EnsembleKitError, match=r"64,000 members and 65,641 block copies: their weights alone take"):
        ek.wrap(backbone, {"name": "tree", "depth": 3, "branching": 40})
    assert time.perf_counter() - start < 30
