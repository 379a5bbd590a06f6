"""Checkpoints that cannot be tricked: an edited manifest, a pointer leading outside, left-overs of killed saves,
a crash between the renames of an overwrite, backbone options that would read a pickle."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import ensemblekit as ek
from ensemblekit.backbones import BackboneOptionError, create_backbone
from ensemblekit.training import checkpoint as ckpt
from ensemblekit.training.checkpoint import CheckpointError
from ensemblekit.training.config import ConfigError, ModelConfig, build_ensemble

TINY = {"backbone": "resnet10t", "backbone_options": {"stem_width": 8, "channels": [8, 16, 16, 16]},
        "num_classes": 3, "image_size": 16}
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
X = torch.randn(2, 3, 32, 32)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
    torch.manual_seed(0)
    ens = ek.wrap(timm.create_model("test_resnet", num_classes=3), "tree", depth=1, aggregator="mean").eval()
    return ens, ek.save(ens, tmp_path_factory.mktemp("once") / "ckpt")


@pytest.fixture
def saved(saved_once, tmp_path):
    """A fresh copy of a saved ``wrap()`` ensemble: ``(ensemble, checkpoint folder)``."""
    ens, path = saved_once
    return ens, Path(shutil.copytree(path, tmp_path / "ckpt"))


def manifest_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def edit(path: Path, change) -> None:
    """Edit the manifest in place, as a user with a text editor would."""
    manifest = manifest_of(path)
    change(manifest)
    (path / "config.json").write_text(json.dumps(manifest, indent=2))


def as_old_version(path: Path, version: int = 2, change=lambda m: None) -> None:
    """Make the checkpoint what an ensemblekit before version 3 wrote (no manifest SHA-256 in its weights), changed."""
    weights = path / "model.safetensors"
    save_file(load_file(str(weights)), str(weights))  # the same tensors, no metadata
    manifest = manifest_of(path)
    manifest["version"] = version
    manifest["files"]["model.safetensors"] = {"bytes": weights.stat().st_size,
                                              "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    change(manifest)
    (path / "config.json").write_text(json.dumps(manifest, indent=2))


def refused(path, fragment: str, error: type = CheckpointError) -> str:
    with pytest.raises(error) as info:
        ek.load(path)
    assert fragment in str(info.value), str(info.value)
    assert isinstance(info.value, ek.EnsembleKitError)
    return str(info.value)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------ the manifest
def test_the_weights_record_the_manifests_checksum(saved):
    _, path = saved
    manifest = manifest_of(path)
    assert manifest["version"] == 3 and list(manifest["files"]) == ["model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert len(f.metadata()[ckpt.MANIFEST_DIGEST]) == 64


def test_an_edited_aggregator_is_refused(saved):
    _, path = saved
    edit(path, lambda m: m["ensemble"]["components"].update(aggregator={"name": "mean_probs"}))
    message = refused(path, "config.json was changed after the checkpoint was written: its SHA-256 differs from "
                            "the one recorded in")
    assert str(path / "model.safetensors") in message


def test_emptying_the_file_list_does_not_turn_the_checks_off(saved):
    _, path = saved
    edit(path, lambda m: (m["ensemble"]["components"].update(aggregator={"name": "mean_probs"}), m["files"].clear()))
    refused(path, f"{path / 'config.json'}: 'files' does not list model.safetensors, which every checkpoint holds")


LAYOUT_CASES = [
    ("a file outside the folder", lambda m: m["files"].update({"../../x": m["files"]["model.safetensors"]}),
     "'files' lists '../../x', which is not a checkpoint file"),
    ("a size that is a string", lambda m: m["files"]["model.safetensors"].update(bytes="12"),
     "files['model.safetensors'] is {'bytes': '12'"),
    ("a checksum that is not hexadecimal", lambda m: m["files"]["model.safetensors"].update(sha256="x" * 64),
     "expected {'bytes': <size>, 'sha256': <64 hexadecimal digits>}"),
    ("files not a mapping", lambda m: m.update(files=[]), "lacks its 'files' entry"),
    ("a version that is a string", lambda m: m.update(version="3"), "has format version '3'"),
    ("a version from the future", lambda m: m.update(version=4), "this ensemblekit reads versions 1 to 3"),
    ("a downgrade to version 2", lambda m: m.update(version=2),
     "says format version 2, but {weights} holds the manifest's SHA-256, which only version 3 writes"),
    ("a training state without its file", lambda m: m.update(trainer={"step": 1}),
     "'files' does not list trainer.safetensors, which every training checkpoint holds"),
]


@pytest.mark.parametrize(("what", "change", "fragment"), LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_the_layout_of_the_manifest_is_checked(saved, what, change, fragment):
    _, path = saved
    edit(path, change)
    refused(path, fragment.replace("{weights}", str(path / "model.safetensors")))


CONTENT_CASES = [
    ("an unknown aggregator", lambda r: r["components"].update(aggregator={"name": "evil"}),
     "ensemble.components.aggregator: unknown aggregator 'evil'. Known aggregator names: "),
    ("an option of a wrong type", lambda r: r["components"].update(topology={"name": "tree", "depth": "two"}),
     "ensemble.components.topology: topology 'tree': option depth='two' is not of type int"),
    ("an unknown option", lambda r: r["components"].update(loss={"name": "independent", "exec": "rm -rf"}),
     "ensemble.components.loss: loss 'independent' does not take exec"),
    ("an unknown kind", lambda r: r["components"].update(sampler={"name": "x"}),
     "ensemble.components names 'sampler', which is not a component"),
    ("a component missing", lambda r: r["components"].pop("topology"),
     "ensemble.components lacks topology, which a wrap() build names"),
    ("an unknown preparation", lambda r: r.update(preparations=[{"name": "os.system"}]),
     "ensemble.preparations[0] is {'name': 'os.system'}"),
    ("an unknown backbone", lambda r: r["build"]["wrap"]["backbone"].update(name="resnet999"),
     "ensemble.build.wrap.backbone: not a timm backbone spec"),
    ("a backbone reading a pickle", lambda r: r["build"]["wrap"]["backbone"]["kwargs"].update(
        checkpoint_path="/tmp/evil.pth"),
     "ensemble.build.wrap.backbone: option checkpoint_path='/tmp/evil.pth' is refused: timm would read that file "
     "with torch.load (pickle)"),
    ("a pretrained backbone", lambda r: r["build"]["wrap"]["backbone"]["kwargs"].update(pretrained=True),
     "ensemble.build.wrap.backbone: kwargs hold pretrained=True; a spec rebuilds the architecture only"),
    ("a bad class count", lambda r: r["build"]["wrap"].update(num_classes=-3),
     "ensemble.build.wrap.num_classes must be an integer >= 1 or null, got -3"),
    ("an unknown build", lambda r: r.update(build={"eval": "1"}), "ensemble.build must be 'config'"),
    ("an unknown recipe", lambda r: r.update(build={"recipe": {"name": "evil", "backbone": "resnet10t",
                                                               "options": {}}}),
     "ensemble.build.recipe: unknown recipe 'evil'"),
]


@pytest.mark.parametrize(("what", "change", "fragment"), CONTENT_CASES, ids=[c[0] for c in CONTENT_CASES])
def test_an_old_manifest_is_still_checked_for_what_it_names(saved, what, change, fragment):
    """A version 2 manifest has no checksum, so its contents are checked against the registries before building."""
    _, path = saved
    as_old_version(path, 2, lambda m: change(m["ensemble"]))
    refused(path, f"{path / 'config.json'}: {fragment}")


def test_old_checkpoints_still_load(saved):
    ens, path = saved
    as_old_version(path, 2)
    assert torch.equal(ek.load(path)(X), ens(X))


def test_a_model_config_asking_for_a_pickle_is_refused(tmp_path):
    torch.manual_seed(0)
    path = ckpt.save(build_ensemble(ModelConfig(**TINY)), tmp_path / "ckpt")
    as_old_version(path, 1, lambda m: (m.pop("ensemble"), m["model"]["backbone_options"].update(
        checkpoint_path="/tmp/evil.pth")))
    refused(path, f"{path / 'config.json'}: model.backbone_options: checkpoint_path='/tmp/evil.pth' is refused")
    as_old_version(path, 1, lambda m: (m["model"]["backbone_options"].pop("checkpoint_path"),
                                       m["model"].update(topology={"name": "forest"})))
    refused(path, "model.topology: unknown topology 'forest'")


def test_a_pretrained_backbone_is_rebuilt_without_reading_any_weights(tmp_path, monkeypatch):
    """The checkpoint's weights replace the backbone's: loading never downloads nor reads another file."""
    torch.manual_seed(0)
    model = build_ensemble(ModelConfig(**TINY)).eval()
    said = ModelConfig(**{**TINY, "pretrained_file": "/nowhere/w.pth", "init": "auto"})
    path = ckpt.write_checkpoint(tmp_path / "ckpt", model, said)

    def refuse(*args, **kwargs):
        raise AssertionError("a weights file or a download was attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)
    loaded = ek.load(path)
    assert loaded.build_config == said
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), model(x))


# ------------------------------------------------------------------ backbone options
def test_checkpoint_path_is_refused_from_python_and_from_a_config():
    with pytest.raises(BackboneOptionError, match=r"backbone option checkpoint_path='w.pth' is refused: timm would "
                                                  r"read that file with torch.load \(pickle\).*pretrained_cfg_overlay"):
        create_backbone("resnet10t", checkpoint_path="w.pth")
    config = ModelConfig(**{**TINY, "backbone_options": {"checkpoint_path": "w.pth"}})
    with pytest.raises(ConfigError, match="checkpoint_path='w.pth' is refused"):
        build_ensemble(config)


# ------------------------------------------------------------------ the latest pointer
def run_folder(saved, tmp_path) -> Path:
    """A run folder whose checkpoints/latest names the saved checkpoint."""
    _, path = saved
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.move(path, folder / "step-0000002")
    (folder / "latest").write_text("step-0000002\n")
    return tmp_path / "run"


@pytest.mark.parametrize("name", ["../../ckpt", "/etc", "step-0000002/../../x", "..", ".", ".step.tmp-1", "a\\b", ""])
def test_a_pointer_naming_a_path_is_refused(saved, tmp_path, name):
    run = run_folder(saved, tmp_path)
    (run / "checkpoints/latest").write_text(name)
    refused(run, f"{run / 'checkpoints/latest'} names {name!r}, refused: a 'latest' pointer holds the bare name of "
                 "a checkpoint folder in")


def test_a_pointer_leading_outside_through_a_link_is_refused(saved, tmp_path):
    ens, _ = saved
    run = run_folder(saved, tmp_path)
    assert torch.equal(ek.load(run)(X), ens(X))  # a plain pointer loads
    outside = tmp_path / "elsewhere"
    shutil.copytree(run / "checkpoints/step-0000002", outside)
    (run / "checkpoints/linked").symlink_to(outside, target_is_directory=True)
    (run / "checkpoints/latest").write_text("linked")
    refused(run, "the checkpoint it names leads outside the run's folder")
    (run / "checkpoints/latest").unlink()
    (tmp_path / "pointer").write_text("step-0000002")
    (run / "checkpoints/latest").symlink_to(tmp_path / "pointer")
    refused(run, "the pointer leads outside the run's folder")


# ------------------------------------------------------------------ left-overs of killed saves
def leftovers(folder: Path, pid: int) -> dict[str, Path]:
    """What killed saves leave next to a checkpoint folder ``folder / 'ckpt'``, written by process ``pid``."""
    made = {
        "killed save": folder / f".ckpt.tmp-{HOST}-{pid}-0badc0de",
        "older ensemblekit's": folder / ".ckpt.tmp-0badc0de",
        "killed pointer write": folder / f".latest.tmp-{HOST}-{pid}-0badc0de",
    }
    shutil.copytree(folder / "ckpt", made["killed save"])
    (made["killed save"] / "model.safetensors").write_bytes(b"half a file")
    made["older ensemblekit's"].mkdir()
    made["killed pointer write"].write_text("step-00")
    return made


def test_the_next_save_removes_what_killed_saves_left(saved):
    ens, path = saved
    folder = path.parent
    made = leftovers(folder, dead_pid())
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = {
            "a save still running": folder / f".ckpt.tmp-{HOST}-{live.pid}-0badc0de",
            "another machine's, recent": folder / ".ckpt.tmp-ffffffff-1-0badc0de",
            "not a checkpoint's": folder / ".notes.tmp-0badc0de",
        }
        for p in kept.values():
            p.mkdir()
        (kept["not a checkpoint's"] / "notes.txt").write_text("mine")
        old_other = folder / ".other.tmp-ffffffff-1-0badc0df"
        old_other.mkdir()
        os.utime(old_other, (time.time() - ckpt.STALE_AFTER - 60,) * 2)
        ek.save(ens, path, overwrite=True)
        assert not any(p.exists() for p in (*made.values(), old_other))
        assert all(p.exists() for p in kept.values())
        assert not [p for p in folder.iterdir() if ".old-" in p.name]
    finally:
        live.kill()
        live.wait()
    ek.save(ens, folder / "second")
    assert not kept["a save still running"].exists()  # its process has ended now
    assert torch.equal(ek.load(path)(X), ens(X))


# ------------------------------------------------------------------ a crash between the two renames
def crash_between_renames(path: Path, pid: int) -> Path:
    """The state a kill leaves after ``os.replace(ckpt, .ckpt.old-...)``, before ``os.replace(.ckpt.tmp-..., ckpt)``."""
    hidden = path.with_name(f".{path.name}.old-{HOST}-{pid}-12345678")
    new = path.with_name(f".{path.name}.tmp-{HOST}-{pid}-87654321")
    shutil.copytree(path, new)
    os.replace(path, hidden)
    return hidden


def test_load_finds_a_checkpoint_hidden_by_a_crash_between_renames(saved, tmp_path):
    ens, path = saved
    hidden = crash_between_renames(path, dead_pid())
    assert not path.exists()
    assert ckpt.resolve(path) == hidden
    assert torch.equal(ek.load(path)(X), ens(X))
    assert hidden.exists() and not path.exists()  # loading changes nothing on disk


def test_a_run_pointer_finds_it_too(saved, tmp_path):
    ens, _ = saved
    run = run_folder(saved, tmp_path)
    crash_between_renames(run / "checkpoints/step-0000002", dead_pid())
    assert torch.equal(ek.load(run)(X), ens(X))


def test_the_next_save_puts_it_back_and_cleans_up(saved):
    ens, path = saved
    crash_between_renames(path, dead_pid())
    with pytest.raises(FileExistsError):  # the checkpoint is back at its name: not overwritten by accident
        ek.save(ens, path)
    assert (path / "config.json").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]
    assert torch.equal(ek.load(path)(X), ens(X))


def test_clean_up_restores_it_even_while_the_writer_lives(saved):
    """Renaming back cannot wait: the two renames are microseconds apart, and a hidden checkpoint is lost to resume."""
    _, path = saved
    hidden = crash_between_renames(path, os.getpid())
    assert path in ckpt.clean_up(path.parent)
    assert (path / "config.json").exists() and not hidden.exists()


def test_a_failed_second_rename_puts_the_old_checkpoint_back(saved, monkeypatch):
    ens, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError("Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    changed = ek.wrap(timm.create_model("test_resnet", num_classes=3), "tree", depth=1, aggregator="mean")
    with pytest.raises(OSError, match="Input/output error"):
        ek.save(changed, path, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]
