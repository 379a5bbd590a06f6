"""Budgeted evaluation: accuracy, FLOPs, members used and wall-clock time over a sweep of budgets.

For each budget parameter ``q`` the [`Budgeted`][ensemblekit.components.halting.Budgeted]
policy is calibrated on a held-out split (never the test set), then the test
set runs through [`predict()`][ensemblekit.core.ensemble.Ensemble.predict], which drops stopped
samples from the batch: its wall-clock time is measured next to the FLOPs the
calibration predicted. The anytime curve (every sample uses the first ``k``
members) is measured on the same test set for comparison, and
[`plot_budget()`][ensemblekit.evaluation.budget.plot_budget] draws both (MSDNet / IMTA "budgeted batch classification").

Examples:
    >>> report = budget_sweep(ens, val_loader, test_loader)  # doctest: +SKIP
    >>> print(report.table())                                # doctest: +SKIP
    >>> plot_budget(report, "budget.png")                    # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter
from rich import box
from rich.console import Console
from rich.table import Table
from torch import Tensor

from ensemblekit.components.halting.budgeted import Budgeted, prefix_predictions
from ensemblekit.components.halting.fixed import Fixed
from ensemblekit.core.flops import FLOPS_NOTE
from ensemblekit.core.loaders import iter_batches
from ensemblekit.core.timing import timed
from ensemblekit.evaluation.formatting import format_si
from ensemblekit.evaluation.reports import Report, anytime_report, save_accuracy_figure

__all__ = ["AUTHORS_QS", "BudgetPoint", "BudgetReport", "budget_sweep", "plot_budget"]

AUTHORS_QS = tuple(p / 20 for p in range(1, 41))
"""The budget parameters of the IMTA code's dynamic evaluation: ``q = p / 20``, ``p = 1..40``."""


@dataclass
class BudgetPoint:
    """One budget of the sweep; accuracies are fractions, FLOPs per sample.

    Attributes:
        q: budget parameter.
        thresholds: the calibrated confidence threshold of each exit.
        expected_flops: FLOPs per sample the calibration predicts (held-out data).
        held_out_accuracy: accuracy on the held-out data.
        accuracy: test accuracy of [`predict()`][ensemblekit.core.ensemble.Ensemble.predict].
        flops: mean FLOPs per test sample of the prefixes actually used.
        members: mean members (exits) evaluated per test sample.
        fractions: fraction of test samples that stopped after each member.
        seconds: wall-clock seconds of ``predict`` over the test set (fastest of the repeats).
    """

    q: float
    thresholds: list[float]
    expected_flops: float
    held_out_accuracy: float
    accuracy: float
    flops: float
    members: float
    fractions: list[float]
    seconds: float


