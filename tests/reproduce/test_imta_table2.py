"""``ensemblekit reproduce imta-table2`` on smoke settings: outputs, claim, resume, refused settings, budget."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from ensemblekit.reproduce import imta_table2
from ensemblekit.reproduce.runs import RunStore
from tests.reproduce.conftest import run_table, table_command

RUN_FOLDERS = ("phase1", "phase1+ge", "baseline", "ge", "isc", "ofa", "ge+isc+ofa")


def command(out, *extra: str) -> list[str]:
    return table_command("imta-table2", out, *extra)


@pytest.fixture(scope="module")
def finished(smoke_table):
    """A smoke table over two seeds: (its folder, exit code, standard output)."""
    return smoke_table("imta-table2")


def test_the_table_runs_and_writes_its_outputs(finished):
    out, code, text = finished
    assert code == 0
    assert "| GE | ISC | OFA | E-1 |" in text and "73.45" in text  # the paper's numbers beside ours
    record = json.loads((out / "imta_table2.json").read_text())
    assert record["complete"] and record["runs_finished"] == 14 and record["seeds"] == [0, 1]
    assert list(record["ours"]) == [*imta_table2.PHASE1.values(), *imta_table2.ROWS]
    assert all(len(exits) == 5 and all(0 <= a <= 100 for a in exits) for exits in record["ours"].values())
    assert len(record["exit_flops"]) == 5 and record["paper"]["GE+ISC+OFA"][-1] == 73.45
    assert record["settings"]["train_items"] == 128 and record["settings"]["epochs"] == 1
    assert "phase I 1 epoch(s), phase II 1 epoch(s) on a stratified subset of 128 images" in record["settings_text"]
    assert record["settings_text"] in text
    markdown = (out / "imta_table2.md").read_text()
    assert "| ✓ | ✓ | ✓ |" in markdown and record["settings_text"] in markdown and "GE+ISC+OFA@E-5" in markdown
    for seed in (0, 1):
        for run in RUN_FOLDERS:
            assert (out / f"seed-{seed}" / run / "run.json").is_file()
            assert (out / f"seed-{seed}" / run / "model" / "model.safetensors").is_file()
            assert not (out / f"seed-{seed}" / run / "checkpoints").exists()  # removed once the run is recorded


def test_rows_start_from_their_phase1_network(finished):
    import ensemblekit as ek
    from ensemblekit.methods.imta.gradient_equilibrium import has_gradient_equilibrium
    from ensemblekit.methods.imta.isc import ISCExit

    out = finished[0] / "seed-0"
    phase1, full = ek.load(out / "phase1+ge" / "model"), ek.load(out / "ge+isc+ofa" / "model")
    assert has_gradient_equilibrium(phase1) and isinstance(full.heads[1], ISCExit)
    for a, b in zip(phase1.nodes.parameters(), full.nodes.parameters()):  # phase II trains the heads only
        assert torch.equal(a, b)
    assert not isinstance(ek.load(out / "ge" / "model").heads[1], ISCExit)


def test_the_claim_is_judged_at_every_exit_and_stored(finished):
    out, _, text = finished
    record = json.loads((out / "imta_table2.json").read_text())
    (claim,) = record["claims"]
    assert claim["claim"] == "GE+ISC+OFA >= baseline at every exit"
    assert [(c["left"], c["right"]) for c in claim["comparisons"]] == [
        (f"GE+ISC+OFA@E-{k}", f"baseline@E-{k}") for k in range(1, 6)]
    per_seed = record["per_seed"]
    for k, comparison in enumerate(claim["comparisons"]):
        differences = [per_seed[s]["GE+ISC+OFA"][k] - per_seed[s]["baseline"][k] for s in ("0", "1")]
        assert comparison["margin"] == pytest.approx(sum(differences) / 2)
    assert claim["holds"] == all(c["margin"] >= 0 for c in claim["comparisons"])
    assert "GE+ISC+OFA@E-1 >= baseline@E-1: margin" in text and ("holds" in text or "does not hold" in text)


def test_a_run_killed_before_its_record_resumes_from_its_checkpoint(finished, tmp_path, monkeypatch):
    out = tmp_path / "t2"
    shutil.copytree(finished[0], out)
    folder = out / "seed-1" / "ge+isc+ofa"
    (folder / "run.json").unlink()  # this run is to be trained again ...
    shutil.rmtree(folder / "model")
    put = RunStore.put

    def killed(self, seed, row, settings, result):
        raise KeyboardInterrupt  # ... and is killed after training, before its record

    monkeypatch.setattr(RunStore, "put", killed)
    with pytest.raises(KeyboardInterrupt):
        run_table(command(out))
    assert any((folder / "checkpoints").iterdir())
    monkeypatch.setattr(RunStore, "put", put)
    code, text, _ = run_table(command(out))
    assert code == 0 and text.count("finished earlier, reused") == 13 and "== GE+ISC+OFA, seed 1\n" in text
    assert json.loads((folder / "run.json").read_text())["result"]["resumed"]


def test_the_budgeted_curve_of_a_finished_table(finished, tmp_path, trains_nothing):
    out = tmp_path / "t2"
    shutil.copytree(finished[0], out)
    code, text, _ = run_table(command(out, "--budget", "--timing-repeats", "1"))
    assert code == 0 and "time saved %" in text
    record = json.loads((out / "imta_table2.json").read_text())
    assert record["budget"]["seed"] == 0 and len(record["budget"]["points"]) == 40
    assert (out / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def table2_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    imta_table2.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_default_and_full_settings():
    default = imta_table2.settings(table2_args("--data", "fashion-mnist"))
    assert (default["backbone"], default["backbone_options"], default["image_size"]) == (
        "resnet10t", {"stem_width": 8, "channels": [16, 32, 64, 128]}, 28)
    assert (default["epochs"], default["phase2_epochs"], default["train_items"], default["augment"]) == (
        5, 2, None, False)
    full = imta_table2.settings(table2_args("--data", "cifar100", "--full"))
    assert (full["backbone"], full["epochs"], full["phase2_epochs"], full["batch_size"], full["train_items"]) == (
        "resnet18", 300, 180, 64, None)
    assert full["lr"] == 0.1 and full["nesterov"] and full["weight_decay"] == 1e-4


def test_the_papers_learning_rate_steps():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = imta_table2.paper_lr_schedule(4, [0.5, 0.75])(optimizer, 10)  # 40 steps: /10 after 20 and 30
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[19] == pytest.approx(0.1) and rates[20] == pytest.approx(0.01) and rates[30] == pytest.approx(1e-3)


def test_the_table_prints_macs_at_the_data_size():
    record = {"data": "digits", "settings": {"image_size": 16, "num_blocks": 2}, "seeds": [0], "runs_finished": 1,
              "runs_total": 14, "exit_flops": [2e6, 5e6], "ours": {"GE": [50.0, 60.0]}, "std": {"GE": [0.0, 0.0]}}
    text = imta_table2.table(record)
    assert "MMACs per 16x16 image" in text and "1.00, 2.50" in text
    assert "| ✓ | - | - | 50.00 | 60.00 | 60.35 |" in text and "| - | - | - | - | - | 60.09 |" in text


def test_fashion_mnist_is_the_default_where_its_files_are(fashion_mnist_env, tmp_path):
    out = tmp_path / "t"
    code, text, _ = run_table(["reproduce", "imta-table2", "--smoke", "--seeds", "1", "--progress", "none",
                             "--out", str(out)])
    assert code == 0 and "settings: fashion-mnist --smoke" in text
    record = json.loads((out / "imta_table2.json").read_text())
    assert record["data"] == "fashion-mnist" and record["complete"]
