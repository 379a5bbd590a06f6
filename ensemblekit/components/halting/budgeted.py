"""Budgeted batch classification (MSDNet Sec. 4.1, used by IMTA Sec. 4): thresholds fit to a budget.

For a budget parameter ``q``, a sample should leave at exit ``k`` (``k = 1..n``)
with probability ``pi_k = q^k / sum_j q^j``. On a held-out split of ``N``
samples, the threshold of exit ``k`` is the max-softmax confidence of the
``floor(N pi_k)``-th most confident sample still running, so that sample and
every one at least as confident stop there (exactly ``floor(N pi_k)`` unless
confidences tie at the threshold); the last exit takes the rest.

Ties make a rule necessary: when tied samples left early, a later exit may
find fewer samples still running than its quota ``floor(N pi_k)``. With
``ties="early"`` (the default) that exit lets all of them stop (they leave
as early as the budget allows); with ``ties="msdnet"`` it lets none stop
(MSDNet's code keeps the exit's threshold at its initial ``1e8``), so they
go on to the next exits, in practice to the last one. Without ties both
rules give the same thresholds. The expected cost is
``sum_k f_k * C_k``: ``f_k`` the fraction of held-out samples that left at
exit ``k``, ``C_k`` the cumulative FLOPs of exits ``1..k``
([`cost_table()`][ensemblekit.core.ensemble.Ensemble.cost_table] at the held-out images' size; a
multiply-add is 2 FLOPs, MSDNet counts it as 1). Sweeping ``q`` traces an
accuracy-vs-FLOPs curve; a target average cost is met by solving for ``q``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ensemblekit.core.cost import CostError
from ensemblekit.core.interfaces import HaltingPolicy, HaltingStep
from ensemblekit.core.loaders import iter_batches
from ensemblekit.errors import EnsembleKitError
from ensemblekit.functional import confidence, exit_distribution, exit_indices, expected_cost

__all__ = [
    "Q_SEARCH_RANGE",
    "TIE_RULES",
    "BudgetError",
    "Budgeted",
    "exit_distribution",
    "exit_indices",
    "expected_flops",
    "fit_thresholds",
    "iter_batches",
    "prefix_predictions",
    "solve_q",
]

class BudgetError(EnsembleKitError, ValueError):
    """A budgeted policy's option that is not allowed, or a calibration it lacks or cannot do (for this ensemble,
    with these held-out data or this budget)."""


Q_SEARCH_RANGE = (1e-3, 1e3)
"""Interval of ``q`` searched when a target FLOPs is given (pi is almost all on exit 1 / exit n at its ends)."""


TIE_RULES = ("early", "msdnet")
"""What an exit does when ties left fewer samples running than its quota (see the module docstring)."""


def fit_thresholds(conf: Tensor, pi: Tensor, ties: str = "early") -> Tensor:
    """Thresholds ``[M]`` that let ``floor(N pi_k)`` still-running samples stop at exit ``k``.

    Args:
        conf: held-out confidences ``[N, M]`` (sample, exit).
        pi: target exit distribution ``[M]``.
        ties: "early": an exit whose quota exceeds the samples still running
            lets all of them stop; "msdnet": it lets none stop (MSDNet's code).

    Returns:
        ``thresholds [M]``; a sample stops at the first exit with
        ``conf >= threshold``; ``+inf`` lets none stop, the last is ``-inf``.
    """
    n, m = conf.shape
    if pi.shape != (m,):
        raise BudgetError(f"pi has shape {tuple(pi.shape)}, expected [{m}]")
    _check_ties(ties)
    thresholds = torch.full((m,), math.inf, dtype=conf.dtype)
    running = torch.ones(n, dtype=torch.bool)
    for k in range(m - 1):
        count = math.floor(n * float(pi[k]))
        candidates = conf[running, k]
        if count > 0 and len(candidates) > 0 and (count <= len(candidates) or ties == "early"):
            ranked = candidates.sort(descending=True).values
            thresholds[k] = ranked[min(count, len(ranked)) - 1]
        running &= ~(conf[:, k] >= thresholds[k])
    thresholds[m - 1] = -math.inf
    return thresholds


def _check_ties(ties: Any) -> None:
    if ties not in TIE_RULES:
        raise BudgetError(f"ties must be one of {', '.join(map(repr, TIE_RULES))}, got {ties!r}")


def prefix_predictions(ensemble: Any, data: Any, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Prefix predictions ``[N, M, C]`` and labels ``[N]`` of ``ensemble`` on ``data`` (eval mode, CPU out).

    Images are cast to the ensemble's device and floating-point dtype.

    Args:
        ensemble: an [`Ensemble`][ensemblekit.core.ensemble.Ensemble].
        data: a loader yielding ``(images, labels, ...)`` or an ``(images, labels)`` pair of tensors.
        batch_size: batch size used for an ``(images, labels)`` pair.
    """
    preds, labels, _ = _prefix_predictions(ensemble, data, batch_size)
    return preds, labels


def _prefix_predictions(ensemble: Any, data: Any, batch_size: int) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
    """[`prefix_predictions()`][ensemblekit.components.halting.budgeted.prefix_predictions] and the image shape
    ``(C, H, W)`` every batch had."""
    weight = next(ensemble.parameters())
    was_training = ensemble.training
    ensemble.eval()
    preds, labels, shapes = [], [], set()
    try:
        with torch.no_grad():
            for x, y in iter_batches(data, batch_size):
                x = x.to(weight.device, weight.dtype if x.is_floating_point() else None)
                preds.append(ensemble.forward_output(x).prefixes().float().cpu())
                labels.append(torch.as_tensor(y).long().cpu())
                shapes.add(tuple(x.shape[1:]))
    finally:
        ensemble.train(was_training)
    if not preds:
        raise BudgetError("the held-out data yielded no samples")
    if len(shapes) > 1:
        raise CostError(f"the held-out images have several sizes {sorted(shapes)}; a FLOPs budget holds at one "
                        "size: resize them to the size the ensemble will run at")
    return torch.cat(preds), torch.cat(labels), shapes.pop()


class Budgeted(HaltingPolicy):
    """MSDNet's budgeted batch classification: confidence thresholds fit on held-out data.

    Give either ``q`` (exit distribution ``pi_k ~ q^k``) or ``flops`` (a
    target average FLOPs per sample; ``q`` is solved for on the held-out
    data), then call [`calibrate()`][ensemblekit.components.halting.budgeted.Budgeted.calibrate] on a held-out
    split (never the test set); or give ``thresholds`` found earlier. Confidences are those of
    `HaltingStep.prediction`.

    FLOPs depend on the image size: a budget holds for images of the size
    [`calibrate()`][ensemblekit.components.halting.budgeted.Budgeted.calibrate] saw (`input_size`), and counts a
    multiply-add as 2 FLOPs (MSDNet's budgets count it as 1: pass twice their number).

    Args:
        q: budget parameter ``q > 0``; small values favour early exits.
        flops: target average FLOPs per sample, at the held-out images' size.
        thresholds: calibrated thresholds, one per exit (e.g. from a saved
            calibration); [`calibrate()`][ensemblekit.components.halting.budgeted.Budgeted.calibrate] replaces them.
        ties: what an exit does when tied confidences left fewer samples
            running than its quota: "early" (all of them stop there) or
            "msdnet" (none does, as in MSDNet's code); see the module docstring.

    Attributes (after [`calibrate()`][ensemblekit.components.halting.budgeted.Budgeted.calibrate]):
        thresholds: one per exit ``[M]``, a buffer (in ``state_dict()`` and
            checkpoints); NaN once bound to an ensemble and not yet
            calibrated, so a calibrated state loads into a fresh policy.
        q: the budget parameter used.
        fractions: fraction of held-out samples that stopped at each exit.
        expected_flops: ``sum_k fractions_k * cumulative FLOPs_k`` on the held-out data.
        held_out_accuracy: accuracy on the held-out data with these thresholds.
        input_size: ``(H, W)`` of the held-out images, the size ``flops`` and
            ``expected_flops`` are per image of (``None`` before calibration).
    """

    thresholds: Tensor | None  # a buffer

    def __init__(self, q: float | None = None, flops: float | None = None,
                 thresholds: Sequence[float] | None = None, ties: str = "early"):
        super().__init__()
        _check_ties(ties)
        if (q is not None and flops is not None) or (q is None and flops is None and thresholds is None):
            raise BudgetError("give exactly one of q (budget parameter) or flops (target average FLOPs), "
                              "or calibrated thresholds")
        if q is not None and not q > 0:
            raise BudgetError(f"q must be > 0, got {q}")
        if flops is not None and not flops > 0:
            raise BudgetError(f"flops must be > 0, got {flops}")
        self.q = q
        self.target_flops = flops
        self.ties = ties
        self.register_buffer("thresholds", None if thresholds is None else torch.tensor(thresholds,
                                                                                          dtype=torch.float32))
        self.fractions: list[float] = []
        self.expected_flops = math.nan
        self.held_out_accuracy = math.nan
        self.input_size: tuple[int, int] | None = None

    def extra_repr(self) -> str:
        size = "" if self.input_size is None else f" per {self.input_size[0]}x{self.input_size[1]} image"
        flops = "" if self.target_flops is None else f", flops={self.target_flops:.4g}{size}"
        return f"q={self.q}{flops}"

    @classmethod
    def example_options(cls) -> dict[str, Any]:
        """Options for [`ensemblekit.testing`][ensemblekit.testing]'s conformance checks (four exits, already
        calibrated)."""
        return {"thresholds": [0.3, 0.25, 0.2, -math.inf]}

    @property
    def calibrated(self) -> bool:
        """Whether the policy holds thresholds (given, calibrated or loaded)."""
        return self._calibrated_thresholds() is not None

    def _calibrated_thresholds(self) -> Tensor | None:
        """The thresholds, or ``None`` while there are none (or NaN ones, bound and awaiting calibration)."""
        thresholds = self.thresholds
        return thresholds if thresholds is not None and not bool(thresholds.isnan().any()) else None

    def bind(self, ensemble: Any) -> None:
        """Hold NaN thresholds, one per member, until calibrated; refuse thresholds of another length."""
        thresholds = self._calibrated_thresholds()
        if thresholds is not None:
            if len(thresholds) != ensemble.num_members:
                raise BudgetError(f"calibrated for {len(thresholds)} exits, the ensemble has "
                                  f"{ensemble.num_members}; calibrate a new policy for it")
            return
        reference = next(ensemble.parameters(), None)
        self.thresholds = torch.full((ensemble.num_members,), math.nan,
                                     device=None if reference is None else reference.device)

    def calibrate(self, ensemble: Any, data: Any) -> None:
        """Fit the thresholds on held-out ``data`` (a loader or an ``(images, labels)`` pair).

        FLOPs are those of the held-out images' size, which all batches must share.
        """
        preds, labels, shape = _prefix_predictions(ensemble, data, 256)
        cum_flops = [float(row.flops) for row in ensemble.cost_table(input_size=shape)]
        self.calibrate_from_predictions(preds, labels, cum_flops, input_size=shape[-2:])

    def calibrate_from_predictions(self, preds: Tensor, labels: Tensor, cum_flops: Sequence[float],
                                   input_size: Sequence[int] | None = None) -> None:
        """[`calibrate()`][ensemblekit.components.halting.budgeted.Budgeted.calibrate] from held-out prefix
        predictions ``[N, M, C]`` and cumulative FLOPs ``[M]``.

        ``input_size`` is the ``(H, W)`` ``cum_flops`` were counted at (kept as `input_size`).
        """
        conf = confidence(preds)
        correct = preds.argmax(-1) == labels[:, None]
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        if self.target_flops is not None:
            self.q = solve_q(conf, cum_flops, self.target_flops, ties=self.ties)
        if self.q is None:
            raise BudgetError("calibration needs q or flops; this policy was given thresholds only")
        thresholds = fit_thresholds(conf, exit_distribution(self.q, conf.shape[1]), self.ties)
        exits = exit_indices(conf, thresholds)
        fractions = torch.bincount(exits, minlength=conf.shape[1]).double() / len(exits)
        self.thresholds = thresholds.float().to(self.thresholds.device if self.thresholds is not None else "cpu")
        self.fractions = fractions.tolist()
        self.expected_flops = float(expected_cost(fractions, cum_flops))
        self.held_out_accuracy = float(correct[torch.arange(len(exits)), exits].double().mean())

    def step(self, step: HaltingStep, state: dict[str, Tensor] | None) -> tuple[Tensor, None]:
        thresholds = self._calibrated_thresholds()
        if thresholds is None:
            raise BudgetError("the budgeted policy is not calibrated: call policy.calibrate(ensemble, held_out_data)")
        if len(thresholds) != step.num_members:
            raise BudgetError(f"calibrated for {len(thresholds)} exits, the ensemble has {step.num_members}")
        conf = confidence(step.prediction)
        return conf >= thresholds[step.index].to(conf.device), None


def expected_flops(conf: Tensor, cum_flops: Sequence[float], q: float, ties: str = "early") -> float:
    """Held-out expected FLOPs per sample of the thresholds fit for ``q`` (``ties``: see
    [`fit_thresholds()`][ensemblekit.components.halting.budgeted.fit_thresholds])."""
    exits = exit_indices(conf, fit_thresholds(conf, exit_distribution(q, conf.shape[1]), ties))
    flops = torch.tensor(cum_flops, dtype=torch.float64)
    return float(flops[exits].mean())


def solve_q(conf: Tensor, cum_flops: Sequence[float], target: float, steps: int = 60, ties: str = "early") -> float:
    """The ``q`` whose held-out expected FLOPs come closest to ``target`` from below.

    Expected FLOPs grow with ``q`` (up to the rounding of ``floor(N pi_k)``);
    bisection on ``log q`` over [`Q_SEARCH_RANGE`][ensemblekit.components.halting.budgeted.Q_SEARCH_RANGE].
    """
    lo, hi = (math.log(v) for v in Q_SEARCH_RANGE)
    low_cost, high_cost = (expected_flops(conf, cum_flops, math.exp(v), ties) for v in (lo, hi))
    if target < low_cost:
        raise BudgetError(
            f"a budget of {target:.4g} FLOPs is below the cheapest this ensemble reaches on the held-out data "
            f"({low_cost:.4g}; all samples at the first exit costs {cum_flops[0]:.4g})"
        )
    if target >= high_cost:
        return math.exp(hi)
    best = lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        if expected_flops(conf, cum_flops, math.exp(mid), ties) <= target:
            best = lo = mid
        else:
            hi = mid
    return math.exp(best)
