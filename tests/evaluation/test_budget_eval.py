"""Budget sweep (accuracy, FLOPs, members, time) and its plot."""

from __future__ import annotations

import json

import pytest
import torch

from ensemblekit.components.halting.budgeted import exit_indices
from ensemblekit.components.halting.confidence import confidence
from ensemblekit.evaluation.budget import budget_sweep, plot_budget
from ensemblekit.methods.imta.recipe import multi_exit
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
