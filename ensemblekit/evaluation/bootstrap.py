"""How sure a measured accuracy is: percentile bootstrap intervals over the test samples.

The test set is one draw of images; resampling it with replacement (Efron's
percentile bootstrap) shows how much an accuracy would move on another draw.
The gain of a prefix ensemble over its first member is measured *paired*: each
resample scores every prefix on the same images, so the interval of the gain
is much narrower than the two accuracies' intervals suggest, and says whether
more members really help. All prefixes share the resamples, which is why this
is one vectorised function rather than a ``torchmetrics`` ``BootStrapper``
per prefix (those draw independent resamples, and pairing is lost).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ensemblekit.errors import InvalidValueError

__all__ = ["BootstrapIntervals", "bootstrap_intervals"]


@dataclass(frozen=True)
class BootstrapIntervals:
    """Intervals per prefix size ``k = 1..M`` (fractions, like accuracies).

    Attributes:
        accuracy_low, accuracy_high: interval of each prefix's accuracy.
        gain_low, gain_high: interval of ``accuracy_k - accuracy_1`` (paired).
        level: the intervals' coverage, e.g. 0.95.
        resamples: bootstrap resamples drawn.
    """

    accuracy_low: list[float]
    accuracy_high: list[float]
    gain_low: list[float]
    gain_high: list[float]
    level: float
    resamples: int


def bootstrap_intervals(correct: Tensor, resamples: int = 1000, level: float = 0.95, seed: int = 0,
                        chunk: int = 100) -> BootstrapIntervals:
    """Percentile bootstrap of the accuracy of each column of ``correct`` and of its gain over column 0.

    Args:
        correct: ``[N, M]``, whether sample ``n`` is classified correctly by prefix ``m + 1``.
        resamples: bootstrap resamples of the ``N`` samples (with replacement).
        level: coverage of the central intervals.
        seed: seeds the resampling (the intervals are reproducible).
        chunk: resamples drawn at a time (memory: ``chunk * N * M`` floats).

    Examples:
        >>> correct = torch.tensor([[True, True]] * 80 + [[False, True]] * 10 + [[False, False]] * 10)
        >>> iv = bootstrap_intervals(correct, resamples=200)
        >>> iv.accuracy_low[0] < 0.8 < iv.accuracy_high[0], iv.gain_low[1] > 0
        (True, True)
    """
    if correct.ndim != 2 or correct.shape[0] == 0 or correct.shape[1] == 0:
        raise InvalidValueError(f"correct must be [samples, prefixes] with both at least 1, got {tuple(correct.shape)}")
    if not 0 < level < 1:
        raise InvalidValueError(f"level must be in (0, 1), got {level}")
    if resamples < 2:
        raise InvalidValueError(f"resamples must be at least 2, got {resamples}")
    scores = correct.detach().float().cpu()
    n = scores.shape[0]
    generator = torch.Generator().manual_seed(seed)
    accuracies = []
    for start in range(0, resamples, chunk):
        index = torch.randint(n, (min(chunk, resamples - start), n), generator=generator)
        accuracies.append(scores[index].mean(dim=1))  # [chunk, M]
    accuracy = torch.cat(accuracies)  # [resamples, M]
    gain = accuracy - accuracy[:, :1]
    quantiles = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=accuracy.dtype)
    acc_q, gain_q = accuracy.quantile(quantiles, dim=0), gain.quantile(quantiles, dim=0)
    return BootstrapIntervals(acc_q[0].tolist(), acc_q[1].tolist(), gain_q[0].tolist(), gain_q[1].tolist(),
                              level, resamples)
