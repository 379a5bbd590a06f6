"""Checkpoints: save -> load gives identical outputs; damage and mismatches fail clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ensemblekit as ek
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


def perturbed(model):
    """Move BN statistics and weights off their initial values so a lost tensor would show."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.train()
    model(torch.randn(8, 3, 16, 16))
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
    with pytest.raises(OSError, match="No space"):
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


def test_an_ensemble_without_a_config_cannot_be_saved(tmp_path):
    from tests.conftest import toy_split

    with pytest.raises(ValueError, match="build_config"):
        checkpoint.save(ek.wrap(toy_split(2), "tree", depth=1), tmp_path / "x")
