"""Streaming inference: samples that go on to the next member wait for later arrivals, so every step runs full.

[`predict()`][ensemblekit.core.ensemble.Ensemble.predict] drops the samples that stopped from
the batch, so each later member runs on fewer samples; on a CPU, half a
batch costs far more than half the time (every operator has a fixed cost).
The [`StreamEngine`][ensemblekit.core.streaming.StreamEngine] does what LLM serving engines do with continuous
batching. It keeps one queue per member step (the nodes member ``k`` adds to
members ``0..k-1``, then its head, the aggregator and the halting policy). A
sample that goes on after member ``k`` waits in step ``k + 1``'s queue with
samples of later input batches, and a step runs when its queue holds
``batch_size`` samples: the nodes, always on a full batch.

Which step runs: the latest one whose queue is full (it finishes samples
soonest); when none is full, a queue holding a sample older than
``max_wait`` batches runs partly full (from the first step on, so what it
passes on runs in turn); at the end of the stream,
[`StreamEngine.flush()`][ensemblekit.core.streaming.StreamEngine.flush] runs every queue, first step first.

``max_wait`` is counted in input batches, not seconds: with ``max_wait=n``
every sample of batch ``i`` has its prediction once batch ``i + n`` has been
submitted (``0``: each batch is done before the next is taken, as
``predict()`` does; ``None``: no bound, partial queues wait for the flush).
An engine fed from an iterable only gets control when the next batch
arrives, so a bound in seconds could not be kept between arrivals.

What is per-sample travels with each sample, by declaration
([`ensemblekit.core.batching`][ensemblekit.core.batching]): the cached node states (only those a
later member reads), the aggregator's running state and the policy's state.
Joining samples of several batches concatenates the per-sample values. A
value shared by the samples of a batch (a count of members, a side input of
a block) is kept once, and only where every batch holds the same; a running
state whose shared values differ (the [`Deadline`][ensemblekit.components.halting.Deadline]
policy's per-batch timer) is never joined: its samples still run through the
nodes with the others, but the aggregator and the policy see them apart.

Equality with ``predict()``: for a policy that decides each sample from that
sample alone (``fixed``, ``confidence``, ``budgeted``, ``learned``; what the
conformance checks require), every sample gets the members and, up to float
rounding of batched kernels, the prediction ``predict()`` gives it, whatever
the batches. A policy that reads the batch does not see the same batches:
``deadline`` judges the step's batch by its oldest sample, whose "seconds"
are counted from its batch's arrival (queueing included), so its stops
depend on timing, as in ``predict()``.

The engine runs in eval mode only: it refuses an ensemble in training mode,
where BatchNorm would normalise each step's batch with its own statistics
(mixing samples of different input batches) and update its running
statistics. A policy given apart from the ensemble (``halting=``), which
``predict()`` runs in whatever mode it is in (a new policy is in training
mode), is switched to eval mode for each of its steps and back.
"""

from __future__ import annotations

import copy
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ensemblekit.core.batching import concat_running_state, joinable, select_running_state, select_state
from ensemblekit.core.cache import NodeCache
from ensemblekit.core.decision import decide
from ensemblekit.core.interfaces import Aggregator, HaltingPolicy, UntrainedHaltingWarning
from ensemblekit.core.timing import Clock
from ensemblekit.errors import EnsembleKitError, InvalidTypeError, InvalidValueError

if TYPE_CHECKING:
    from ensemblekit.core.ensemble import Ensemble

