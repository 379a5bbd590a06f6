"""Stop once the prediction is confident enough (MSDNet / IMTA dynamic evaluation, WoC cascades)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any

import torch
from torch import Tensor

from ensemblekit.core.interfaces import HaltingPolicy, HaltingStep
from ensemblekit.errors import InvalidValueError
from ensemblekit.functional import confidence

__all__ = ["Confidence", "confidence"]


class Confidence(HaltingPolicy):
    """Stop at the first member whose prediction has max-softmax confidence ``>= threshold``.

    The prediction is `HaltingStep.prediction`: the aggregated
    prediction of members ``0..k`` for an ensemble (a WoC cascade), the exit's
    own logits for a multi-exit chain built with
    [`ek.recipes.multi_exit()`][ensemblekit.methods.imta.recipe.multi_exit] (its aggregator returns the
    latest exit). IMTA Sec. 4: "if the current classifier is sufficiently
    confident about its prediction ... the latter classifiers are not evaluated".

    Args:
        threshold: one threshold for every member, or one per member (the last
            member always stops, whatever its threshold).
    """

    thresholds: Tensor  # a buffer: one value, or one per member

    def __init__(self, threshold: float | Sequence[float]):
        super().__init__()
        if isinstance(threshold, (int, float)):
            values = [threshold]
        elif isinstance(threshold, (str, bytes, Mapping, Set)) or not isinstance(threshold, Iterable):
            raise InvalidValueError(f"confidence thresholds must be numbers in [0, 1], got {threshold!r}")
        else:
            values = list(threshold)
        if not values:
            raise InvalidValueError(f"threshold must be a number or a non-empty list of numbers, got {threshold!r}")
        bad = [v for v in values if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0]
        if bad:
            raise InvalidValueError(f"confidence thresholds must be numbers in [0, 1], got {bad[0]!r}")
        self.per_member = not isinstance(threshold, (int, float))
        self.register_buffer("thresholds", torch.tensor(values, dtype=torch.float32))

    @classmethod
    def example_options(cls) -> dict[str, Any]:
        """Options for [`ensemblekit.testing`][ensemblekit.testing]'s conformance checks."""
        return {"threshold": 0.25}

    def build_options(self) -> dict[str, Any]:
        """The constructor options that rebuild this policy (what a checkpoint records)."""
        return {"threshold": self.thresholds.tolist() if self.per_member else float(self.thresholds[0])}

    def bind(self, ensemble) -> None:
        """Refuse per-member thresholds whose count is not the ensemble's member count."""
        if self.per_member and len(self.thresholds) != ensemble.num_members:
            raise InvalidValueError(f"{len(self.thresholds)} thresholds given for an ensemble of "
                                    f"{ensemble.num_members} members; give one per member or a single number")

    def threshold(self, index: int, num_members: int) -> Tensor:
        """The threshold of member ``index``."""
        if not self.per_member:
            return self.thresholds[0]
        if len(self.thresholds) != num_members:
            raise InvalidValueError(f"{len(self.thresholds)} thresholds given for an ensemble of {num_members} members")
        return self.thresholds[index]

    def step(self, step: HaltingStep, state: dict[str, Tensor] | None) -> tuple[Tensor, None]:
        conf = confidence(step.prediction)
        return conf >= self.threshold(step.index, step.num_members).to(conf.device), None
