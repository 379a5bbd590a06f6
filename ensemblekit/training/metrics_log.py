"""Metric loggers of the trainer: ``train.logger = "csv"`` or ``"tensorboard"``.

[`ensemblekit.training.trainer.train()`][ensemblekit.training.trainer.train] gives a logger one row per
finished epoch (its history entry) and, with ``train.log_every = N``, one
row every N optimizer steps (that step's loss, accuracy, loss parts and the
learning rate it was taken with). Every row holds ``scope`` ("epoch" or
"step") and ``step`` (optimizer steps done); rows of a resumed run replace
those the interrupted run wrote after its checkpoint.

* ``"csv"``: ``metrics.csv`` in the run folder, one line per row; a row with a
  column the file lacks (a later stage's loss parts) rewrites the file with
  the new header.
* ``"tensorboard"``: event files in ``tensorboard/`` in the run folder, through
  ``torch.utils.tensorboard.SummaryWriter``, each number as the scalar
  ``<scope>/<name>`` at its step; a resume purges the events after its step.
  Needs the ``tensorboard`` package (not a dependency of ensemblekit).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ensemblekit.errors import UnknownNameError
from ensemblekit.training.checkpoint import atomic_write

__all__ = ["CSV_FILE", "TENSORBOARD_DIR", "CsvLogger", "MetricsLogger", "TensorBoardLogger", "make_logger"]

CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    """What the trainer calls: ``log(row)`` for every row, ``close()`` at the end."""

    def log(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CsvLogger(MetricsLogger):
    """Rows into ``<out_dir>/metrics.csv``.

    Args:
        out_dir: the run folder.
        resume_step: None for a new run (an existing file is replaced), else
            the step of the checkpoint resumed: the rows up to it are kept.
    """

    def __init__(self, out_dir: str | Path, resume_step: int | None = None):
        self.path = Path(out_dir) / CSV_FILE
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                self.rows = [row for row in reader if _int(row.get("step")) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rewrite()

    def log(self, row: dict[str, Any]) -> None:
        row = {k: _cell(v) for k, v in row.items()}
        self.rows.append(row)
        if any(k not in self.columns for k in row):
            self.columns += [k for k in row if k not in self.columns]
            self._rewrite()
            return
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self.columns).writerow(row)

    def _rewrite(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns)
        if self.columns:
            writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.path, text.getvalue())


class TensorBoardLogger(MetricsLogger):
    """Rows as TensorBoard scalars ``<scope>/<name>`` in ``<out_dir>/tensorboard``, at their ``step``."""

    def __init__(self, out_dir: str | Path, resume_step: int | None = None):
        writer_class = summary_writer()
        self.writer = writer_class(log_dir=str(Path(out_dir) / TENSORBOARD_DIR),
                                   purge_step=None if resume_step is None else resume_step + 1)

    def log(self, row: dict[str, Any]) -> None:
        scope, step = row.get("scope", "epoch"), int(row["step"])
        for key, value in row.items():
            if key not in ("scope", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{scope}/{key}", value, global_step=step)

    def close(self) -> None:
        self.writer.close()


def summary_writer() -> Any:
    """``torch.utils.tensorboard.SummaryWriter`` (imported only when TensorBoard is asked for)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


def make_logger(kind: str | None, out_dir: str | Path, resume_step: int | None = None) -> MetricsLogger | None:
    """The logger ``train.logger`` names (None for None)."""
    if kind is None:
        return None
    if kind == "csv":
        return CsvLogger(out_dir, resume_step)
    if kind == "tensorboard":
        return TensorBoardLogger(out_dir, resume_step)
    raise UnknownNameError(f"unknown logger {kind!r}; use 'csv' or 'tensorboard'")


def _cell(value: Any) -> Any:
    return "" if value is None else value


def _int(text: Any) -> float:
    try:
        return int(text)
    except (TypeError, ValueError):
        return float("inf")  # a row without a step is not kept
