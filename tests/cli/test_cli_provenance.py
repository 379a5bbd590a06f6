"""report.json records where its numbers come from: versions, dataset and split, checkpoint, device."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import ensemblekit as ek
from ensemblekit.cli.main import main

TOML = """
[model]
backbone = "resnet10t"
backbone_options = { stem_width = 8, channels = [8, 16, 32, 64] }
topology = { name = "tree", depth = 1 }

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


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_and_evaluate_record_provenance(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TOML)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    origin = json.loads((run / "report.json").read_text())["provenance"]
    versions = origin["versions"]
    assert versions["torch"] == torch.__version__ and versions["timm"] == timm.__version__
    assert versions["ensemblekit"] and versions["python"]
    assert origin["dataset"] == {"name": "digits", "split": "test", "root": None, "source": None,
                                 "num_samples": 32, "max_items": 32, "subset": "stratified, seed 0", "image_size": 16}
    checkpoint = str((run / "checkpoints/step-0000001").resolve())
    assert origin["checkpoint"] == checkpoint
    assert origin["device"] == {"type": "cpu", "index": None, "name": None}

    assert main(["evaluate", str(run), "--split", "val", "--max-items", "16", "--device", "cpu",
                 "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval/report.json").read_text())
    assert report["num_samples"] == 16
    origin = report["provenance"]
    assert origin["dataset"]["split"] == "val" and origin["dataset"]["num_samples"] == 16
    assert origin["dataset"]["max_items"] == 16 and origin["checkpoint"] == checkpoint
    assert origin["dataset"]["subset"] == "stratified, seed 0"
    manifest = json.loads((run / "checkpoints/step-0000001/config.json").read_text())
    assert manifest["data"]["subset"] == "stratified"  # a resume refuses a checkpoint cut otherwise


def test_an_ensemble_trained_in_your_own_loop_is_saved_and_evaluated_by_the_cli(tmp_path, fashion_mnist_env, capsys):
    """ek.save of an ensemble wrapped and trained in user code; `ensemblekit evaluate --data` reads it."""
    torch.manual_seed(0)
    ens = ek.wrap(timm.create_model("resnet10t", num_classes=10, in_chans=1), topology="tree", depth=1)
    optimizer = torch.optim.SGD(ens.parameters(), lr=0.01)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    ens.train()
    ens.loss(ens.forward_output(x), y).total.backward()
    optimizer.step()
    ek.save(ens.eval(), tmp_path / "model.ek")
    out = tmp_path / "eval"
    assert main(["evaluate", str(tmp_path / "model.ek"), "--data", "fashion-mnist", "--max-items", "16",
                 "--device", "cpu", "--out", str(out)]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["num_members"] == 2 and report["num_samples"] == 16
    assert len(report["prefix_accuracy"]) == 2 and report["provenance"]["dataset"]["name"] == "fashion-mnist"
