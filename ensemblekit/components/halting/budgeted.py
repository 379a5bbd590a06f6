"""Budgeted batch classification (MSDNet Sec. 4.1, used by IMTA Sec. 4): thresholds fit to a budget.

For a budget parameter ``q``, a sample should leave at exit ``k`` (``k = 1..n``)
with probability ``pi_k = q^k / sum_j q^j``. On a held-out split of ``N``
samples, the threshold of exit ``k`` is the max-softmax confidence that lets
exactly ``floor(N pi_k)`` of the samples still running stop there (more only
on ties); the last exit takes the rest. The expected cost is
``sum_k f_k * C_k``: ``f_k`` the fraction of held-out samples that left at
exit ``k``, ``C_k`` the cumulative FLOPs of exits ``1..k``
(:meth:`~ensemblekit.Ensemble.cost_table`). Sweeping ``q`` traces an
accuracy-vs-FLOPs curve; a target average cost is met by solving for ``q``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ensemblekit.core.interfaces import HaltingPolicy, HaltingStep
from ensemblekit.core.loaders import iter_batches
from ensemblekit.functional import confidence, exit_distribution, exit_indices, expected_cost

__all__ = [
    "Q_SEARCH_RANGE",
    "Budgeted",
    "exit_distribution",
    "exit_indices",
    "expected_flops",
    "fit_thresholds",
    "iter_batches",
    "prefix_predictions",
    "solve_q",
]

Q_SEARCH_RANGE = (1e-3, 1e3)
"""Interval of ``q`` searched when a target FLOPs is given (pi is almost all on exit 1 / exit n at its ends)."""


def fit_thresholds(conf: Tensor, pi: Tensor) -> Tensor:
    """Thresholds ``[M]`` that let ``floor(N pi_k)`` still-running samples stop at exit ``k``.

    Args:
        conf: held-out confidences ``[N, M]`` (sample, exit).
        pi: target exit distribution ``[M]``.

    Returns:
        ``thresholds [M]``; a sample stops at the first exit with
        ``conf >= threshold``; ``+inf`` lets none stop, the last is ``-inf``.
    """
    n, m = conf.shape
    if pi.shape != (m,):
        raise ValueError(f"pi has shape {tuple(pi.shape)}, expected [{m}]")
    thresholds = torch.full((m,), math.inf, dtype=conf.dtype)
    running = torch.ones(n, dtype=torch.bool)
    for k in range(m - 1):
        count = math.floor(n * float(pi[k]))
        candidates = conf[running, k]
        if count > 0 and len(candidates) > 0:
            ranked = candidates.sort(descending=True).values
            thresholds[k] = ranked[min(count, len(ranked)) - 1]
        running &= ~(conf[:, k] >= thresholds[k])
    thresholds[m - 1] = -math.inf
    return thresholds


def prefix_predictions(ensemble: Any, data: Any, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Prefix predictions ``[N, M, C]`` and labels ``[N]`` of ``ensemble`` on ``data`` (eval mode, CPU out).

    Args:
        ensemble: an :class:`~ensemblekit.Ensemble`.
        data: a loader yielding ``(images, labels, ...)`` or an ``(images, labels)`` pair of tensors.
        batch_size: batch size used for an ``(images, labels)`` pair.
    """
    device = next(ensemble.parameters()).device
    was_training = ensemble.training
    ensemble.eval()
    preds, labels = [], []
    try:
        with torch.no_grad():
            for x, y in iter_batches(data, batch_size):
                preds.append(ensemble.forward_output(x.to(device)).prefixes().float().cpu())
                labels.append(torch.as_tensor(y).long().cpu())
    finally:
        ensemble.train(was_training)
    if not preds:
        raise ValueError("the held-out data yielded no samples")
    return torch.cat(preds), torch.cat(labels)


