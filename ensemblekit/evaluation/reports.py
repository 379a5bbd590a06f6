"""Evaluation report of a trained ensemble, computed from member logits.

Everything here works on tensors (member logits ``[N, M, C]`` and labels
``[N]``), so it does not depend on how the ensemble was built: collect the
logits once with [`collect_members()`][ensemblekit.evaluation.reports.collect_members], then
[`anytime_report()`][ensemblekit.evaluation.reports.anytime_report] measures every prefix of members (the
anytime curve) and [`plot_accuracy_vs_flops()`][ensemblekit.evaluation.reports.plot_accuracy_vs_flops] draws the
curves of several models in one figure.

Examples:
    >>> members, labels = collect_members(model, test_loader, "cpu")  # doctest: +SKIP
    >>> report = anytime_report(members, labels, aggregator, costs=costs)  # doctest: +SKIP
    >>> print(report.table())  # doctest: +SKIP
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, LogLocator, MaxNLocator, NullFormatter
from rich import box
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torchmetrics.functional.classification import multiclass_calibration_error

from ensemblekit.core.flops import FLOPS_NOTE
from ensemblekit.core.interfaces import Aggregator
from ensemblekit.core.loaders import iter_batches
from ensemblekit.errors import InvalidValueError
from ensemblekit.evaluation.bootstrap import bootstrap_intervals
from ensemblekit.evaluation.formatting import format_si

__all__ = [
    "ECE_BINS",
    "Report",
    "anytime_report",
    "collect_members",
    "plot_accuracy_vs_flops",
    "save_accuracy_figure",
]

ECE_BINS = 15


def collect_members(
    fn: Callable[[Tensor], Any], loader: Iterable, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Run ``fn`` over ``loader`` and gather member logits and labels on the CPU.

    Args:
        fn: maps a batch of images to member logits ``[B, M, C]`` (or to an
            object with a ``members`` attribute, such as an ``EnsembleOutput``).
        loader: yields ``(images, labels, ...)`` batches (or an ``(images,
            labels)`` pair of tensors, cut into batches of 256).
        device: where ``fn`` runs; images are moved there.

    Returns:
        ``(members [N, M, C] float32, labels [N] int64)``, both on the CPU.

    Examples:
        >>> loader = [(torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]))]
        >>> members, labels = collect_members(lambda x: torch.zeros(len(x), 2, 5), loader)
        >>> tuple(members.shape), tuple(labels.shape)
        ((4, 2, 5), (4,))
    """
    all_members, all_labels = [], []
    with torch.inference_mode():
        for images, labels in iter_batches(loader):
            out = fn(images.to(device))
            out = getattr(out, "members", out)
            if not isinstance(out, Tensor) or out.ndim != 3 or out.shape[0] != len(labels):
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise InvalidValueError(f"fn must return member logits [batch={len(labels)}, members, classes], got "
                                        f"{shape}")
            all_members.append(out.float().cpu())
            all_labels.append(torch.as_tensor(labels).cpu())
    if not all_members:
        raise InvalidValueError("the loader yielded no batches")
    return torch.cat(all_members), torch.cat(all_labels).long()