@dataclass
class BudgetReport:
    """A budget sweep and the anytime curve on the same test set.

    Attributes:
        points: one [`BudgetPoint`][ensemblekit.evaluation.budget.BudgetPoint] per budget, in sweep order.
        anytime: anytime report (prefix ``k`` for every sample) with FLOPs.
        full_flops: FLOPs per sample of all members.
        full_seconds: wall-clock seconds of ``predict`` over the test set with
            every member (same code path, nothing stops early).
        num_samples: test samples.
        batch_size: batch size of the timed runs.
    """

    points: list[BudgetPoint]
    anytime: Report
    full_flops: float
    full_seconds: float
    num_samples: int
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        out = asdict(self)
        out["anytime"] = self.anytime.to_dict()
        out["points"] = [{**p, "thresholds": [_finite(t) for t in p["thresholds"]]} for p in out["points"]]
        return out

    def save_json(self, path: str | Path) -> Path:
        """Write [`to_dict()`][ensemblekit.evaluation.budget.BudgetReport.to_dict] as JSON; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def table(self, title: str | None = None) -> str:
        """One row per budget: predicted vs measured FLOPs saving next to the measured time saving."""
        title = title or (f"budgeted batch classification, {self.num_samples} test samples, batch {self.batch_size}; "
                          f"all members: {format_si(self.full_flops)} FLOPs, {self.full_seconds:.3f} s")
        table = Table(box=box.MARKDOWN, title=title)
        for name in ("q", "val acc %", "test acc %", "members", "predicted FLOPs", "test FLOPs",
                     "FLOPs saved %", "seconds", "time saved %"):
            table.add_column(name, justify="right")
        for p in self.points:
            table.add_row(
                f"{p.q:.3g}", f"{100 * p.held_out_accuracy:.2f}", f"{100 * p.accuracy:.2f}", f"{p.members:.2f}",
                format_si(p.expected_flops), format_si(p.flops), f"{100 * (1 - p.flops / self.full_flops):.1f}",
                f"{p.seconds:.3f}", f"{100 * (1 - p.seconds / self.full_seconds):.1f}",
            )
        buffer = io.StringIO()
        Console(file=buffer, width=200, color_system=None, force_terminal=False).print(table)
        lines = [line.rstrip() for line in buffer.getvalue().strip("\n").splitlines()]
        return "\n".join([FLOPS_NOTE, *lines]) + "\n"


def _finite(x: float) -> float | str:
    return x if abs(x) != float("inf") else ("inf" if x > 0 else "-inf")


def _timed_predict(ensemble: Any, batches: list[tuple[Tensor, Tensor]], policy: Any,
                   repeats: int = 1) -> tuple[Any, float]:
    """``predict`` over every batch; returns the concatenated results and the fastest of ``repeats`` timings."""
    device = next(ensemble.parameters()).device
    seconds = float("inf")
    for _ in range(repeats):
        results, elapsed = timed(lambda: [ensemble.predict(x, halting=policy) for x, _ in batches], device)
        seconds = min(seconds, elapsed)
    prediction = torch.cat([r.prediction for r in results]).cpu()
    used = torch.cat([r.members_used for r in results]).cpu()
    flops = torch.cat([r.flops for r in results]).cpu()
    return (prediction, used, flops), seconds


def budget_sweep(ensemble: Any, held_out: Any, test: Any, qs: Sequence[float] = AUTHORS_QS,
                 batch_size: int = 256, repeats: int = 3) -> BudgetReport:
    """Calibrate a [`Budgeted`][ensemblekit.components.halting.Budgeted] policy per ``q`` and evaluate it.

    Args:
        ensemble: an [`Ensemble`][ensemblekit.core.ensemble.Ensemble] (any topology).
        held_out: held-out split for calibration: a loader or ``(images, labels)``.
        test: test split, a loader or ``(images, labels)``; held in memory
            (on the ensemble's device) so that timing excludes data loading.
        qs: budget parameters to sweep.
        batch_size: batch size of the timed ``predict`` runs.
        repeats: each timing is the fastest of this many runs (less noise from other processes).

    Returns:
        A [`BudgetReport`][ensemblekit.evaluation.budget.BudgetReport].
    """
    device = next(ensemble.parameters()).device
    was_training = ensemble.training
    ensemble.eval()
    try:
        val_preds, val_labels = prefix_predictions(ensemble, held_out)
        xs, ys = zip(*[(x, torch.as_tensor(y)) for x, y in iter_batches(test, batch_size)])
        x_all, y_all = torch.cat(xs), torch.cat(ys).long()
        costs = ensemble.cost_table(input_size=tuple(x_all.shape[1:]))  # FLOPs per test image
        cum_flops = [float(row.flops) for row in costs]
        batches = [(x_all[i:i + batch_size].to(device), y_all[i:i + batch_size]) for i in range(0, len(x_all),
                                                                                              batch_size)]
        with torch.no_grad():
            members = torch.cat([ensemble.forward_members(x).float().cpu() for x, _ in batches])
        anytime = anytime_report(members, y_all, ensemble.aggregator, costs=costs)
        full = Fixed(ensemble.num_members)
        _timed_predict(ensemble, batches[:1], full)  # warm-up: first calls allocate and pick kernels
        _, full_seconds = _timed_predict(ensemble, batches, full, repeats)
        points = []
        for q in qs:
            policy = Budgeted(q=q)
            policy.calibrate_from_predictions(val_preds, val_labels, cum_flops, input_size=x_all.shape[-2:])
            (prediction, used, flops), seconds = _timed_predict(ensemble, batches, policy, repeats)
            fractions = torch.bincount(used - 1, minlength=ensemble.num_members).double() / len(used)
            points.append(BudgetPoint(
                q=float(q), thresholds=policy.thresholds.tolist(), expected_flops=policy.expected_flops,
                held_out_accuracy=policy.held_out_accuracy,
                accuracy=float((prediction.argmax(-1) == y_all).double().mean()),
                flops=float(flops.double().mean()), members=float(used.double().mean()),
                fractions=fractions.tolist(), seconds=seconds,
            ))
    finally:
        ensemble.train(was_training)
    return BudgetReport(points, anytime, cum_flops[-1], full_seconds, len(y_all), batch_size)


def plot_budget(report: BudgetReport, path: str | Path, title: str | None = None) -> Path:
    """Accuracy vs average FLOPs per sample: the budgeted curve next to the anytime curve (PNG)."""
    fig = Figure(figsize=(6.4, 4.4), dpi=150)
    ax = fig.add_subplot()
    points = sorted(report.points, key=lambda p: p.flops)
    ax.plot([p.flops for p in points], [100 * p.accuracy for p in points], marker="o", markersize=3,
            linewidth=1.5, label="budgeted (per-sample early exit)")
    ax.plot(report.anytime.prefix_flops, [100 * a for a in report.anytime.prefix_accuracy], marker="s",
            markersize=4, linewidth=1.5, label="anytime (first k members for every sample)")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("average FLOPs per image (multiply-add = 2)")
    ax.grid(True, alpha=0.3)
    return save_accuracy_figure(fig, ax, path, title)