class Budgeted(HaltingPolicy):
    """MSDNet's budgeted batch classification: confidence thresholds fit on held-out data.

    Give either ``q`` (exit distribution ``pi_k ~ q^k``) or ``flops`` (a
    target average FLOPs per sample; ``q`` is solved for on the held-out
    data), then call :meth:`calibrate` on a held-out split (never the test
    set); or give ``thresholds`` found earlier. Confidences are those of
    :attr:`HaltingStep.prediction`.

    Args:
        q: budget parameter ``q > 0``; small values favour early exits.
        flops: target average FLOPs per sample.
        thresholds: calibrated thresholds, one per exit (e.g. from a saved
            calibration); :meth:`calibrate` replaces them.

    Attributes (after :meth:`calibrate`):
        thresholds: one per exit ``[M]``.
        q: the budget parameter used.
        fractions: fraction of held-out samples that stopped at each exit.
        expected_flops: ``sum_k fractions_k * cumulative FLOPs_k`` on the held-out data.
        held_out_accuracy: accuracy on the held-out data with these thresholds.
    """

    def __init__(self, q: float | None = None, flops: float | None = None,
                 thresholds: Sequence[float] | None = None):
        super().__init__()
        if (q is not None and flops is not None) or (q is None and flops is None and thresholds is None):
            raise ValueError("give exactly one of q (budget parameter) or flops (target average FLOPs), "
                             "or calibrated thresholds")
        if q is not None and not q > 0:
            raise ValueError(f"q must be > 0, got {q}")
        if flops is not None and not flops > 0:
            raise ValueError(f"flops must be > 0, got {flops}")
        self.q = q
        self.target_flops = flops
        self.register_buffer("thresholds", None if thresholds is None else torch.tensor(thresholds,
                                                                                          dtype=torch.float32))
        self.fractions: list[float] = []
        self.expected_flops = math.nan
        self.held_out_accuracy = math.nan

    @classmethod
    def example_options(cls) -> dict[str, Any]:
        """Options for :mod:`ensemblekit.testing`'s conformance checks (four exits, already calibrated)."""
        return {"thresholds": [0.3, 0.25, 0.2, -math.inf]}

    def calibrate(self, ensemble: Any, data: Any) -> None:
        """Fit the thresholds on held-out ``data`` (a loader or an ``(images, labels)`` pair)."""
        preds, labels = prefix_predictions(ensemble, data)
        cum_flops = [float(row.flops) for row in ensemble.cost_table()]
        self.calibrate_from_predictions(preds, labels, cum_flops)

    def calibrate_from_predictions(self, preds: Tensor, labels: Tensor, cum_flops: Sequence[float]) -> None:
        """:meth:`calibrate` from held-out prefix predictions ``[N, M, C]`` and cumulative FLOPs ``[M]``."""
        conf = confidence(preds)
        correct = preds.argmax(-1) == labels[:, None]
        if self.target_flops is not None:
            self.q = solve_q(conf, cum_flops, self.target_flops)
        if self.q is None:
            raise ValueError("calibration needs q or flops; this policy was given thresholds only")
        thresholds = fit_thresholds(conf, exit_distribution(self.q, conf.shape[1]))
        exits = exit_indices(conf, thresholds)
        fractions = torch.bincount(exits, minlength=conf.shape[1]).double() / len(exits)
        self.thresholds = thresholds.float()
        self.fractions = fractions.tolist()
        self.expected_flops = float(expected_cost(fractions, cum_flops))
        self.held_out_accuracy = float(correct[torch.arange(len(exits)), exits].double().mean())

    def step(self, step: HaltingStep, state: dict[str, Tensor] | None) -> tuple[Tensor, None]:
        if self.thresholds is None:
            raise ValueError("the budgeted policy is not calibrated: call policy.calibrate(ensemble, held_out_data)")
        if len(self.thresholds) != step.num_members:
            raise ValueError(f"calibrated for {len(self.thresholds)} exits, the ensemble has {step.num_members}")
        conf = confidence(step.prediction)
        return conf >= self.thresholds[step.index].to(conf.device), None


def expected_flops(conf: Tensor, cum_flops: Sequence[float], q: float) -> float:
    """Held-out expected FLOPs per sample of the thresholds fit for ``q``."""
    exits = exit_indices(conf, fit_thresholds(conf, exit_distribution(q, conf.shape[1])))
    flops = torch.tensor(cum_flops, dtype=torch.float64)
    return float(flops[exits].mean())


def solve_q(conf: Tensor, cum_flops: Sequence[float], target: float, steps: int = 60) -> float:
    """The ``q`` whose held-out expected FLOPs come closest to ``target`` from below.

    Expected FLOPs grow with ``q`` (up to the rounding of ``floor(N pi_k)``);
    bisection on ``log q`` over :data:`Q_SEARCH_RANGE`.
    """
    lo, hi = (math.log(v) for v in Q_SEARCH_RANGE)
    low_cost, high_cost = expected_flops(conf, cum_flops, math.exp(lo)), expected_flops(conf, cum_flops, math.exp(hi))
    if target < low_cost:
        raise ValueError(
            f"a budget of {target:.4g} FLOPs is below the cheapest this ensemble reaches on the held-out data "
            f"({low_cost:.4g}; all samples at the first exit costs {cum_flops[0]:.4g})"
        )
    if target >= high_cost:
        return math.exp(hi)
    best = lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        if expected_flops(conf, cum_flops, math.exp(mid)) <= target:
            best = lo = mid
        else:
            hi = mid
    return math.exp(best)
