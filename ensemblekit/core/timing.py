"""Timing work on a device, and the deadline rule of anytime inference.

One place for what was written five times: waiting for a device's queued
work ([`synchronize()`][ensemblekit.core.timing.synchronize]), a clock that reads the time at which queued work
is done ([`Clock`][ensemblekit.core.timing.Clock]), timing one call
([`Stopwatch`][ensemblekit.core.timing.Stopwatch], [`timed()`][ensemblekit.core.timing.timed]), and the deadline
rule that [`ensemblekit.core.anytime.anytime()`][ensemblekit.core.anytime.anytime] and the
[`Deadline`][ensemblekit.components.halting.Deadline] policy both apply
([`DeadlineTimer`][ensemblekit.core.timing.DeadlineTimer], [`overruns()`][ensemblekit.core.timing.overruns]).

The deadline rule: the clock starts when work starts; the first member always
runs; member ``k+1`` starts only if ``elapsed + rate * flops(k+1) <= deadline``,
where ``flops(k+1)`` is what member ``k+1`` adds to the prefix, ``elapsed`` is
wall-clock time since the start (including whatever happens between members:
the caller's code in anytime inference, the policy and the bookkeeping in
[`predict()`][ensemblekit.core.ensemble.Ensemble.predict]) and ``rate`` is the seconds per FLOP
measured on the compute of the members so far (from the moment a member is
started to the moment its prediction is ready: time between members is not
compute, so it does not inflate the prediction).
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from types import TracebackType
from typing import TypeVar

import torch

__all__ = ["Clock", "DeadlineTimer", "Stopwatch", "overruns", "synchronize", "timed"]

T = TypeVar("T")


def synchronize(device: torch.device | str) -> None:
    """Wait until the work queued on ``device`` is done (CUDA and MPS; nothing to wait for on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Clock:
    """Seconds since construction; on CUDA or MPS, read after the queued work is done.

    Args:
        device: where the timed work runs.
        elapsed: seconds the clock reads at construction (to continue the
            reading of another clock started earlier).
    """

    def __init__(self, device: torch.device | str, elapsed: float = 0.0):
        self.device = torch.device(device)
        self.start = perf_counter() - elapsed

    def __call__(self) -> float:
        synchronize(self.device)
        return perf_counter() - self.start


class Stopwatch:
    """Seconds spent in a ``with`` block, the device's queued work included.

    On a CPU (or MPS) the device is synchronised on entry (earlier work is
    not counted) and on exit (the block's work is), and the wall clock is
    read. On CUDA the block is timed with CUDA events recorded on the current
    stream, which measure the GPU time between them without the host's
    launch jitter; the exit waits for the end event.

    Examples:
        >>> with Stopwatch("cpu") as watch:
        ...     _ = sum(range(1000))
        >>> watch.seconds >= 0
        True
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.seconds = 0.0
        self._start = 0.0
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    def __enter__(self) -> Stopwatch:
        if self.device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        else:
            synchronize(self.device)
            self._start = perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._events is not None:
            start, end = self._events
            end.record()
            end.synchronize()
            self.seconds = start.elapsed_time(end) / 1000.0
        else:
            synchronize(self.device)
            self.seconds = perf_counter() - self._start


def timed(fn: Callable[[], T], device: torch.device | str) -> tuple[T, float]:
    """``(fn(), seconds)``: the result and the time until the work it queued on ``device`` was done."""
    with Stopwatch(device) as watch:
        result = fn()
    return result, watch.seconds


def overruns(deadline: float, elapsed: float, compute_seconds: float, flops_done: float, flops_next: float) -> bool:
    """Whether a member adding ``flops_next`` FLOPs would finish after ``deadline``.

    ``elapsed + (compute_seconds / flops_done) * flops_next > deadline``, or
    ``elapsed >= deadline`` (HNE's anytime setting, Sec. 3; the time per FLOP
    measured so far predicts the next member's). With no FLOPs counted yet
    the prediction is 0 and only ``elapsed >= deadline`` stops.

    Args:
        deadline: seconds allowed since the start.
        elapsed: seconds since the start.
        compute_seconds: seconds spent computing the members so far.
        flops_done: FLOPs per image of the members so far.
        flops_next: FLOPs per image the next member adds.
    """
    rate = compute_seconds / flops_done if flops_done > 0 else 0.0
    return elapsed >= deadline or elapsed + rate * flops_next > deadline


class DeadlineTimer:
    """The deadline rule (module docstring): a clock and the compute seconds of the members so far.

    Call [`begin()`][ensemblekit.core.timing.DeadlineTimer.begin] when a member starts (it returns the time, the
    ``elapsed`` of the decision to start it) and [`end()`][ensemblekit.core.timing.DeadlineTimer.end] when its
    prediction is ready; [`overruns()`][ensemblekit.core.timing.DeadlineTimer.overruns] decides whether the next
    member may start. The first member counts as begun when the clock started.

    Args:
        deadline: seconds allowed since the start (None: only timing).
        device: where the members run.
        elapsed: seconds the clock reads at construction (to continue another clock).

    Examples:
        >>> timer = DeadlineTimer(0.5, "cpu")
        >>> begun = timer.begin()
        >>> done = timer.end()
        >>> timer.overruns(timer.begin(), flops_done=10, flops_next=10)  # well within half a second
        False
    """

    def __init__(self, deadline: float | None, device: torch.device | str, elapsed: float = 0.0):
        self.deadline = deadline
        self.clock = Clock(device, elapsed)
        self.compute = 0.0
        self.begun = 0.0

    def begin(self) -> float:
        """A member starts now; returns the clock's reading."""
        self.begun = self.clock()
        return self.begun

    def end(self, done: float | None = None) -> float:
        """The member started last is ready now (or at ``done`` on this clock); returns that time."""
        done = self.clock() if done is None else done
        self.compute += done - self.begun
        return done

    def overruns(self, elapsed: float, flops_done: float, flops_next: float) -> bool:
        """Whether the next member, adding ``flops_next`` FLOPs, would finish after the deadline."""
        if self.deadline is None:
            return False
        return overruns(self.deadline, elapsed, self.compute, flops_done, flops_next)
