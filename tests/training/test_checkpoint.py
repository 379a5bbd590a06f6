"""Checkpoints: save -> load gives identical outputs; damage and mismatches fail clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import ensemblekit as ek
from ensemblekit.build import BuildSpecError
from ensemblekit.training import checkpoint
from ensemblekit.training.checkpoint import CheckpointError
from ensemblekit.training.config import ModelConfig, build_ensemble

ROOT = Path(__file__).resolve().parents[2]
TINY = {"backbone": "resnet10t", "backbone_options": {"stem_width": 8, "channels": [8, 16, 32, 64]},
        "num_classes": 10, "image_size": 16}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared CPU makes more threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**changes) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_ensemble(ModelConfig(**{**TINY, "topology": {"name": "tree", "depth": 2}, **changes}))


def perturbed(model, x=None):
    """Move BN statistics and weights off their initial values so a lost tensor would show (images like ``x``)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.train()
    model.forward_members(torch.randn(8, *((3, 16, 16) if x is None else x.shape[1:])))
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    model = perturbed(tiny())
    path = checkpoint.save(model, tmp_path / "ckpt")
    return model, path


def test_save_load_gives_identical_outputs(saved):
    model, path = saved
    loaded = ek.load(path)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert loaded.build_config == model.build_config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_load_in_a_fresh_process_never_unpickles(saved, tmp_path):
    model, path = saved
    x = torch.randn(3, 3, 16, 16)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = (
        "import pickle, sys, torch\n"
        "def refuse(*a, **k): raise AssertionError('unpickling attempted')\n"
        "torch.load = refuse; pickle.load = refuse; pickle.loads = refuse\n"
        "torch.set_num_threads(1)\n"
        "import ensemblekit as ek\n"
        "from safetensors.torch import load_file, save_file\n"
        f"m = ek.load({str(path)!r})\n"
        f"x = load_file({str(tmp_path / 'x.safetensors')!r})['x']\n"
        f"save_file({{'y': m(x).contiguous()}}, {str(tmp_path / 'y.safetensors')!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=120)
    assert torch.equal(load_file(str(tmp_path / "y.safetensors"))["y"], model(x))


def test_recipe_ensembles_round_trip(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(**{**TINY, "backbone_options": {}}, recipe="ensemblenet", recipe_options={"branches": 2})
    model = perturbed(build_ensemble(config))
    loaded = ek.load(checkpoint.save(model, tmp_path / "enet"))
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), model(x))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ek.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ek.load(tmp_path / "empty")


