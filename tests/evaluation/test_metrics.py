"""Anytime report, member collection and the accuracy-vs-FLOPs plot."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.classification import MulticlassCalibrationError

from ensemblekit.core.interfaces import Aggregator, EnsembleOutput
from ensemblekit.evaluation.reports import Report, anytime_report, collect_members, plot_accuracy_vs_flops


class MeanLogits(Aggregator):
    """Mean of member logits, as a running sum (the real aggregators live elsewhere)."""

    def update(self, state, logits, index):
        total = logits if state is None else state["sum"] + logits
        return {"sum": total, "count": torch.full((len(logits), 1), index + 1.0)}

    def value(self, state):
        return state["sum"] / state["count"]


# 3 samples, 2 members, 3 classes; labels 0, 1, 2.
MEMBERS = torch.tensor(
    [
        [[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # member 0 right, member 1 wrong, mean right (1.5 vs 0.5)
        [[2.0, 1.0, 0.0], [0.0, 4.0, 0.0]],  # member 0 wrong, member 1 right, mean right (1, 2.5, 0)
        [[0.0, 2.0, 1.0], [1.0, 0.0, 0.0]],  # both wrong, mean wrong (0.5, 1, 0.5)
    ]
)
LABELS = torch.tensor([0, 1, 2])


def ece_by_hand(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = (predicted == labels).astype(float)
    total = 0.0
    for lo, hi in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def test_accuracies_by_hand():
    report = anytime_report(MEMBERS, LABELS, MeanLogits())
    assert report.num_members == 2 and report.num_samples == 3 and report.num_classes == 3
    assert report.member_accuracy == pytest.approx([1 / 3, 1 / 3])
    assert report.prefix_accuracy == pytest.approx([1 / 3, 2 / 3])
    assert report.accuracy == pytest.approx(2 / 3)


def test_diversity_is_hne_std_of_logits():
    report = anytime_report(MEMBERS, LABELS, MeanLogits())
    assert math.isnan(report.prefix_diversity[0])
    # Two members: unbiased std of (a, b) is |a - b| / sqrt(2); mean over all 9 entries.
    expected = (MEMBERS[:, 0] - MEMBERS[:, 1]).abs().mean().item() / math.sqrt(2)
    assert report.diversity == pytest.approx(expected)
    members = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0))
    report = anytime_report(members, torch.zeros(5, dtype=torch.long), MeanLogits())
    for k in range(2, 5):
        expected = np.std(members[:, :k].numpy(), axis=1, ddof=1).mean()
        assert report.prefix_diversity[k - 1] == pytest.approx(expected, rel=1e-5)


def test_nll_and_ece_match_direct_computations():
    generator = torch.Generator().manual_seed(1)
    members = 2 * torch.randn(64, 3, 5, generator=generator)
    labels = torch.randint(0, 5, (64,), generator=generator)
    report = anytime_report(members, labels, MeanLogits())
    for k in range(1, 4):
        mean = members[:, :k].mean(dim=1)
        assert report.prefix_nll[k - 1] == pytest.approx(F.cross_entropy(mean, labels).item(), rel=1e-5)
        probs = mean.softmax(dim=-1)
        metric = MulticlassCalibrationError(num_classes=5, n_bins=15, norm="l1")
        assert report.prefix_ece[k - 1] == pytest.approx(metric(probs, labels).item(), abs=1e-6)
        assert report.prefix_ece[k - 1] == pytest.approx(ece_by_hand(probs.numpy(), labels.numpy()), abs=1e-5)


def test_costs_json_and_table(tmp_path):
    costs = [(1e6, 2e5), (2e6, 4e5)]
    report = anytime_report(MEMBERS, LABELS, MeanLogits(), costs=costs)
    assert report.prefix_flops == [1e6, 2e6] and report.prefix_params == [2e5, 4e5]
    as_objects = [SimpleNamespace(members=k + 1, flops=f, params=p) for k, (f, p) in enumerate(costs)]
    assert anytime_report(MEMBERS, LABELS, MeanLogits(), costs=as_objects).prefix_flops == [1e6, 2e6]
    data = report.to_dict()
    json.dumps(data, allow_nan=False)  # strict JSON: the nan diversity of one member is None
    assert data["prefix_diversity"][0] is None and data["num_members"] == 2
    path = report.save_json(tmp_path / "out" / "report.json")
    loaded = Report.load_json(path)
    assert loaded.prefix_accuracy == report.prefix_accuracy and loaded.prefix_flops == [1e6, 2e6]
    assert math.isnan(loaded.prefix_diversity[0]) and loaded.diversity == report.diversity
    table = report.table()
    assert "FLOPs" in table and "2.00M" in table and "66.67" in table and "33.33" in table
    assert len([line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]) == 2
    assert "FLOPs" not in anytime_report(MEMBERS, LABELS, MeanLogits()).table()


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="one \\(flops, params\\) per prefix"):
        anytime_report(MEMBERS, LABELS, MeanLogits(), costs=[(1.0, 1.0)])
    with pytest.raises(ValueError, match="labels must be"):
        anytime_report(MEMBERS, LABELS[:2], MeanLogits())
    with pytest.raises(ValueError, match="members must be"):
        anytime_report(MEMBERS[:, 0], LABELS, MeanLogits())


def test_collect_members():
    images = torch.randn(10, 4)
    labels = torch.arange(10) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    weight = torch.randn(2, 4, 3)

    def fn(x):
        assert not torch.is_grad_enabled()
        return torch.einsum("bi,mic->bmc", x, weight)

    members, collected = collect_members(fn, loader, "cpu")
    assert members.shape == (10, 2, 3) and torch.equal(collected, labels)
    assert torch.allclose(members, torch.einsum("bi,mic->bmc", images, weight))
    as_output, _ = collect_members(lambda x: EnsembleOutput(fn(x), MeanLogits(), (1, 2)), loader)
    assert torch.equal(as_output, members)
    with pytest.raises(ValueError, match="member logits"):
        collect_members(lambda x: x, loader)


def test_plot_writes_png(tmp_path):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (40,), generator=generator)
    reports = {}
    for name, (m, flops) in {"tree": (4, 1e6), "independent": (3, 3e6)}.items():
        members = torch.randn(40, m, 4, generator=generator) + 2 * F.one_hot(labels, 4)[:, None]
        reports[name] = anytime_report(members, labels, MeanLogits(), costs=[(flops * (k + 1), 0.0) for k in range(m)])
    path = plot_accuracy_vs_flops(reports, tmp_path / "plots" / "acc.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_costs = {"a": anytime_report(MEMBERS, LABELS, MeanLogits())}
    assert plot_accuracy_vs_flops(no_costs, tmp_path / "members.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no FLOPs"):
        plot_accuracy_vs_flops({**reports, **no_costs}, tmp_path / "mixed.png")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    m=st.integers(1, 5),
    c=st.integers(2, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_full_prefix_equals_aggregator(n, m, c, seed):
    generator = torch.Generator().manual_seed(seed)
    members = torch.randn(n, m, c, generator=generator)
    labels = torch.randint(0, c, (n,), generator=generator)
    aggregator = MeanLogits()
    report = anytime_report(members, labels, aggregator)
    full = (aggregator(members).argmax(dim=-1) == labels).float().mean().item()
    assert report.prefix_accuracy[-1] == pytest.approx(full)
    assert report.prefix_accuracy[0] == pytest.approx(report.member_accuracy[0])
    assert all(0.0 <= e <= 1.0 for e in report.prefix_ece)
    assert all(d >= 0 for d in report.prefix_diversity[1:])


def test_format_si_is_the_one_number_formatter():
    from ensemblekit.evaluation import budget, reports
    from ensemblekit.evaluation.formatting import format_si

    assert [format_si(v) for v in (2.5e12, 1.5e9, 3.25e6, 2048, 999, 576, 0.25, -4e6)] == [
        "2.50T", "1.50G", "3.25M", "2.05k", "999", "576", "0.25", "-4.00M"]
    assert not hasattr(reports, "_eng") and not hasattr(budget, "_eng")
    r = Report(10, 2, [0.5, 0.6], [0.5, 0.4], [float("nan"), 0.3], [0.1, 0.05], [0.7, 0.6],
               prefix_flops=[1.5e9, 3e9], prefix_params=[2048.0, 4096.0])
    assert "1.50G" in r.table() and "4.10k" in r.table()


def test_collect_members_drains_a_loader_or_a_pair_of_tensors():
    from ensemblekit.core.loaders import iter_batches

    x, y = torch.randn(10, 3), torch.arange(10) % 2
    fn = lambda images: images[:, None, :2].expand(-1, 2, 2)  # noqa: E731
    batches = [(x[:4], y[:4], "extra"), (x[4:], y[4:], "extra")]
    from_loader = collect_members(fn, batches)
    from_pair = collect_members(fn, (x, y))
    assert torch.equal(from_loader[0], from_pair[0]) and torch.equal(from_loader[1], from_pair[1])
    assert [len(b) for b, _ in iter_batches((x, y), 4)] == [4, 4, 2]
    assert [len(b) for b, _ in iter_batches(batches, 4)] == [4, 6]
