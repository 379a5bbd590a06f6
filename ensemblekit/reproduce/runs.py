"""What every paper table shares: resumable runs over seeds, mean ± std, and the paper's claims judged.

A table is a grid of runs, one per (seed, row). `RunStore` keeps each
finished run in ``<out>/seed-<s>/<row>/run.json`` with the settings it ran
with, so that a table killed halfway continues from its finished runs and a
table started with other settings is refused instead of mixed.
`Claim` states one of a paper's orderings on paired per-seed values
and says whether it holds, by how much, against the seed-to-seed spread.
`get_or_train()` is the loop every table runs for each of its runs
(reuse the stored result, or train, resuming from the last checkpoint, and
store it); `check_settings()` refuses other settings before anything
trains. The tables raise `TableError` and `SettingsMismatch`;
``ensemblekit``'s ``main`` prints them on one line and exits with 2.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ensemblekit.errors import EnsembleKitError, InvalidValueError

__all__ = ["Claim", "Comparison", "RunStore", "SettingsMismatch", "Splits", "TableError", "check_settings",
           "comparable", "default_dataset", "device_name", "get_or_train", "load_splits", "mean_std", "seed_range",
           "train_run"]


class SettingsMismatch(EnsembleKitError):
    """A finished run in the output folder was made with other settings than the ones asked for now."""


class TableError(EnsembleKitError, ValueError):
    """A table's arguments ask for what it cannot run; the message says what to choose instead."""


def seed_range(first: int, count: int) -> list[int]:
    """The seeds ``first .. first + count - 1`` of ``--seed first --seeds count``.

    Examples:
        >>> seed_range(0, 3)
        [0, 1, 2]
        >>> seed_range(0, 0)
        Traceback (most recent call last):
        ...
        ensemblekit.reproduce.runs.TableError: --seeds must be at least 1
    """
    if count < 1:
        raise TableError("--seeds must be at least 1")
    return list(range(first, first + count))


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


def device_name(device: Any) -> str:
    """``device`` (a name such as ``"auto"``, or a ``torch.device``) as the tables show and store it:
    ``"cuda (<GPU name>)"``, else its type and torch's thread count, e.g. ``"cpu (2 threads)"``."""
    import torch

    from ensemblekit.training.trainer import select_device

    d = select_device(device) if isinstance(device, str) else device
    if d.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(d)})"
    return f"{d.type} ({torch.get_num_threads()} threads)"


def comparable(config: Any) -> dict[str, Any]:
    """The settings of a run config ([`RunConfig`][ensemblekit.training.config.RunConfig]) that a finished run must
    share with it to be reused: all but the device, progress display, checkpoint keeping and data workers, and the
    rule that cut its splits when they are cut ([`data_settings()`][ensemblekit.training.trainer.data_settings])."""
    from ensemblekit.training.config import RESUMABLE_CHANGES
    from ensemblekit.training.trainer import data_settings

    d = asdict(config)
    d["train"] = {k: v for k, v in d["train"].items() if k not in RESUMABLE_CHANGES}
    d["data"] = {k: v for k, v in data_settings(config.data).items() if k not in ("num_workers", "eval_batch_size")}
    return d


@dataclass(frozen=True)
class Splits:
    """The training, validation and test splits of a table's data, and what the dataset is (``DatasetInfo``)."""

    train: Any
    val: Any
    test: Any
    info: Any


def load_splits(data: Any, seed: int | None = None) -> Splits:
    """The splits a [`DataConfig`][ensemblekit.training.config.DataConfig] describes: its training split (augmented as
    it says, cut to a stratified subset of ``max_train_items`` drawn with ``seed``), and the validation and test
    splits (cut to ``max_eval_items``, the same subset for every seed; see
    [`load_split()`][ensemblekit.training.trainer.load_split])."""
    from ensemblekit.training.trainer import load_split

    train, info = load_split(data, data.train_split, augment=data.augment, limit=data.max_train_items, seed=seed)
    val = load_split(data, "val", limit=data.max_eval_items)[0]
    test = load_split(data, "test", limit=data.max_eval_items)[0]
    return Splits(train, val, test, info)


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


