"""The demo, train, evaluate and reproduce commands on tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ensemblekit.cli.main import main

TOML = """
[model]
backbone = "resnet10t"
backbone_options = { stem_width = 8, channels = [8, 16, 32, 64] }
topology = { name = "tree", depth = 1 }
loss = { name = "hierarchical_distillation", alpha = 0.5 }

[data]
name = "digits"
image_size = 16
max_train_items = 64
max_eval_items = 64

[train]
epochs = 1
batch_size = 32
progress = "none"
"""

YAML = """
model:
  backbone: resnet10t
  backbone_options: {stem_width: 8, channels: [8, 16, 32, 64]}
  recipe: hne
  recipe_options: {depth: 1, alpha: 0.3}
data: {name: digits, image_size: 16, max_train_items: 64, max_eval_items: 32}
train: {epochs: 1, batch_size: 32, optimizer: adamw, lr: 0.001, schedule: step, progress: none}
"""


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared CPU makes more threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_demo_smoke_on_digits_where_fashion_mnist_is_absent(tmp_path, capsys):
    assert main(["demo", "--smoke", "--out", str(tmp_path / "demo"), "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert "data: digits, " in out and "from the copy bundled with scikit-learn" in out
    assert "HNE tree, L_I:" in out and "HNE tree, L_I+L_HD:" in out and "deep ensemble of 2, L_I:" in out
    assert out.count("| k |") == 4  # the three anytime tables and the comparison
    assert "| model | k | FLOPs | acc % | gain vs k=1 |" in out and "95% interval" in out
    assert f"outputs in {(tmp_path / 'demo').resolve()}" in out
    assert (tmp_path / "demo/accuracy_vs_flops.png").stat().st_size > 0
    for run, members in (("hne-tree-l_i", 4), ("hne-tree-l_i+l_hd", 4), ("deep-ensemble-of-2-l_i", 2)):
        report = json.loads((tmp_path / "demo" / run / "report.json").read_text())
        assert report["num_members"] == members and len(report["prefix_flops"]) == members


def test_demo_trains_on_fashion_mnist_where_present(tmp_path, capsys, fashion_mnist_env):
    assert main(["demo", "--smoke", "--out", str(tmp_path / "demo"), "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert f"data: fashion-mnist, 90 training and 20 test images (28x28), from $ENSEMBLEKIT_FASHION_MNIST " \
           f"{fashion_mnist_env}" in out
    report = json.loads((tmp_path / "demo" / "hne-tree-l_i" / "report.json").read_text())
    assert report["num_samples"] == 20 and report["prefix_gain_low"][0] == 0


def test_demo_verdict_says_when_the_gain_is_within_the_spread():
    from ensemblekit.cli.commands.demo import verdict
    from ensemblekit.evaluation.reports import Report

    nan = float("nan")
    within = Report(100, 2, [0.80, 0.81], [0.8, 0.8], [nan, 0.1], [0.1, 0.1], [0.5, 0.4],
                    prefix_gain_low=[0.0, -0.01], prefix_gain_high=[0.0, 0.03])
    assert "NOT larger than the spread" in verdict(within)
    worse = Report(100, 2, [0.80, 0.75], [0.8, 0.7], [nan, 0.1], [0.1, 0.1], [0.5, 0.4],
                   prefix_gain_low=[0.0, -0.08], prefix_gain_high=[0.0, -0.02])
    assert "a loss larger than the spread" in verdict(worse)


def test_train_then_evaluate(tmp_path, capsys):
    config = write(tmp_path, "tiny.toml", TOML)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| k |" in out and f"checkpoint: {run / 'checkpoints/step-0000002'}" in out
    assert {"report.json", "report.txt", "accuracy_vs_flops.png", "checkpoints"} <= {p.name for p in run.iterdir()}

    assert main(["evaluate", str(run), "--max-items", "32", "--batch-size", "16"]) == 0
    captured = capsys.readouterr()
    assert "resnet10t on digits (test): 32 samples, 2 members" in captured.out
    assert "evaluate: 100%" in captured.err and "2/2" in captured.err  # tqdm's bar of the batches, on stderr
    assert main(["evaluate", str(run), "--max-items", "32", "--batch-size", "16", "--progress", "rich"]) == 0
    assert "evaluate" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--max-items", "32", "--progress", "none"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["evaluate", str(run / "checkpoints/step-0000002"), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval/report.json").read_text())
    assert report["num_samples"] == 359 and (tmp_path / "eval/accuracy_vs_flops.png").exists()
    # --max-items N scores the images the run's report scored with max_eval_items = N (one fixed stratified subset)
    assert main(["evaluate", str(run), "--max-items", "64", "--progress", "none", "--out", str(tmp_path / "e64")]) == 0
    again = json.loads((tmp_path / "e64/report.json").read_text())
    ours = json.loads((run / "report.json").read_text())
    assert again["num_samples"] == ours["num_samples"] == 64
    assert again["prefix_accuracy"] == ours["prefix_accuracy"] and again["member_accuracy"] == ours["member_accuracy"]


def test_train_refuses_to_overwrite_and_resumes(tmp_path, capsys):
    config = write(tmp_path, "tiny.toml", TOML)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    before = (run / "report.json").read_text()
    assert main(["train", str(config), "--out", str(run)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert (run / "report.json").read_text() == before
    assert main(["train", str(config), "--out", str(run), "--resume"]) == 0
    assert json.loads((run / "report.json").read_text()) == json.loads(before)


def test_train_yaml_with_a_recipe(tmp_path, capsys):
    config = write(tmp_path, "tiny.yaml", YAML)
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 0
    manifest = json.loads((tmp_path / "run/checkpoints/step-0000002/config.json").read_text())
    assert manifest["model"]["recipe"] == "hne" and manifest["train"]["optimizer"] == "adamw"


@pytest.mark.parametrize(("change", "message"), [
    (("[train]", "[train]\nepochz = 3"),
     "unknown key 'epochz' in [train] (did you mean 'epochs'?); allowed keys: epochs"),
    (('progress = "none"', 'progress = "bars"'), "train.progress must be one of 'tqdm', 'rich', 'none'; got 'bars'"),
    (("epochs = 1", "epochs = 1.5"), "train.epochs must be int, got 1.5 (float)"),
    (('name = "digits"', 'name = "mnist"'), "data.name must be one of 'digits', 'cifar10', 'cifar100', 'imagefolder'"),
    (('name = "hierarchical_distillation"', 'name = "hierarchical"'), "model.loss: unknown loss 'hierarchical'"),
    (('backbone = "resnet10t"', 'backbone = "resnet10x"'), "model.backbone: unknown timm model 'resnet10x'"),
    (("[data]", "[dataset]"), "unknown key 'dataset' in top level"),
    (("depth = 1", "depht = 1"), "model.topology: topology 'tree' does not take depht; it takes: depth, branching"),
    (("alpha = 0.5", "alpha = 1.5"), "model.loss: alpha must be in [0, 1], got 1.5"),
])
def test_config_errors_name_the_key(tmp_path, capsys, change, message):
    config = write(tmp_path, "bad.toml", TOML.replace(*change))
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert str(config) in err or "model.backbone" in message  # timm reports unknown models at build time
    assert not (tmp_path / "run").exists()


def test_recipe_option_errors(tmp_path, capsys):
    config = write(tmp_path, "bad.yaml", YAML.replace("alpha: 0.3", "alhpa: 0.3"))
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "model.recipe_options: recipe 'hne' does not take alhpa" in capsys.readouterr().err


def test_evaluate_a_damaged_checkpoint(tmp_path, capsys):
    config = write(tmp_path, "tiny.toml", TOML)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    weights = run / "checkpoints/step-0000002/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert main(["evaluate", str(run)]) == 2
    assert f"checkpoint file {weights} is truncated" in capsys.readouterr().err


def test_reproduce_hne_table1_smoke(tmp_path, capsys):
    out = tmp_path / "t1"
    command = ["reproduce", "hne-table1", "--data", "digits", "--smoke", "--seeds", "2", "--out", str(out),
               "--progress", "none"]
    assert main(command) == 0
    text = capsys.readouterr().out
    assert "HNE Table 1 ablation" in text and "no paper numbers for digits" in text
    for label in ("L_I ", "L_S ", "L_I+L_S ", "L_I+L_HD "):
        assert f"\n{label}" in text
    record = json.loads((out / "hne_table1.json").read_text())
    assert set(record["ours"]) == {"L_I", "L_S", "L_I+L_S", "L_I+L_HD"} and record["paper"] == {}
    assert (out / "accuracy_vs_flops.png").exists()
    # the claims, judged over the two seeds, paired
    assert [c["claim"].split(":")[0] for c in record["claims"]] == [
        "hierarchical distillation improves the first members", "L_S is the worst objective for the first member"]
    first = record["claims"][0]["comparisons"][0]
    differences = [record["per_seed"][s]["L_I+L_HD"]["1"] - record["per_seed"][s]["L_I"]["1"] for s in ("0", "1")]
    assert first["margin"] == pytest.approx(sum(differences) / 2)
    assert "L_I+L_HD@1 >= L_I@1: margin" in text and "margin" in (out / "hne_table1.md").read_text()


def test_reproduce_table_shows_the_papers_numbers():
    from ensemblekit.reproduce.hne_table1 import table

    ours = {label: {1: 50.0, 2: 60.0, 4: 70.0} for label in ("L_I", "L_S", "L_I+L_S", "L_I+L_HD")}
    text = table(ours, "cifar100")
    assert "C100" in text
    assert "paper HNE_small      67.7   70.0   71.9   73.4   74.8" in text
    assert "paper HNE            76.1   77.2   78.0   79.0   79.8" in text
    assert "this run             50.0   60.0   70.0      -      -" in text


def test_reproduce_lists_its_experiments(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "-h"])
    assert "hne-table1" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["file", "under a file", "read-only file system"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path, capsys, where):
    config = write(tmp_path, "tiny.toml", TOML)
    (tmp_path / "taken").write_text("keep me")
    out = {"file": tmp_path / "taken", "under a file": tmp_path / "taken" / "run",
           "read-only file system": Path("/proc/ensemblekit-run")}[where]
    assert main(["train", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr()
    assert "ensemblekit train: error: " in err.err and "output folder" in err.err
    assert "epoch" not in err.out + err.err  # nothing trained
    assert (tmp_path / "taken").read_text() == "keep me"


@pytest.mark.parametrize(("line", "fragment"), [
    ('seed = 9223372036854775807', "train.seed must be an integer in [0, 2**32), got 9223372036854775807"),
    ('device = "gpu0"', "train.device 'gpu0' is not a device"),
])
def test_train_settings_are_checked_when_the_config_is_read(tmp_path, capsys, line, fragment):
    config = write(tmp_path, "tiny.toml", TOML.replace("[train]\n", f"[train]\n{line}\n"))
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