@dataclass
class Report:
    """Anytime evaluation of an ensemble: one entry per prefix size ``k = 1..M``.

    Accuracies and calibration errors are fractions in [0, 1]. Entry ``k-1``
    of a ``prefix_*`` list describes the ensemble of members ``0..k-1``;
    entry ``m`` of ``member_accuracy`` describes member ``m`` alone.

    Attributes:
        num_samples: evaluated samples.
        num_classes: classes.
        prefix_accuracy: top-1 accuracy of each prefix ensemble.
        member_accuracy: top-1 accuracy of each member alone.
        prefix_diversity: HNE's diversity of the prefix's members: standard
            deviation (unbiased) of the logits across members, averaged over
            classes and samples; ``nan`` for one member.
        prefix_ece: expected calibration error (15 equal-width bins, l1) of
            each prefix ensemble's softmax.
        prefix_nll: mean negative log-likelihood of each prefix ensemble.
        prefix_flops: FLOPs per sample of each prefix (a multiply-add is 2), when costs were given.
        prefix_params: parameters used by each prefix, when costs were given.
        prefix_accuracy_low, prefix_accuracy_high: 95% bootstrap interval of
            each prefix's accuracy over the test samples
            ([`bootstrap_intervals()`][ensemblekit.evaluation.bootstrap.bootstrap_intervals]).
        prefix_gain_low, prefix_gain_high: 95% interval of each prefix's gain
            over the first member, paired on the same images: a gain is real
            when ``prefix_gain_low`` is above 0.
    """

    num_samples: int
    num_classes: int
    prefix_accuracy: list[float]
    member_accuracy: list[float]
    prefix_diversity: list[float]
    prefix_ece: list[float]
    prefix_nll: list[float]
    prefix_flops: list[float] | None = None
    prefix_params: list[float] | None = None
    prefix_accuracy_low: list[float] | None = None
    prefix_accuracy_high: list[float] | None = None
    prefix_gain_low: list[float] | None = None
    prefix_gain_high: list[float] | None = None

    @property
    def num_members(self) -> int:
        """Members in the ensemble (``M``)."""
        return len(self.prefix_accuracy)

    @property
    def accuracy(self) -> float:
        """Accuracy of the full ensemble."""
        return self.prefix_accuracy[-1]

    @property
    def diversity(self) -> float:
        """Diversity of all members (``nan`` for a single member)."""
        return self.prefix_diversity[-1]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``nan`` becomes ``None``).

        Examples:
            >>> r = Report(10, 2, [0.5], [0.5], [float("nan")], [0.1], [0.7])
            >>> r.to_dict()["prefix_diversity"]
            [None]
        """
        out: dict[str, Any] = {"num_members": self.num_members}
        for key, value in asdict(self).items():
            out[key] = [None if math.isnan(v) else v for v in value] if isinstance(value, list) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """Inverse of [`to_dict()`][ensemblekit.evaluation.reports.Report.to_dict] (``None`` in lists becomes ``nan``).

        Examples:
            >>> r = Report(10, 2, [0.5], [0.5], [float("nan")], [0.1], [0.7])
            >>> Report.from_dict(r.to_dict()).prefix_accuracy
            [0.5]
        """
        kwargs = {}
        for f in fields(cls):
            if f.name in data:
                value = data[f.name]
                if isinstance(value, list):
                    value = [math.nan if v is None else float(v) for v in value]
                kwargs[f.name] = value
        return cls(**kwargs)

    def save_json(self, path: str | Path) -> Path:
        """Write [`to_dict()`][ensemblekit.evaluation.reports.Report.to_dict] as JSON to ``path`` (parents are
        created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load_json(cls, path: str | Path) -> Report:
        """Read a report written by [`save_json()`][ensemblekit.evaluation.reports.Report.save_json]."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def table(self, title: str | None = None) -> str:
        """The report as an aligned text table (Markdown), one row per prefix size.

        With costs, a first line says how FLOPs are counted (a multiply-add is 2).

        Examples:
            >>> r = Report(10, 2, [0.5, 0.6], [0.5, 0.4], [float("nan"), 0.3], [0.1, 0.05], [0.7, 0.6])
            >>> "60.00" in r.table()
            True
        """
        title = title or f"{self.num_samples} samples, {self.num_members} members, {self.num_classes} classes"
        table = Table(box=box.MARKDOWN, title=title)
        table.add_column("k", justify="right")
        if self.prefix_flops is not None:
            table.add_column("FLOPs", justify="right")
        if self.prefix_params is not None:
            table.add_column("params", justify="right")
        intervals = self.prefix_accuracy_low is not None and self.prefix_gain_low is not None
        table.add_column("acc %", justify="right")
        if intervals:
            table.add_column("95% CI", justify="right")
            table.add_column("gain vs k=1 (95% CI)", justify="right")
        for name in ("member k acc %", "diversity", "ECE %", "NLL"):
            table.add_column(name, justify="right")
        for k in range(self.num_members):
            cost = []
            if self.prefix_flops is not None:
                cost.append(format_si(self.prefix_flops[k]))
            if self.prefix_params is not None:
                cost.append(format_si(self.prefix_params[k]))
            div = self.prefix_diversity[k]
            spread = []
            if intervals:
                assert self.prefix_accuracy_high is not None and self.prefix_gain_high is not None
                spread = [f"{100 * self.prefix_accuracy_low[k]:.2f}-{100 * self.prefix_accuracy_high[k]:.2f}",
                          f"{100 * (self.prefix_accuracy[k] - self.prefix_accuracy[0]):+.2f} "
                          f"({100 * self.prefix_gain_low[k]:+.2f}, {100 * self.prefix_gain_high[k]:+.2f})"]
            table.add_row(
                str(k + 1),
                *cost,
                f"{100 * self.prefix_accuracy[k]:.2f}",
                *spread,
                f"{100 * self.member_accuracy[k]:.2f}",
                "-" if math.isnan(div) else f"{div:.4f}",
                f"{100 * self.prefix_ece[k]:.2f}",
                f"{self.prefix_nll[k]:.4f}",
            )
        buffer = io.StringIO()
        Console(file=buffer, width=200, color_system=None, force_terminal=False).print(table)
        lines = [line.rstrip() for line in buffer.getvalue().strip("\n").splitlines()]
        return "\n".join(([FLOPS_NOTE] if self.prefix_flops is not None else []) + lines) + "\n"


def _device_of(module: torch.nn.Module) -> torch.device:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def anytime_report(
    members: Tensor,
    labels: Tensor,
    aggregator: Aggregator,
    costs: Sequence[tuple[float, float] | Any] | None = None,
    bootstrap: int = 1000,
) -> Report:
    """Measure every prefix of members: accuracy with bootstrap intervals, diversity, calibration, NLL.

    Args:
        members: member logits ``[N, M, C]`` in anytime order.
        labels: integer labels ``[N]``.
        aggregator: combines members; prefix ``k`` is
            ``aggregator.prefixes(members)[:, k-1]``, whose softmax is the
            ensemble's predictive distribution.
        costs: optional cost of each prefix size ``1..M``: ``(flops, params)``
            pairs, or objects with ``flops`` and ``params`` attributes (such as
            ``EnsembleCosts.prefix_table()``).
        bootstrap: resamples of the test samples for the 95% intervals of
            each prefix's accuracy and of its gain over the first member
            ([`bootstrap_intervals()`][ensemblekit.evaluation.bootstrap.bootstrap_intervals]);
            0 for none.

    Returns:
        A [`Report`][ensemblekit.evaluation.reports.Report].

    Examples:
        >>> from ensemblekit.components.aggregators import MeanLogits
        >>> members = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 3.0]]])
        >>> r = anytime_report(members, torch.tensor([0, 1]), MeanLogits())
        >>> r.member_accuracy, r.prefix_accuracy
        ([1.0, 0.5], [1.0, 1.0])
    """
    if members.ndim != 3 or members.shape[1] == 0:
        raise InvalidValueError(f"members must be [samples, members, classes], got shape {tuple(members.shape)}")
    n, m, c = members.shape
    if labels.shape != (n,):
        raise InvalidValueError(f"labels must be [{n}] to match members {tuple(members.shape)}, got "
                                f"{tuple(labels.shape)}")
    if costs is not None and len(costs) != m:
        raise InvalidValueError(f"costs needs one (flops, params) per prefix size 1..{m}, got {len(costs)}")
    if costs is not None:
        costs = [(c.flops, c.params) if hasattr(c, "flops") else tuple(c) for c in costs]
    members = members.detach().float().cpu()
    labels = labels.detach().long().cpu()
    with torch.inference_mode():
        preds = aggregator.prefixes(members.to(_device_of(aggregator))).float().cpu()
    if preds.shape != members.shape:
        raise InvalidValueError(f"aggregator.prefixes returned shape {tuple(preds.shape)}, expected "
                                f"{tuple(members.shape)}")
    log_probs = preds.log_softmax(dim=-1)
    target = labels[:, None].expand(n, m)
    prefix_accuracy = (preds.argmax(dim=-1) == target).double().mean(dim=0)
    member_accuracy = (members.argmax(dim=-1) == target).double().mean(dim=0)
    nll = F.nll_loss(log_probs.reshape(n * m, c), target.reshape(-1), reduction="none").view(n, m).mean(dim=0)
    ece = [
        multiclass_calibration_error(log_probs[:, k].exp(), labels, num_classes=c, n_bins=ECE_BINS, norm="l1").item()
        for k in range(m)
    ]
    diversity = [math.nan] + [members[:, :k].std(dim=1).mean().item() for k in range(2, m + 1)]
    intervals = bootstrap_intervals(preds.argmax(dim=-1) == target, resamples=bootstrap) if bootstrap else None
    return Report(
        num_samples=n,
        num_classes=c,
        prefix_accuracy=prefix_accuracy.tolist(),
        member_accuracy=member_accuracy.tolist(),
        prefix_diversity=diversity,
        prefix_ece=ece,
        prefix_nll=nll.tolist(),
        prefix_flops=None if costs is None else [float(f) for f, _ in costs],
        prefix_params=None if costs is None else [float(p) for _, p in costs],
        prefix_accuracy_low=None if intervals is None else intervals.accuracy_low,
        prefix_accuracy_high=None if intervals is None else intervals.accuracy_high,
        prefix_gain_low=None if intervals is None else intervals.gain_low,
        prefix_gain_high=None if intervals is None else intervals.gain_high,
    )


def plot_accuracy_vs_flops(reports: Mapping[str, Report], path: str | Path, title: str | None = None) -> Path:
    """Plot accuracy against the FLOPs of each prefix, one curve per model (PNG), with a shaded 95%
    bootstrap band where the reports have intervals.

    Every report needs ``prefix_flops``; if none has them the x axis is the
    number of members instead. The x axis is logarithmic when the FLOPs span
    at least a factor of 10.

    Args:
        reports: label -> report, one curve each.
        path: PNG file to write (parents are created).
        title: optional figure title.

    Returns:
        ``path``.

    Examples:
        >>> plot_accuracy_vs_flops({"HNE": report_a, "baseline": report_b}, "acc_flops.png")  # doctest: +SKIP
    """
    if not reports:
        raise InvalidValueError("no reports to plot")
    with_flops = [name for name, r in reports.items() if r.prefix_flops is not None]
    if with_flops and len(with_flops) != len(reports):
        missing = sorted(set(reports) - set(with_flops))
        raise InvalidValueError(f"reports {missing} have no FLOPs; pass costs to anytime_report for every model")
    fig = Figure(figsize=(6.4, 4.4), dpi=150)
    ax = fig.add_subplot()
    markers = itertools.cycle("osD^v<>ph*")
    xs_all: list[float] = []
    for (name, report), marker in zip(reports.items(), markers):
        xs = report.prefix_flops if with_flops else list(range(1, report.num_members + 1))
        xs_all += xs
        (line,) = ax.plot(xs, [100 * a for a in report.prefix_accuracy], marker=marker, markersize=4, linewidth=1.5,
                          label=name)
        if report.prefix_accuracy_low is not None and report.prefix_accuracy_high is not None:
            ax.fill_between(xs, [100 * a for a in report.prefix_accuracy_low],
                            [100 * a for a in report.prefix_accuracy_high], color=line.get_color(), alpha=0.15,
                            linewidth=0)
    if with_flops:
        positive = [x for x in xs_all if x > 0]
        span = max(positive) / min(positive) if positive and len(positive) == len(xs_all) else 1.0
        if span >= 10:
            ax.set_xscale("log")
            # Label 2x and 5x ticks too when there are only one or two decades.
            ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            ax.xaxis.set_minor_formatter(EngFormatter() if span < 100 else NullFormatter())
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.set_xlabel("FLOPs per image (multiply-add = 2)")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("members evaluated")
    ax.grid(True, which="both", alpha=0.3)
    return save_accuracy_figure(fig, ax, path, title)


def save_accuracy_figure(fig: Figure, ax: Any, path: str | Path, title: str | None) -> Path:
    """Label the accuracy axis, add the title and legend, and save ``fig`` to ``path`` (folders made)."""
    ax.set_ylabel("top-1 accuracy (%)")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