def check_settings(store: RunStore, runs: Iterable[tuple[int, str, dict[str, Any]]]) -> None:
    """Refuse, before anything trains, a table whose ``(seed, row, settings)`` runs differ from those finished in
    ``store``.

    Raises:
        SettingsMismatch: a finished run was made with other settings.
    """
    for seed, row, settings in runs:
        store.get(seed, row, settings)


def train_run(config: Any, folder: Path, resume: bool) -> dict[str, Any]:
    """Train and evaluate a [`RunConfig`][ensemblekit.training.config.RunConfig] in ``folder``
    ([`ensemblekit.training.trainer.run()`][ensemblekit.training.trainer.run]); its report and training history,
    for `get_or_train()`."""
    from ensemblekit.training.trainer import run

    result = run(config, folder, resume=resume)
    return {"report": result.report.to_dict(), "history": result.train.history}


def get_or_train(store: RunStore, seed: int, row: str, settings: dict[str, Any],
                 train: Callable[[Path, bool], dict[str, Any]], summary: Callable[[dict[str, Any]], str] | None = None,
                 keep_checkpoints: bool = True) -> dict[str, Any]:
    """The result of the run ``row`` of ``seed``: the stored one, or ``train(folder, resume)``'s, then stored.

    ``resume`` is whether the run's folder holds checkpoints (a run killed
    before its record continues from its last one). The stored result is
    ``train``'s with ``"seconds"`` (the time ``train`` took) and
    ``"resumed"``. Prints a line when the run is reused or starts, and one
    with its time (and ``summary(result)``) when it finishes;
    ``keep_checkpoints=False`` removes its checkpoints once it is stored.

    Raises:
        SettingsMismatch: the run finished with other ``settings``.
    """
    saved = store.get(seed, row, settings)
    folder = store.folder(seed, row)
    if saved is not None:
        print(f"== {row}, seed {seed}: finished earlier, reused ({folder})", flush=True)
        return saved
    print(f"== {row}, seed {seed}", flush=True)
    checkpoints = folder / "checkpoints"
    resume = checkpoints.is_dir() and any(checkpoints.iterdir())
    start = time.perf_counter()
    result = train(folder, resume)
    result = {**result, "seconds": time.perf_counter() - start, "resumed": resume}
    store.put(seed, row, settings, result)
    if not keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    print(f"   {row}, seed {seed}: {result['seconds']:.1f} s" + (f"; {summary(result)}" if summary else ""),
          flush=True)
    return result


@dataclass(frozen=True)
class Comparison:
    """``left >= right + offset`` (``>`` when ``strict``) on values paired by seed, measured in ``unit``.

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
    unit: str = "points"

    def __post_init__(self) -> None:
        if len(self.left_values) != len(self.right_values) or not self.left_values:
            raise InvalidValueError(f"{self.left} vs {self.right}: need the same number (at least 1) of values per "
                                    f"side, got {len(self.left_values)} and {len(self.right_values)}")

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

    def describe(self) -> str:
        relation = (">" if self.strict else ">=") + (f" {self.right} {self.offset:+g}" if self.offset else
                                                     f" {self.right}")
        spread = "one seed, no spread" if math.isnan(self.spread) else f"seed std {self.spread:.2f}"
        noise = "" if math.isnan(self.spread) else (", clear" if self.clear else ", within noise")
        return f"{self.left} {relation}: margin {self.margin:+.2f} {self.unit} ({spread}{noise})"


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

    @property
    def holds(self) -> bool:
        return all(c.holds for c in self.comparisons)

    def line(self) -> str:
        verdict = "holds" if self.holds else "does not hold"
        lines = [f"{verdict:<14} {self.text} ({self.source})"]
        lines += [f"{'':<14} {c.describe()}" for c in self.comparisons]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"claim": self.text, "source": self.source, "holds": self.holds,
                "comparisons": [{"left": c.left, "right": c.right, "offset": c.offset, "strict": c.strict,
                                 "margin": c.margin, "spread": None if math.isnan(c.spread) else c.spread,
                                 "holds": c.holds, "clear": c.clear, "unit": c.unit} for c in self.comparisons]}
