"""What every paper table shares: resumable runs over seeds, mean ± std, and the paper's claims judged.

A table is a grid of runs, one per (seed, row). `RunStore` keeps each
finished run in ``<out>/seed-<s>/<row>/run.json`` with the settings it ran
with, so that a table killed halfway continues from its finished runs and a
table started with other settings is refused instead of mixed.
`Claim` states one of a paper's orderings on paired per-seed values
and says whether it holds, by how much, against the seed-to-seed spread.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ensemblekit.errors import EnsembleKitError

__all__ = ["Claim", "Comparison", "RunStore", "SettingsMismatch", "default_dataset", "mean_std"]


class SettingsMismatch(EnsembleKitError):
    """A finished run in the output folder was made with other settings than the ones asked for now."""


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value).

    Examples:
        >>> mean_std([90.0, 92.0])
        (91.0, 1.4142135623730951)
        >>> mean_std([3.0])
        (3.0, 0.0)
    """
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def default_dataset() -> str:
    """``"fashion-mnist"`` where its files are on this machine (no download tried), else ``"digits"``."""
    from ensemblekit.training.data import fashion_mnist_available

    return "fashion-mnist" if fashion_mnist_available() else "digits"


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), to compare settings across runs."""
    return json.loads(json.dumps(value))


class RunStore:
    """Finished runs of one table, one ``run.json`` per (seed, row) under ``root``.

    Examples:
        >>> import tempfile
        >>> store = RunStore(tempfile.mkdtemp())
        >>> store.get(0, "L_I", {"lr": 0.1}) is None
        True
        >>> store.put(0, "L_I", {"lr": 0.1}, {"top1": [90.0]})
        >>> store.get(0, "L_I", {"lr": 0.1})["top1"]
        [90.0]
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, seed: int, row: str) -> Path:
        """Where the run of ``row`` with ``seed`` keeps its files (checkpoints, ``run.json``)."""
        from ensemblekit.training.trainer import slug

        return self.root / f"seed-{seed}" / slug(row)

    def get(self, seed: int, row: str, settings: dict[str, Any]) -> dict[str, Any] | None:
        """The result of the finished run, or None when it has not finished.

        Raises:
            SettingsMismatch: the run finished with other ``settings``.
        """
        record = self.folder(seed, row) / "run.json"
        if not record.is_file():
            return None
        saved = json.loads(record.read_text())
        if saved["settings"] != _jsonable(settings):
            raise SettingsMismatch(f"{record.parent} holds a finished run with other settings; choose another "
                                   "--out (or delete it)")
        result: dict[str, Any] = saved["result"]
        return result

    def put(self, seed: int, row: str, settings: dict[str, Any], result: dict[str, Any]) -> None:
        """Record a finished run (atomically: a killed write leaves the previous state)."""
        from ensemblekit.training.checkpoint import atomic_write

        folder = self.folder(seed, row)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "run.json",
                     json.dumps({"settings": _jsonable(settings), "result": result}, indent=2) + "\n")


@dataclass(frozen=True)
class Comparison:
    """``left >= right + offset`` (``>`` when ``strict``) on values paired by seed.

    ``margin`` is the mean over seeds of ``left - right - offset``; ``spread``
    the standard deviation over seeds of ``left - right`` (NaN for one seed).

    Examples:
        >>> c = Comparison("L_I+L_HD", "L_I", (91.0, 92.0), (90.0, 90.5))
        >>> c.holds, c.margin, round(c.spread, 3)
        (True, 1.25, 0.354)
    """

    left: str
    right: str
    left_values: Sequence[float]
    right_values: Sequence[float]
    offset: float = 0.0
    strict: bool = False

    def __post_init__(self) -> None:
        if len(self.left_values) != len(self.right_values) or not self.left_values:
            raise ValueError(f"{self.left} vs {self.right}: need the same number (at least 1) of values per side, "
                             f"got {len(self.left_values)} and {len(self.right_values)}")

    @property
    def differences(self) -> list[float]:
        return [a - b for a, b in zip(self.left_values, self.right_values)]

    @property
    def margin(self) -> float:
        return statistics.fmean(self.differences) - self.offset

    @property
    def spread(self) -> float:
        return statistics.stdev(self.differences) if len(self.differences) > 1 else math.nan

    @property
    def holds(self) -> bool:
        return self.margin > 0 if self.strict else self.margin >= 0

    @property
    def clear(self) -> bool:
        """Whether the margin is larger than the seed-to-seed spread (so the verdict is not noise)."""
        return not math.isnan(self.spread) and abs(self.margin) > self.spread

    def describe(self, unit: str = "points") -> str:
        relation = (">" if self.strict else ">=") + (f" {self.right} {self.offset:+g}" if self.offset else
                                                     f" {self.right}")
        spread = "one seed, no spread" if math.isnan(self.spread) else f"seed std {self.spread:.2f}"
        noise = "" if math.isnan(self.spread) else (", clear" if self.clear else ", within noise")
        return f"{self.left} {relation}: margin {self.margin:+.2f} {unit} ({spread}{noise})"


@dataclass(frozen=True)
class Claim:
    """A claim of a paper: it holds when every one of its comparisons holds.

    Examples:
        >>> claim = Claim("co-distillation beats lambda=0", "EnsembleNet Table 1",
        ...               (Comparison("mu=3", "lambda=0", (92.0,), (91.0,)),))
        >>> claim.holds
        True
        >>> print(claim.line())
        holds          co-distillation beats lambda=0 (EnsembleNet Table 1)
                       mu=3 >= lambda=0: margin +1.00 points (one seed, no spread)
    """

    text: str
    source: str
    comparisons: tuple[Comparison, ...]
    unit: str = "points"

    @property
    def holds(self) -> bool:
        return all(c.holds for c in self.comparisons)

    def line(self) -> str:
        verdict = "holds" if self.holds else "does not hold"
        lines = [f"{verdict:<14} {self.text} ({self.source})"]
        lines += [f"{'':<14} {c.describe(self.unit)}" for c in self.comparisons]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"claim": self.text, "source": self.source, "holds": self.holds,
                "comparisons": [{"left": c.left, "right": c.right, "offset": c.offset, "strict": c.strict,
                                 "margin": c.margin, "spread": None if math.isnan(c.spread) else c.spread,
                                 "holds": c.holds, "clear": c.clear, "unit": self.unit} for c in self.comparisons]}