def test_missing_weights_file(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        ek.load(path)


def test_truncated_weights(saved):
    _, path = saved
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{file}.*truncated: 1000 bytes"):
        ek.load(path)


def test_corrupted_weights(saved):
    _, path = saved
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{file} is corrupted"):
        ek.load(path)


def test_truncated_manifest(saved):
    _, path = saved
    manifest = path / "config.json"
    manifest.write_text(manifest.read_text()[:50])
    with pytest.raises(CheckpointError, match=rf"{manifest} is not valid JSON"):
        ek.load(path)


def test_foreign_manifest(saved):
    _, path = saved
    (path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="not an ensemblekit checkpoint"):
        ek.load(path)


def test_other_topology_is_named(saved):
    _, path = saved
    other = tiny(topology={"name": "tree", "depth": 1})
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_weights(other, path)
    message = str(err.value)
    assert str(path / "model.safetensors") in message
    assert "topology: checkpoint {'name': 'tree', 'depth': 2}, model {'name': 'tree', 'depth': 1}" in message
    assert "tensors missing from the model" not in message and "the model lacks" in message


def test_save_never_overwrites_by_accident(saved):
    model, path = saved
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        checkpoint.save(model, path)
    assert (path / "model.safetensors").read_bytes() == before


def test_failed_overwrite_keeps_the_old_checkpoint(saved, monkeypatch):
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(checkpoint.CheckpointWriteError,
                       match="could not write checkpoint .*: No space left on device; the previous checkpoint is kept"):
        checkpoint.save(model, path, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary folder left


def test_overwrite_replaces_atomically(saved):
    model, path = saved
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    checkpoint.save(model, path, overwrite=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(ek.load(path)(x), model(x))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_an_ensemble_that_json_cannot_rebuild_is_refused_before_writing(tmp_path):
    from tests.conftest import toy_split

    with pytest.raises(ek.EnsembleKitError, match=r"backbone \(BlockSplit\) is not a timm model.*weights"):
        ek.save(ek.wrap(toy_split(2), "tree", depth=1), tmp_path / "x")
    sequential = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                                     torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                                         torch.nn.Linear(4, 3)))
    with pytest.raises(BuildSpecError, match=r"backbone \(Sequential\) is not a timm model"):
        ek.save(ek.wrap(sequential, "independent", members=2), tmp_path / "y")
    assert list(tmp_path.iterdir()) == []  # nothing written


# ------------------------------------------------- any ensemble wrap() or a recipe builds
def timm_backbone(classes: int = 4) -> torch.nn.Module:
    return timm.create_model("test_resnet", num_classes=classes)  # made by timm itself, not by ensemblekit


def round_trip(ens, tmp_path, x):
    """Save, load in a fresh ensemble, and check identical outputs, halted predictions and state."""
    path = ek.save(ens, tmp_path / "ens")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]  # JSON and safetensors only
    json.loads((path / "config.json").read_text())
    loaded = ek.load(path)
    assert type(loaded.halting) is type(ens.halting) and type(loaded.aggregator) is type(ens.aggregator)
    assert loaded.state_dict().keys() == ens.state_dict().keys()
    for (k, a), b in zip(ens.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(loaded.forward_members(x), ens.forward_members(x))
    if ens.halting is not None:
        ours, theirs = ens.predict(x), loaded.predict(x)
        assert torch.equal(theirs.prediction, ours.prediction)
        assert torch.equal(theirs.members_used, ours.members_used)
        assert len(set(ours.members_used.tolist())) > 1  # the halting really decided something
    return loaded


def stops_some(ens, x):
    """A confidence threshold that lets about half the samples stop at the first member."""
    with torch.no_grad():
        conf = ens.forward_output(x).prefixes().softmax(-1).amax(-1)
    return float(conf[:, 0].median())


def test_tree_with_a_timm_created_backbone_round_trips(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    ens = perturbed(ek.wrap(timm_backbone(), "tree", depth=2, aggregator="mean", num_classes=3), x)
    ens.halting = ek.halting.Confidence(stops_some(ens, x))
    loaded = round_trip(ens, tmp_path, x)
    assert loaded.num_members == 4 and loaded.topology.depth == 2 and loaded.num_classes == 3
    record = json.loads((tmp_path / "ens" / "config.json").read_text())["ensemble"]
    assert record["build"]["wrap"]["backbone"] == {"kind": "timm", "name": "test_resnet", "kwargs": {"num_classes": 4}}
    assert record["components"]["topology"] == {"name": "tree", "depth": 2}
    assert record["components"]["halting"]["name"] == "confidence"


def test_multi_branch_from_the_ensemblenet_recipe_round_trips(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    ens = ek.recipes.ensemblenet(timm_backbone(), branches=3, halting={"name": "confidence", "threshold": 0.0})
    ens.halting = ek.halting.Confidence(stops_some(perturbed(ens, x), x))
    round_trip(ens, tmp_path, x)
    record = json.loads((tmp_path / "ens" / "config.json").read_text())["ensemble"]
    assert record["build"]["recipe"]["name"] == "ensemblenet" and record["build"]["recipe"]["options"]["branches"] == 3


def test_chain_with_isc_added_after_building_round_trips(tmp_path):
    from ensemblekit.methods.imta.gradient_equilibrium import has_gradient_equilibrium
    from ensemblekit.methods.imta.isc import ISCExit, add_isc

    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    ens = ek.recipes.multi_exit(timm_backbone())
    add_isc(ens, mode="concat")  # what IMTA's phase II does
    ens.halting = ek.halting.Confidence(stops_some(perturbed(ens, x), x))
    loaded = round_trip(ens, tmp_path, x)
    assert all(isinstance(h, ISCExit) for h in loaded.heads[1:]) and has_gradient_equilibrium(loaded)


def test_cascade_with_learned_halting_round_trips(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    ens = perturbed(ek.wrap(timm_backbone(), "cascade", members=3, aggregator="mean_probs", halting="learned",
                            loss="irene"), x)
    with torch.no_grad():  # h_1 = 0.5 at the median sample: half of them halt after the first member
        ens.halting.out.bias.sub_(ens.forward_output(x).extras["halting_logits"][:, 0].median())
    ens.halting.mark_trained()
    loaded = round_trip(ens, tmp_path, x)
    assert loaded.halting.is_trained
    irene = ek.recipes.irene(timm_backbone(), members=2)
    irene.halting.mark_trained()
    assert torch.equal(ek.load(ek.save(irene.eval(), tmp_path / "irene")).forward_members(x), irene.forward_members(x))
    given = ek.wrap(timm_backbone(), "cascade", members=2, halting=ek.halting.Learned(hidden=8, cell="gru"))
    loaded = ek.load(ek.save(given.eval(), tmp_path / "object"))  # an object: its options read back
    assert (loaded.halting.hidden, loaded.halting.cell_type) == (8, "gru")
    logits = [e.forward_output(x).extras["halting_logits"] for e in (loaded, given)]
    assert torch.equal(*logits)


@pytest.mark.parametrize("given", ["by name", "as an object"])
def test_a_calibrated_budgeted_policy_round_trips(tmp_path, given):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    val = (torch.randn(40, 3, 32, 32), torch.randint(0, 4, (40,)))
    if given == "by name":
        ens = perturbed(ek.wrap(timm_backbone(), "chain", halting={"name": "budgeted", "q": 1.0}), x)
    else:
        ens = perturbed(ek.wrap(timm_backbone(), "chain"), x)
        ens.halting = ek.halting.Budgeted(q=1.0, ties="msdnet")
    ens.halting.calibrate(ens, val)
    loaded = round_trip(ens, tmp_path, x)
    assert torch.equal(loaded.halting.thresholds, ens.halting.thresholds)
    assert loaded.halting.ties == ens.halting.ties and loaded.halting.q == ens.halting.q


def test_a_config_built_ensemble_keeps_its_later_isc_heads(tmp_path):
    from ensemblekit.methods.imta.isc import add_isc

    torch.manual_seed(0)
    model = build_ensemble(ModelConfig(**{**TINY, "backbone_options": {}}, recipe="multi_exit"))
    add_isc(model)  # the two_phase schedule's phase II: the config alone rebuilt the heads without ISC
    x = torch.randn(4, 3, 16, 16)
    loaded = ek.load(checkpoint.save(perturbed(model, x), tmp_path / "imta"))
    assert loaded.build_config == model.build_config
    assert torch.equal(loaded.forward_members(x), model.forward_members(x))


def test_components_that_json_cannot_name_are_refused(tmp_path):
    from ensemblekit.components.aggregators import MeanLogits

    class Mine(MeanLogits):
        pass

    ens = ek.wrap(timm_backbone(), "tree", depth=1, aggregator=Mine())
    with pytest.raises(BuildSpecError, match="aggregator Mine is not registered under a name"):
        ek.save(ens, tmp_path / "x")
    ens = ek.wrap(timm_backbone(), "tree", depth=1, exit_head=lambda *a: None)
    with pytest.raises(BuildSpecError, match="exit_head .* is a custom factory"):
        ek.save(ens, tmp_path / "y")
    assert list(tmp_path.iterdir()) == []


def test_a_version_1_checkpoint_still_loads(saved):
    import hashlib

    model, path = saved
    weights = path / "model.safetensors"
    save_file(load_file(str(weights)), str(weights))  # version 1 recorded no manifest SHA-256 in the weights
    manifest = json.loads((path / "config.json").read_text())
    del manifest["ensemble"]
    manifest["files"]["model.safetensors"] = {"bytes": weights.stat().st_size,
                                              "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    (path / "config.json").write_text(json.dumps({**manifest, "version": 1}))
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(ek.load(path)(x), model(x))