__all__ = ["StreamEngine", "StreamError", "StreamedPrediction"]


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` and its submodules in eval mode, each put back in its own mode after."""
    modes = {m: m.training for m in module.modules()}
    for m in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


class StreamError(EnsembleKitError, ValueError):
    """A stream the engine cannot run: training mode, or a batch unlike the stream's first."""


@dataclass
class StreamedPrediction:
    """The result for one input batch of a stream (the fields of
    [`HaltedPrediction`][ensemblekit.core.ensemble.HaltedPrediction], and more).

    Attributes:
        index: position of the batch in the stream (0-based).
        prediction: aggregated prediction ``[B, C]`` at the step each sample stopped.
        members_used: members evaluated per sample ``[B]`` (1-based count).
        flops: FLOPs per sample that its prefix cost ``[B]``.
        latency: seconds per sample ``[B]`` (float64, on the CPU) from the
            submission of its batch until its prediction was ready.
    """

    index: int
    prediction: Tensor
    members_used: Tensor
    flops: Tensor
    latency: Tensor


@dataclass
class _Cohort:
    """Samples waiting together for one step, with what is theirs: rows of the same length everywhere.

    ``batch``, ``row`` and ``arrived`` are on the CPU: each sample's input
    batch, its row in that batch and the clock's reading at its batch's arrival.
    """

    batch: Tensor
    row: Tensor
    arrived: Tensor
    cache: NodeCache
    aggregate: dict[str, Any] | None
    halting: dict[str, Any] | None

    @property
    def size(self) -> int:
        return int(self.batch.shape[0])

    @property
    def oldest(self) -> int:
        return int(self.batch.min())


@dataclass
class _Pending:
    """An input batch with samples still running: its results so far."""

    prediction: Tensor
    used: Tensor
    latency: Tensor
    remaining: int


class StreamEngine:
    """Runs a stream of input batches through an ensemble with a halting policy, each step on a full batch.

    Feed it with [`run()`][ensemblekit.core.streaming.StreamEngine.run] (an iterable of batches) or, for requests one at
    a time, [`submit()`][ensemblekit.core.streaming.StreamEngine.submit],
    [`ready()`][ensemblekit.core.streaming.StreamEngine.ready] and
    [`flush()`][ensemblekit.core.streaming.StreamEngine.flush]. See the module docstring for the queues,
    ``max_wait`` and equality with ``predict()``.

    Args:
        ensemble: an [`Ensemble`][ensemblekit.core.ensemble.Ensemble] in eval mode.
        halting: the policy (default: the ensemble's own).
        batch_size: samples a step runs on; ``None``: the first batch's size.
        max_wait: latency bound in input batches (``None``: none; see the
            module docstring).

    Examples:
        >>> engine = StreamEngine(ens, ek.halting.Confidence(0.9), batch_size=64)  # doctest: +SKIP
        >>> for result in engine.run(loader_of_images):  # doctest: +SKIP
        ...     result.prediction, result.members_used, result.latency
    """

    def __init__(self, ensemble: Ensemble, halting: HaltingPolicy | None = None, batch_size: int | None = None,
                 max_wait: int | None = None):
        policy = halting if halting is not None else ensemble.halting
        if policy is None:
            raise InvalidValueError("stream() needs a halting policy: pass halting=... here or to wrap()")
        if not isinstance(policy, HaltingPolicy):
            raise InvalidTypeError(f"halting must be a HaltingPolicy (build one by name with wrap(..., halting=...)), "
                                   f"got {type(policy).__name__}")
        for name, value, least in (("batch_size", batch_size, 1), ("max_wait", max_wait, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise InvalidValueError(f"{name} must be an integer >= {least} or None, got {value!r}")
        self.ensemble = ensemble
        self.policy = policy
        self.batch_size = batch_size
        self.max_wait = max_wait
        policy.bind(ensemble)
        self._modules = list(ensemble.modules())
        self._check_eval()
        if not policy.is_trained:
            warnings.warn(f"the {type(policy).__name__} halting policy was never trained, so it halts at random: "
                          "train it (ensemblekit.training.trainer.train marks it trained; in your own loop "
                          "ens.loss() trains it, then call ens.halting.mark_trained())",
                          UntrainedHaltingWarning, stacklevel=3)
        graph = ensemble.graph
        m = graph.num_members
        self._queues: list[deque[_Cohort]] = [deque() for _ in range(m)]
        self._waiting = [0] * m
        self._later = [set(graph.nodes_for(list(range(k + 1, m)))) for k in range(m)]
        """Per step, the nodes a later member reads: the states a sample keeps when it goes on."""
        self._layouts = [ensemble.state_layouts[node.block] for node in graph.nodes]
        self._pending: dict[int, _Pending] = {}
        self._submitted = 0
        self._yielded = 0
        self._first: Tensor | None = None  # an empty batch like the stream's first (shape, dtype, device)
        self._clock: Clock | None = None
        self._prefix_flops: Tensor | None = None

    # ------------------------------------------------------------ feeding
    def run(self, batches: Iterable[Tensor]) -> Iterator[StreamedPrediction]:
        """Submit every batch (``[B, C, H, W]``, or one image ``[C, H, W]``) and yield each batch's
        [`StreamedPrediction`][ensemblekit.core.streaming.StreamedPrediction] in input order, as soon as it and
        every earlier one are done; the queues are flushed at the end."""
        for x in batches:
            self.submit(x)
            yield from self.ready()
        self.flush()
        yield from self.ready()

    def submit(self, x: Tensor) -> int:
        """Queue a batch (or one image ``[C, H, W]``, a batch of one) and run the steps due; returns its index.

        Every batch of a stream has the first's image size, dtype and device.
        """
        self._check_eval()
        if isinstance(x, Tensor) and x.ndim == 3:
            x = x.unsqueeze(0)
        self.ensemble.check_input(x)
        if self._first is None:
            self._start(x)
        elif x.shape[1:] != self._first.shape[1:] or x.dtype != self._first.dtype or x.device != self._first.device:
            first = self._first
            raise StreamError(f"every batch of a stream must be like the first ({tuple(first.shape[1:])}, "
                              f"{first.dtype}, {first.device}), got {tuple(x.shape[1:])}, {x.dtype}, {x.device}; "
                              "start another stream for other images")
        assert self._clock is not None
        index, b = self._submitted, x.shape[0]
        self._submitted += 1
        self._pending[index] = _Pending(x.new_zeros(b, self.ensemble.num_classes),
                                        torch.zeros(b, dtype=torch.long, device=x.device),
                                        torch.zeros(b, dtype=torch.float64), b)
        self._enqueue(0, _Cohort(torch.full((b,), index), torch.arange(b),
                                 torch.full((b,), self._clock(), dtype=torch.float64), NodeCache(x), None, None))
        self._run_due()
        return index

    def ready(self) -> list[StreamedPrediction]:
        """The results finished since the last call, in input order (a batch waits for every earlier one)."""
        out = []
        while self._yielded in self._pending and self._pending[self._yielded].remaining == 0:
            done = self._pending.pop(self._yielded)
            assert self._prefix_flops is not None
            flops = self._prefix_flops.to(done.used.device)[done.used - 1]
            out.append(StreamedPrediction(self._yielded, done.prediction, done.used, flops, done.latency))
            self._yielded += 1
        return out

    def flush(self) -> None:
        """Run every queue, partial ones included, first step first, until no sample waits."""
        self._check_eval()
        for k in range(len(self._queues)):
            while self._queues[k]:
                self._run(k)

    @property
    def waiting(self) -> list[int]:
        """Samples waiting in each step's queue."""
        return list(self._waiting)

    # ------------------------------------------------------------ scheduling
    def _start(self, x: Tensor) -> None:
        self._first = x[:0]
        if self.batch_size is None:
            self.batch_size = x.shape[0]
        self._clock = Clock(x.device)
        rows = self.ensemble.cost_table(input_size=tuple(x.shape[1:]))
        self._prefix_flops = torch.tensor([row.flops for row in rows], dtype=torch.float64)

    def _check_eval(self) -> None:
        if not any(module.training for module in self._modules):
            return
        for name, module in self.ensemble.named_modules():
            if module.training:
                where = f"the ensemble's module {name!r}" if name else "the ensemble"
                raise StreamError(
                    f"stream() runs in eval mode only, but {where} is in training mode; call ens.eval() "
                    "first (in training mode BatchNorm would normalise each step's batch, mixing samples of "
                    "different input batches, and update its running statistics)")

    def _enqueue(self, k: int, cohort: _Cohort) -> None:
        self._queues[k].append(cohort)
        self._waiting[k] += cohort.size

    def _run_due(self) -> None:
        while (k := self._due()) is not None:
            self._run(k)

    def _due(self) -> int | None:
        """The step to run now: the latest full queue, else the first queue holding a sample past ``max_wait``."""
        assert self.batch_size is not None
        full = [k for k, n in enumerate(self._waiting) if n >= self.batch_size]
        if full:
            return full[-1]
        if self.max_wait is not None:
            limit = self._submitted - 1 - self.max_wait  # batches up to this one must be done by now
            for k, queue in enumerate(self._queues):
                if any(c.oldest <= limit for c in queue):
                    return k
        return None

    def _take(self, k: int) -> list[_Cohort]:
        """Up to ``batch_size`` samples from the front of step ``k``'s queue (the last cohort split if need be)."""
        assert self.batch_size is not None
        queue, need, taken = self._queues[k], self.batch_size, []
        while need and queue:
            cohort = queue[0]
            if cohort.size <= need:
                taken.append(queue.popleft())
            else:
                head, queue[0] = self._split(cohort, need)
                taken.append(head)
            need -= taken[-1].size
        self._waiting[k] -= sum(c.size for c in taken)
        return taken

    def _split(self, cohort: _Cohort, n: int) -> tuple[_Cohort, _Cohort]:
        """The first ``n`` samples and the rest; the rest gets its own copy of what the samples share."""
        def part(rows: slice, own: bool) -> _Cohort:
            aggregate = select_running_state(cohort.aggregate, rows, cohort.size, self._aggregator.per_sample_state,
                                             self._aggregator_name)
            halting = select_running_state(cohort.halting, rows, cohort.size, self.policy.per_sample_state,
                                           self._policy_name)
            if own:
                aggregate, halting = copy.deepcopy(aggregate), copy.deepcopy(halting)
            return _Cohort(cohort.batch[rows], cohort.row[rows], cohort.arrived[rows],
                           cohort.cache.select(rows, self._layouts), aggregate, halting)

        return part(slice(0, n), False), part(slice(n, None), True)

    # ------------------------------------------------------------ one step
    @property
    def _aggregator(self) -> Aggregator:
        return self.ensemble.aggregator

    @property
    def _aggregator_name(self) -> str:
        return f"aggregator {type(self.ensemble.aggregator).__name__}"

    @property
    def _policy_name(self) -> str:
        return f"halting policy {type(self.policy).__name__}"

    @torch.no_grad()
    def _run(self, k: int) -> None:
        """Member ``k`` on up to a full batch from its queue: nodes and head on all, then the decisions."""
        taken = self._take(k)
        ens = self.ensemble
        cache = NodeCache.concat([c.cache for c in taken], self._layouts)
        logits = ens.member_logits(cache, k)
        head_input = cache.states[ens.graph.members[k].exit_node]
        cache.states = {i: s for i, s in cache.states.items() if i in self._later[k]}
        cache.logits = {k: logits}  # a head may read the previous member's logits
        start = 0
        for group in self._groups(taken):
            n = sum(c.size for c in group)
            self._decide(k, group, cache, slice(start, start + n), logits, head_input)
            start += n

    def _groups(self, taken: list[_Cohort]) -> list[list[_Cohort]]:
        """Consecutive cohorts whose aggregator and policy states can be joined
        ([`joinable()`][ensemblekit.core.batching.joinable])."""
        groups = [[taken[0]]]
        for cohort in taken[1:]:
            ref = groups[-1][0]
            if (joinable([ref.aggregate, cohort.aggregate], self._aggregator.per_sample_state)
                    and joinable([ref.halting, cohort.halting], self.policy.per_sample_state)):
                groups[-1].append(cohort)
            else:
                groups.append([cohort])
        return groups

    def _decide(self, k: int, group: list[_Cohort], cache: NodeCache, rows: slice, logits: Tensor,
                head_input: Any) -> None:
        """Aggregate, let the policy decide, record the samples that stop and queue the others for step ``k + 1``.

        The body of ``predict()``'s loop, for the samples of ``group`` (rows ``rows`` of ``cache``).
        """
        ens, policy, total = self.ensemble, self.policy, cache.batch_size
        whole = rows.start == 0 and rows.stop == total
        sizes = [c.size for c in group]
        n = sum(sizes)
        aggregate = concat_running_state([c.aggregate for c in group], sizes, self._aggregator.per_sample_state,
                                         self._aggregator_name)
        halting = concat_running_state([c.halting for c in group], sizes, policy.per_sample_state,
                                       self._policy_name)
        if len(group) == 1:
            batch, row, arrived = group[0].batch, group[0].row, group[0].arrived
        else:
            batch, row, arrived = (torch.cat([getattr(c, name) for c in group]) for name in ("batch", "row", "arrived"))
        z = logits if whole else logits[rows]
        exit_block = ens.graph.nodes[ens.graph.members[k].exit_node].block
        clock = self._clock
        assert clock is not None and self._prefix_flops is not None
        with _eval_mode(policy):
            stop, current, aggregate, halting = decide(
                ens, policy, k, z, aggregate, halting, int(self._prefix_flops[k]),
                head_input=lambda: head_input if whole else select_state(
                    head_input, rows, total, ens.state_layouts[exit_block], f"the head input of member {k}"),
                seconds=lambda: clock() - arrived)
        stopped = stop.cpu()
        if stopped.any():
            self._finish(k, batch[stopped], row[stopped], arrived[stopped], current[stop])
        kept = ~stopped
        if not kept.any():
            return
        if kept.all():
            select: Tensor | slice = rows
        else:
            keep = ~stop
            select = (rows.start + kept.nonzero().squeeze(1)).to(cache.input.device)
            aggregate = select_running_state(aggregate, keep, n, self._aggregator.per_sample_state,
                                             self._aggregator_name)
            halting = select_running_state(halting, keep, n, policy.per_sample_state, self._policy_name)
        going = cache if whole and kept.all() else cache.select(select, self._layouts)
        self._enqueue(k + 1, _Cohort(batch[kept], row[kept], arrived[kept], going, aggregate, halting))

    def _finish(self, k: int, batch: Tensor, row: Tensor, arrived: Tensor, prediction: Tensor) -> None:
        """Record the samples that stopped after member ``k``."""
        assert self._clock is not None
        latency = self._clock() - arrived
        for index in batch.unique().tolist():
            mine = batch == index
            done = self._pending[index]
            rows = row[mine]
            done.prediction[rows.to(done.prediction.device)] = prediction[mine.to(prediction.device)].to(
                done.prediction.dtype)
            done.used[rows.to(done.used.device)] = k + 1
            done.latency[rows] = latency[mine]
            done.remaining -= int(mine.sum())
