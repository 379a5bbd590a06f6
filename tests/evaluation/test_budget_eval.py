"""Budget sweep (accuracy, FLOPs, members, time), its plot, and the imta-table2 reproduction on tiny settings."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from ensemblekit.components.halting.budgeted import exit_indices
from ensemblekit.components.halting.confidence import confidence
from ensemblekit.evaluation.budget import budget_sweep, plot_budget
from ensemblekit.methods.imta.recipe import multi_exit
from ensemblekit.reproduce import imta_table2
from tests.conftest import toy_split


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (and stalls on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_budget_sweep_matches_evaluating_everything(tmp_path):
    torch.manual_seed(0)
    ens = multi_exit(toy_split(4), isc="concat").eval()
    g = torch.Generator().manual_seed(1)
    val = (torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 5, (48,), generator=g))
    test = (torch.randn(20, 3, 8, 8, generator=g), torch.randint(0, 5, (20,), generator=g))
    report = budget_sweep(ens, val, test, qs=(0.1, 1.0, 10.0), batch_size=8, repeats=1)
    costs = torch.tensor([float(r.flops) for r in ens.cost_table()], dtype=torch.float64)
    with torch.no_grad():
        prefixes = ens.forward_output(test[0]).prefixes()
    for point in report.points:
        chosen = exit_indices(confidence(prefixes), torch.tensor(point.thresholds))
        correct = prefixes[torch.arange(20), chosen].argmax(-1) == test[1]
        assert point.accuracy == pytest.approx(correct.double().mean().item())
        assert point.flops == pytest.approx(costs[chosen].mean().item())
        assert point.members == pytest.approx((chosen + 1).double().mean().item())
        assert sum(point.fractions) == pytest.approx(1.0)
        assert point.seconds > 0 and point.expected_flops <= costs[-1]
    assert [p.members for p in report.points] == sorted(p.members for p in report.points)  # larger q, later exits
    assert report.full_flops == costs[-1] and report.anytime.prefix_flops == costs.tolist()
    assert "time saved %" in report.table()
    json.dumps(report.to_dict())
    path = plot_budget(report, tmp_path / "budget.png", title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reproduce_imta_table2_tiny(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    imta_table2.add_arguments(parser)
    out, plot = tmp_path / "imta.json", tmp_path / "budget.png"
    args = parser.parse_args(["--data", "digits", "--backbone", "resnet10t", "--epochs", "1", "--phase2-epochs", "1",
                              "--batch-size", "16", "--limit-train", "32", "--limit-eval", "32", "--image-size", "16",
                              "--device", "cpu", "--budget-plot", str(plot), "--timing-repeats", "1",
                              "--out", str(out)])
    assert imta_table2.run(args) == 0
    printed = capsys.readouterr().out
    assert "| GE | ISC | OFA | E-1 |" in printed and "73.45" in printed  # the paper's numbers beside ours
    results = json.loads(out.read_text())
    assert [(r["ge"], r["isc"], r["ofa"]) for r in results["rows"]] == list(imta_table2.ROWS)
    assert all(len(r["top1"]) == 5 and all(0 <= a <= 100 for a in r["top1"]) for r in results["rows"])
    assert results["settings"]["exits"] == 5 and len(results["budget"]["points"]) == 40
    assert plot.exists()
