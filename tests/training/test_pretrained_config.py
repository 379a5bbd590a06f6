"""Pretrained weights offline: model.pretrained / model.pretrained_file in configs, the CLI and checkpoints;
ImageFolder transforms from timm's data config; report.json records where its numbers come from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import ensemblekit as ek
from ensemblekit.cli.main import main
from ensemblekit.training.config import ConfigError, ModelConfig, RunConfig, build_ensemble, load_config
from ensemblekit.training.trainer import run as run_training

WIDTHS = {"stem_width": 8, "channels": [8, 16, 32, 64]}
TINY = {"backbone": "resnet10t", "backbone_options": WIDTHS, "num_classes": 10, "image_size": 16,
        "topology": {"name": "tree", "depth": 1}}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def weights(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A weights file of the tiny backbone, written by the test (as a trained model's would be)."""
    torch.manual_seed(3)
    model = timm.create_model("resnet10t", num_classes=10, **WIDTHS)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # trained: unlike any fresh draw
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "resnet10t-tiny.safetensors"
    save_file(state, str(path))
    return path, state


CONFIG = """
[model]
backbone = "resnet10t"
backbone_options = {{ stem_width = 8, channels = [8, 16, 32, 64] }}
topology = {{ name = "tree", depth = 1 }}
{extra}
[data]
name = "digits"
image_size = 16
max_train_items = 32
max_eval_items = 32

[train]
epochs = 1
batch_size = 32
progress = "none"
device = "cpu"
"""


def members_hold(ensemble, state: dict[str, torch.Tensor]) -> bool:
    """Whether every copy of every block holds the weights of ``state`` (classifiers aside)."""
    for node in ensemble.nodes:
        for name, value in node.state_dict().items():
            if not torch.equal(value, state[name]):
                return False
    return True


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_pretrained_file_loads_the_weights(weights, tmp_path, suffix):
    path, state = weights
    if suffix == "pth":
        path = tmp_path / "weights.pth"
        torch.save(state, path)
    config = ModelConfig(**TINY, pretrained_file=str(path), init="pretrained")
    ens = build_ensemble(config)
    assert ens.init_mode == "pretrained" and members_hold(ens, state)
    assert config.loads_weights and not ModelConfig(**TINY).loads_weights
    fresh = build_ensemble(ModelConfig(**TINY))
    assert not members_hold(fresh, state)


def test_pretrained_file_in_a_toml_config(weights, tmp_path):
    path, state = weights
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\nbackbone = "resnet10t"\nbackbone_options = { stem_width = 8, channels = [8, 16, 32, 64] }'
                    f'\npretrained = true\npretrained_file = "{path}"\ninit = "pretrained"\n')
    config = load_config(toml)
    assert config.model.pretrained and config.model.pretrained_file == str(path)
    assert members_hold(build_ensemble(replace(config.model, num_classes=10)), state)


def test_a_missing_file_fails_before_any_work(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\nbackbone = "resnet10t"\npretrained_file = "absent.safetensors"\ninit = "pretrained"\n')
    with pytest.raises(ConfigError, match=r"run.toml: model.pretrained_file 'absent.safetensors' is not a file"):
        load_config(toml)
    config = ModelConfig(**TINY, pretrained_file=str(tmp_path / "absent.pth"), init="pretrained")
    with pytest.raises(ConfigError, match="is not a file"):
        build_ensemble(config)
    with pytest.raises(ConfigError, match="is not a file"):
        run_training(RunConfig(config), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("changes", "message"), [
    ({"pretrained": True}, "model.pretrained = true loads .* model.init = 'reinit' .* discards them"),
    ({"pretrained_file": "w.pth"}, "model.pretrained_file loads"),
    ({"pretrained": "yes", "init": "auto"}, "model.pretrained must be true or false"),
    ({"pretrained_file": "", "init": "auto"}, "path of a weights file"),
    ({"backbone_options": {"pretrained": True}}, "cannot set pretrained: set model.pretrained"),
    ({"backbone_options": {"num_classes": 3}}, "cannot set num_classes: set model.num_classes"),
    ({"backbone_options": {"pretrained_cfg_overlay": {"file": "w.pth"}}}, "set model.pretrained_file"),
])
def test_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**TINY, **changes})


def test_a_file_of_another_architecture_is_a_config_error(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(timm.create_model("resnet10t", num_classes=10, stem_width=16).state_dict(), path)
    with pytest.raises(ConfigError, match=r"pretrained weights from model.pretrained_file .*wide.pth.*size mismatch "
                                          r"for conv1.0.weight.* \.\.\. \(\d+ more\)$"):
        build_ensemble(ModelConfig(**TINY, pretrained_file=str(path), init="pretrained"))


def test_the_hub_without_a_network_says_what_to_do(monkeypatch):
    import ensemblekit.backbones

    def offline(name, **kwargs):
        assert kwargs["pretrained"] and "pretrained_cfg_overlay" not in kwargs  # the hub, not a file
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr(ensemblekit.backbones, "create_backbone", offline)
    with pytest.raises(ConfigError, match="timm's hub .*without a network.*model.pretrained_file.*couldn't connect"):
        build_ensemble(ModelConfig(**TINY, pretrained=True, init="pretrained"))


def test_a_checkpoint_loads_without_the_weights_file(weights, tmp_path):
    path, _ = weights
    torch.manual_seed(0)
    ens = build_ensemble(ModelConfig(**TINY, pretrained_file=str(path), init="pretrained")).eval()
    ek.save(ens, tmp_path / "model.ek")
    path.unlink()  # moved away: the checkpoint holds its own weights
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ek.load(tmp_path / "model.ek")(x), ens(x))


def test_a_run_from_before_these_settings_resumes(tmp_path, capsys):
    """A checkpoint written before model.pretrained existed lacks the key: it counts as its default."""
    toml = tmp_path / "tiny.toml"
    toml.write_text(CONFIG.format(extra=""))
    run = tmp_path / "run"
    assert main(["train", str(toml), "--out", str(run)]) == 0
    checkpoint = run / "checkpoints/step-0000001"
    manifest_path, weights = checkpoint / "config.json", checkpoint / "model.safetensors"
    save_file(load_file(str(weights)), str(weights))  # as version 2 wrote it: no manifest SHA-256 in its metadata
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = 2
    manifest["files"]["model.safetensors"] = {"bytes": weights.stat().st_size,
                                              "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    del manifest["model"]["pretrained"], manifest["model"]["pretrained_file"]
    manifest_path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["train", str(toml), "--out", str(run), "--resume"]) == 0, capsys.readouterr().err


def test_cli_train_with_a_pretrained_file(weights, tmp_path):
    path, _ = weights
    toml = tmp_path / "tiny.toml"
    toml.write_text(CONFIG.format(extra=f'pretrained_file = "{path}"\ninit = "pretrained"\n'))
    run = tmp_path / "run"
    assert main(["train", str(toml), "--out", str(run)]) == 0
    manifest = json.loads((run / "checkpoints/step-0000001/config.json").read_text())
    assert manifest["model"]["pretrained_file"] == str(path) and manifest["model"]["init"] == "pretrained"
    toml.write_text(CONFIG.format(extra='pretrained_file = "gone.pth"\ninit = "pretrained"\n'))
    assert main(["train", str(toml), "--out", str(tmp_path / "other")]) == 2
    assert not (tmp_path / "other").exists()
