"""The [`Ensemble`][ensemblekit.core.ensemble.Ensemble] module: blocks wired into a topology, with heads and an
aggregator."""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ensemblekit.core.anytime import anytime
from ensemblekit.core.batching import StateLayout, select_running_state
from ensemblekit.core.blocks import BlockSplit, State, call_block
from ensemblekit.core.cache import NodeCache
from ensemblekit.core.cost import EnsembleCosts, PrefixCost, cost_shape, measure_costs
from ensemblekit.core.decision import decide
from ensemblekit.core.graph import NodeGraph, SharingTopology
from ensemblekit.core.heads import ExitHead, classifier_input, feature_dim, replace_classifier
from ensemblekit.core.initialisation import MemberInit
from ensemblekit.core.interfaces import (
    Aggregator,
    EnsembleOutput,
    Executor,
    HaltingPolicy,
    LossResult,
    LossStrategy,
    UntrainedHaltingWarning,
)
from ensemblekit.core.registry import EXECUTORS
from ensemblekit.core.streaming import StreamedPrediction, StreamEngine
from ensemblekit.core.timing import Clock
from ensemblekit.errors import InvalidTypeError, InvalidValueError

__all__ = ["Ensemble", "FeatureExit", "HaltedPrediction"]


class FeatureExit(nn.Module):
    """Feeds an exit head the feature map picked out of a block's state."""

    def __init__(self, head: nn.Module, feature_index: int | None):
        super().__init__()
        self.head = head
        self.feature_index = feature_index

    def forward(self, *state: Any) -> Tensor:
        feature = state[0] if self.feature_index is None else state[self.feature_index]
        return self.head(feature)


@dataclass
class HaltedPrediction:
    """Result of [`Ensemble.predict()`][ensemblekit.core.ensemble.Ensemble.predict] with a halting policy.

    Attributes:
        prediction: aggregated prediction ``[B, C]`` at the step each sample stopped.
        members_used: members evaluated per sample ``[B]`` (1-based count).
        flops: FLOPs per sample that its prefix cost ``[B]``.
    """

    prediction: Tensor
    members_used: Tensor
    flops: Tensor


class Ensemble(nn.Module):
    """An adaptive ensemble built from a [`BlockSplit`][ensemblekit.core.blocks.BlockSplit].

    Use [`wrap()`][ensemblekit.build.wrap] to build one from a timm model. ``forward``
    returns the aggregated prediction (a drop-in for the backbone);
    [`forward_members()`][ensemblekit.core.ensemble.Ensemble.forward_members] returns every member's logits in
    anytime order.

    Args:
        split: the backbone cut into blocks.
        topology: which copies of each block exist and who uses them.
        aggregator: how member logits combine into a prediction.
        loss: the training objective used by [`loss()`][ensemblekit.core.ensemble.Ensemble.loss].
        halting: the policy used by [`predict()`][ensemblekit.core.ensemble.Ensemble.predict].
        init: where every copy of a block and of the head starts: "reinit"
            (i.i.d. draws of the backbone's own initialisation, as in HNE),
            "pretrained" (the given weights, each member's classifier drawn
            anew), "pretrained+noise" (plus noise; ``{"name":
            "pretrained+noise", "scale": s}``), "copy" (identical copies) or
            "auto" ("pretrained" for trained weights, else "reinit"); see
            [`ensemblekit.core.initialisation`][ensemblekit.core.initialisation].
        exit_head: factory ``(in_features, num_classes, fmt, num_prefix_tokens)
            -> nn.Module`` for exits before the last block (chains).
        execution: how the nodes of one level run: a registered executor
            name ("loop", "vmap", "grouped", "auto", ...; see
            [`ensemblekit.execution`][ensemblekit.execution]), a mapping ``{"name": ..., **options}``
            or an [`Executor`][ensemblekit.core.interfaces.Executor].
        node_modules: node index -> module used as that node instead of a
            copy of the backbone's block (e.g. EnsembleNet's narrower
            branches); used as given, neither copied nor re-initialised.
        head_modules: member index -> module used as that member's head
            instead of a copy of the backbone's head; used as given.

    Attributes:
        check_finite: make [`check_input()`][ensemblekit.core.ensemble.Ensemble.check_input] reject inputs
            holding NaN or Inf (off by default: the check reads every value and, on a GPU, waits for it; the
            trainer names a batch whose loss is not finite anyway).
        pretrained_cfg: the backbone's timm ``pretrained_cfg`` (``default_cfg``
            is the same dict), its ``input_size`` the channels and size the
            ensemble takes; ``{}`` for a backbone without one. timm's
            ``resolve_model_data_config(ensemble)`` reads it.
        grad_checkpointing: recompute each level's nodes in the backward pass
            instead of keeping their activations (see ``set_grad_checkpointing``).

    Beyond ``forward``, an ensemble has timm's model API where it makes sense:
    ``pretrained_cfg``, ``forward_features`` (every member's feature map
    before its head), ``forward_head``, ``reset_classifier``,
    ``set_grad_checkpointing``, ``feature_info`` and ``num_features``, and
    ``member_embeddings`` (every member's pre-logits). See ``docs/timm.md``.
    """

    def __init__(
        self,
        split: BlockSplit,
        topology: SharingTopology,
        aggregator: Aggregator,
        loss: LossStrategy | None = None,
        halting: HaltingPolicy | None = None,
        init: str | dict = "auto",
        exit_head: Any = ExitHead,
        execution: str | dict | Executor = "loop",
        node_modules: dict[int, nn.Module] | None = None,
        head_modules: dict[int, nn.Module] | None = None,
    ):
        super().__init__()
        self.topology = topology
        self.graph: NodeGraph = topology.build(len(split))
        self.num_classes = split.num_classes
        self.in_chans = split.in_chans
        self.input_size = split.input_size
        self.example_size = split.example_size
        self.native_size = split.native_size
        self._costs: dict[tuple[int, int, int], EnsembleCosts] = {}
        self.block_names = list(split.names or [])
        self.state_layouts: list[StateLayout | None] = (  # per block: what is per-sample (None: not declared)
            list(split.per_sample) if split.per_sample else [None] * len(split))
        self.pretrained_cfg: dict[str, Any] = dict(split.pretrained_cfg or {})
        self.grad_checkpointing = False
        self._feature_index = list(split.feature_index)
        self._feature_format = list(split.feature_format)
        self._num_prefix_tokens = split.num_prefix_tokens
        self._feature_info: list[dict[str, Any]] | None = None
        copies = MemberInit(split, init)
        self.init_mode = copies.mode  # the mode applied ("auto" resolved)
        self.nodes = nn.ModuleList(_override(self._make_nodes(copies, node_modules or {}), node_modules, "node"))
        self.heads = nn.ModuleList(_override(self._make_heads(split, copies, exit_head, head_modules or {}),
                                             head_modules, "head"))
        self.aggregator = aggregator
        self.loss_strategy = loss
        self.halting = halting
        self.check_finite = False
        self.execution = execution
        if halting is not None:
            halting.bind(self)
        if loss is not None:
            loss.check(self)

    # ------------------------------------------------------------------ build
    def _make_nodes(self, copies: MemberInit, skip: Container[int]) -> list[nn.Module | None]:
        """Copy ``k`` of block ``b`` for the ``k``-th node of block ``b`` (``None`` where ``skip`` replaces it)."""
        nodes: list[nn.Module | None] = []
        count = [0] * len(copies.split)
        for node in self.graph.nodes:
            nodes.append(None if node.index in skip else copies.block(node.block, count[node.block]))
            count[node.block] += 1
        return nodes

    def _make_heads(self, split: BlockSplit, copies: MemberInit, exit_head: Any,
                    skip: Container[int]) -> list[nn.Module | None]:
        last = len(split) - 1
        exit_blocks = [self.graph.nodes[m.exit_node].block for m in self.graph.members]
        features = _example_features(split, exit_blocks) if min(exit_blocks) < last else {}
        heads: list[nn.Module | None] = []
        final_copies = 0
        for block in exit_blocks:
            if block == last:
                heads.append(None if len(heads) in skip else copies.head(final_copies))
                final_copies += 1
            else:
                fmt = split.feature_format[block]
                head = exit_head(feature_dim(features[block], fmt), split.num_classes, fmt, split.num_prefix_tokens)
                heads.append(FeatureExit(head, split.feature_index[block]))
        return heads

    # ------------------------------------------------------------ properties
    @property
    def execution(self) -> str:
        """The name of how the nodes of one level run.

        Assign a name, a mapping ``{"name": ..., **options}`` or an
        [`Executor`][ensemblekit.core.interfaces.Executor] to switch
        (``ens.execution = "auto"``).
        """
        return self._executor.name

    @execution.setter
    def execution(self, spec: str | dict | Executor) -> None:
        self._executor = EXECUTORS.create(spec)

    @property
    def executor(self) -> Executor:
        """The executor that runs the nodes of one level (set it through
        [`execution`][ensemblekit.core.ensemble.Ensemble.execution])."""
        return self._executor

    @property
    def num_members(self) -> int:
        return self.graph.num_members

    @property
    def nested_sizes(self) -> tuple[int, ...]:
        return self.graph.nested_sizes

    @property
    def provides(self) -> frozenset[str]:
        """Names of the extras this ensemble's outputs carry (see LossStrategy.requires)."""
        return self.halting.provides if self.halting is not None else frozenset()

    # --------------------------------------------------------------- forward
    def check_input(self, x: Any) -> None:
        """Raise a clear ``ValueError``/``TypeError`` for input the backbone cannot take."""
        if not isinstance(x, Tensor):
            raise InvalidTypeError(f"input must be a torch.Tensor of images [B, C, H, W], got {type(x).__name__}")
        if x.ndim != 4:
            raise InvalidValueError(f"input must have 4 dimensions [B, C, H, W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InvalidTypeError(f"input must be a floating-point tensor, got {x.dtype}; convert with x.float()")
        if x.shape[0] == 0:
            raise InvalidValueError("input batch is empty (batch size 0)")
        if self.in_chans is not None and x.shape[1] != self.in_chans:
            raise InvalidValueError(
                f"input has {x.shape[1]} channels but the backbone expects {self.in_chans}; "
                f"create the backbone with in_chans={x.shape[1]} or convert the images"
            )
        if self.input_size is not None and tuple(x.shape[-2:]) != tuple(self.input_size):
            raise InvalidValueError(
                f"input is {tuple(x.shape[-2:])} but the backbone only accepts {tuple(self.input_size)}; "
                "resize the images or create the backbone with img_size set"
            )
        weight = next(self.nodes[0].parameters(), None)
        if weight is not None and x.device != weight.device:
            raise InvalidValueError(f"input is on {x.device} but the ensemble is on {weight.device}; move one with "
                                    ".to()")
        if weight is not None and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise InvalidTypeError(f"input is {x.dtype} but the ensemble's weights are {weight.dtype}; "
                                   f"convert with x.to({weight.dtype}) or run under torch.autocast")
        if self.check_finite and not bool(torch.isfinite(x).all()):
            raise InvalidValueError(f"input holds {int((~torch.isfinite(x)).sum())} NaN or infinite values")

    def compute_nodes(self, cache: NodeCache, node_indices: Sequence[int], keep: Container[int] | None = None) -> None:
        """Evaluate the nodes in ``node_indices`` missing from ``cache``, level by level.

        Args:
            keep: when given, a state outside ``keep`` is dropped from the
                cache once the next level has read it (less memory held in a
                single forward pass); by default every state stays cached.
        """
        levels: dict[int, list[int]] = {}  # block -> the missing nodes of that level, in node order
        for i in sorted(set(node_indices) - cache.states.keys()):
            levels.setdefault(self.graph.nodes[i].block, []).append(i)
        for block in sorted(levels):
            todo = levels[block]
            parents = [self.graph.nodes[i].parent for i in todo]
            inputs = [cache.output_of(p) for p in parents]
            modules = [self.nodes[i] for i in todo]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                outputs = checkpoint(self._executor.run, modules, inputs, use_reentrant=False)
            else:
                outputs = self._executor.run(modules, inputs)
            cache.states.update(zip(todo, outputs))
            if keep is not None:
                del inputs
                for p in {q for q in parents if q is not None}:
                    if p not in keep:
                        del cache.states[p]

    def member_logits(self, cache: NodeCache, member: int) -> Tensor:
        """Logits ``[B, C]`` of one member, computing only the nodes ``cache`` lacks.

        A head whose ``takes_previous_logits`` is true (IMTA's inline subnetwork
        collaboration, [`ensemblekit.methods.imta.isc`][ensemblekit.methods.imta.isc]) is called as
        ``head(*state, previous=logits of member - 1)``.
        """
        if member not in cache.logits:
            path = self.graph.members[member].path
            if path[-1] not in cache.states:  # its own state suffices (a forward pass drops the others)
                self.compute_nodes(cache, path)
            cache.logits[member] = self._call_head(member, cache.states[path[-1]],
                                                   lambda: self.member_logits(cache, member - 1))
        return cache.logits[member]

    def _call_head(self, member: int, state: State, previous: Any) -> Tensor:
        """Member ``member``'s head on its exit state; ``previous()`` gives member ``member - 1``'s logits."""
        head = self.heads[member]
        if member > 0 and getattr(head, "takes_previous_logits", False):
            return cast(Tensor, head(*(state if isinstance(state, tuple) else (state,)), previous=previous()))
        return cast(Tensor, call_block(head, state))  # a head returns the logits

    def forward_output(self, x: Tensor, members: Sequence[int] | None = None) -> EnsembleOutput:
        """Every (or the given) member's logits plus the extras losses need.

        Returns:
            An [`EnsembleOutput`][ensemblekit.core.interfaces.EnsembleOutput] whose ``members``
            is ``b m c`` in anytime order.
        """
        self.check_input(x)
        members = list(range(self.num_members)) if members is None else self._member_list(members)
        if not torch.compiler.is_compiling():
            key = (str(x.device), x.dtype, tuple(x.shape), x.stride(), torch.is_grad_enabled(), self.training,
                   tuple(members))
            self._executor.prepare_pass(key, lambda: self._forward_pass(x, members)[1], self)
        cache, logits = self._forward_pass(x, members)
        output = EnsembleOutput(logits, self.aggregator, self.nested_sizes)
        if self.halting is not None:
            if "head_input" in self.halting.step_inputs:
                output.extras["head_inputs"] = {m: cache.states[self.graph.members[m].exit_node] for m in members}
            output.extras.update(self.halting.training_extras(output, self))
        return output

    def _forward_pass(self, x: Tensor, members: list[int]) -> tuple[NodeCache, Tensor]:
        """The cache (exit states only) and the members' logits ``b m c``.

        Level by level, or for a ``sequential`` topology (a cascade) member by
        member: member ``k``'s logits exist before any node only later members use runs.
        """
        cache = NodeCache(x)
        exits = {self.graph.members[m].exit_node for m in members}
        if not self.topology.sequential:
            self.compute_nodes(cache, self.graph.nodes_for(members), keep=exits)
            return cache, torch.stack([self.member_logits(cache, m) for m in members], dim=1)
        logits = []
        for i, m in enumerate(members):
            later = set(self.graph.nodes_for(members[i + 1:]))
            self.compute_nodes(cache, self.graph.members[m].path, keep=exits | later)
            logits.append(self.member_logits(cache, m))
        return cache, torch.stack(logits, dim=1)

    def _member_list(self, members: Any) -> list[int]:
        """``members`` as a list of valid member indices, or a clear error."""
        try:
            out = [operator.index(m) for m in members]
        except TypeError:
            raise InvalidTypeError(f"members must be a sequence of member indices, got {members!r}") from None
        if not out or not all(0 <= m < self.num_members for m in out):
            raise InvalidValueError(f"members must be a non-empty list of indices in 0..{self.num_members - 1}, got "
                                    f"{out}")
        return out

    def forward_members(self, x: Tensor) -> Tensor:
        """Member logits ``[B, M, C]`` in anytime (depth-first) order."""
        return self.forward_output(x).members

    def forward(self, x: Tensor) -> Tensor:
        """The aggregated prediction ``[B, C]`` of all members."""
        return self.aggregator(self.forward_members(x))

    def loss(self, output: EnsembleOutput | Tensor, target: Tensor) -> LossResult:
        """The configured loss of ``output`` (from
        [`forward_output()`][ensemblekit.core.ensemble.Ensemble.forward_output]) against labels.

        A halting policy with its own training terms
        ([`HaltingPolicy.loss`][ensemblekit.core.interfaces.HaltingPolicy.loss], e.g. the learned selector) adds
        them to the total, its parts named ``halting.<name>``, unless the loss holds them already
        (``trains_halting``, IRENE's loss).
        """
        if self.loss_strategy is None:
            raise InvalidValueError("this ensemble has no loss; pass loss=... to ensemblekit.wrap() (or to a recipe)")
        if isinstance(output, Tensor):
            output = EnsembleOutput(output, self.aggregator, self.nested_sizes)
        if not isinstance(output, EnsembleOutput):
            raise InvalidTypeError(f"loss() takes the EnsembleOutput of forward_output(x), got {type(output).__name__}")
        if output.members.ndim != 3 or output.members.shape[-1] != self.num_classes:
            raise InvalidValueError(
                f"loss() takes member logits [B, M, {self.num_classes}] (forward_output(x)), got a tensor of shape "
                f"{tuple(output.members.shape)}; forward(x) returns the aggregated prediction, not the members"
            )
        _check_target(target, output.members)
        result = self.loss_strategy(output, target)
        own = None if self.halting is None or self.loss_strategy.trains_halting else self.halting.loss(output, target)
        if own is None:
            return result
        parts = {**result.parts, **{f"halting.{name}": value for name, value in own.parts.items()}}
        return LossResult(result.total + own.total, parts)

    # --------------------------------------------------------------- costs
    def costs(self, input_size: int | Sequence[int] | None = None) -> EnsembleCosts:
        """FLOPs and parameters per node and head for one image of ``input_size``.

        Measured the first time a shape is asked for, then cached; see
        [`ensemblekit.core.cost`][ensemblekit.core.cost] and [`cost_shape()`][ensemblekit.core.cost.cost_shape]
        for ``input_size`` (default: the backbone's own input size).
        """
        shape = cost_shape(self, input_size)
        if shape not in self._costs:
            self._costs[shape] = measure_costs(self, shape)
        return self._costs[shape]

    def cost_table(self, input_size: int | Sequence[int] | None = None) -> list[PrefixCost]:
        """FLOPs (a multiply-add is 2; ``.macs`` is half) and parameters of the first ``k`` members.

        One row per ``k = 1..M``, shared nodes counted once, for one image of
        ``input_size``: ``S``, ``(H, W)`` or ``(C, H, W)``; by default the
        backbone's own input size (timm's ``pretrained_cfg``), as ``inspect`` shows.
        The rows are a [`CostTable`][ensemblekit.core.cost.CostTable]: a list of
        [`PrefixCost`][ensemblekit.core.cost.PrefixCost] records that prints as an
        aligned table (FLOPs, MACs and parameters in SI units).
        """
        return self.costs(input_size).prefix_table()

    # ----------------------------------------------------- adaptive inference
    def anytime(self, x: Tensor, deadline: float | None = None, max_flops: float | None = None,
                max_members: int | None = None, granularity: str = "member") -> Iterator:
        """Prefix ensembles of 1, 2, ... members with their cost; see
        [`ensemblekit.core.anytime`][ensemblekit.core.anytime].

        ``granularity="nested"`` computes a nested sub-ensemble (``1, k, k^2, ...``
        members) at a time, each level's new nodes in one call, and still yields every prefix.
        """
        return anytime(self, x, deadline=deadline, max_flops=max_flops, max_members=max_members,
                       granularity=granularity)

    @torch.no_grad()
    def predict(self, x: Tensor, halting: HaltingPolicy | None = None) -> HaltedPrediction:
        """Per-sample early stopping: samples that stopped leave the batch.

        After each member the policy decides, per sample, whether to stop;
        stopped samples are removed from every cached state, so the next
        member only runs on the samples still going. What is per-sample is
        declared: by the split for block states, by the aggregator and the
        policy (``per_sample_state``) for their states; see
        [`ensemblekit.core.batching`][ensemblekit.core.batching]. The policy's ``step_inputs`` say
        which extras each step carries (see
        [`HaltingPolicy`][ensemblekit.core.interfaces.HaltingPolicy]).
        """
        policy = halting if halting is not None else self.halting
        if policy is None:
            raise InvalidValueError("predict() needs a halting policy: pass halting=... here or to wrap()")
        if not isinstance(policy, HaltingPolicy):
            raise InvalidTypeError(f"halting must be a HaltingPolicy (build one by name with wrap(..., halting=...)), "
                                   f"got {type(policy).__name__}")
        self.check_input(x)
        policy.bind(self)
        if not policy.is_trained:
            warnings.warn(f"the {type(policy).__name__} halting policy was never trained, so it halts at random: "
                          "train it (ensemblekit.training.trainer.train marks it trained; in your own loop "
                          "ens.loss() trains it, then call ens.halting.mark_trained())",
                          UntrainedHaltingWarning, stacklevel=3)
        b, m_total = x.shape[0], self.num_members
        prefix_flops = [row.flops for row in self.cost_table(input_size=tuple(x.shape[1:]))]
        active = torch.arange(b, device=x.device)
        cache, agg_state, policy_state = NodeCache(x), None, None
        prediction = x.new_zeros(b, self.num_classes)
        used = torch.zeros(b, dtype=torch.long, device=x.device)
        clock = Clock(x.device)
        for m in range(m_total):
            logits = self.member_logits(cache, m)
            stop, current, agg_state, policy_state = decide(
                self, policy, m, logits, agg_state, policy_state, prefix_flops[m],
                head_input=lambda: cache.states[self.graph.members[m].exit_node],  # noqa: B023 (called at once)
                seconds=lambda: torch.full(active.shape, clock(), dtype=torch.float64))  # noqa: B023
            prediction[active[stop]] = current[stop].to(prediction.dtype)
            used[active[stop]] = m + 1
            keep = ~stop
            if not keep.any():
                break
            if keep.all():  # no sample stopped: nothing to drop from the cache
                continue
            n = active.shape[0]
            active = active[keep]
            cache = cache.select(keep, [self.state_layouts[node.block] for node in self.graph.nodes])
            agg_state = select_running_state(agg_state, keep, n, self.aggregator.per_sample_state,
                                             f"aggregator {type(self.aggregator).__name__}")
            policy_state = select_running_state(policy_state, keep, n, policy.per_sample_state,
                                                f"halting policy {type(policy).__name__}")
        flops = torch.tensor(prefix_flops, dtype=torch.float64, device=x.device)[used - 1]
        return HaltedPrediction(prediction, used, flops)

    def stream(self, batches: Iterable[Tensor], halting: HaltingPolicy | None = None, batch_size: int | None = None,
               max_wait: int | None = None) -> Iterator[StreamedPrediction]:
        """Per-sample early stopping over a stream of batches, every step on a full batch.

        Samples that go on to the next member wait for that member's step with
        samples of later batches, and a step runs when ``batch_size`` samples
        wait for it (continuous batching); each sample gets what
        [`predict()`][ensemblekit.core.ensemble.Ensemble.predict] would give it with a per-sample policy. Yields one
        [`StreamedPrediction`][ensemblekit.core.streaming.StreamedPrediction] per input
        batch, in input order, with each sample's latency. Eval mode only. See
        [`ensemblekit.core.streaming`][ensemblekit.core.streaming].

        Args:
            batches: an iterable of images ``[B, C, H, W]`` (or single images
                ``[C, H, W]``), all of one size, dtype and device.
            halting: the policy (default: the one given to ``wrap()``).
            batch_size: samples each step runs on (default: the first batch's size).
            max_wait: latency bound in input batches: once ``max_wait`` later
                batches were submitted, a sample's prediction is out (partial
                steps run); ``None``: partial steps wait for the end of the stream.

        Examples:
            >>> for res in ens.stream(loader_images, halting=ek.halting.Confidence(0.9)):  # doctest: +SKIP
            ...     res.prediction, res.members_used, res.flops, res.latency
        """
        return StreamEngine(self, halting, batch_size=batch_size, max_wait=max_wait).run(batches)

    # ------------------------------------------------------ timm's model API
    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of ``pretrained_cfg`` (the same dict)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, value: dict[str, Any]) -> None:
        self.pretrained_cfg = value

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass instead of keeping them (timm's method).

        In training, with gradients on, each level of nodes (the copies of one
        block) runs under ``torch.utils.checkpoint``: its activations are freed
        after the forward pass and recomputed in the backward pass; only the
        states passed between levels stay. Outputs and gradients are the same.
        As in timm, BatchNorm running statistics are updated again by the
        recomputation.
        """
        self.grad_checkpointing = bool(enable)

    def forward_features(self, x: Tensor, *, stack: bool = True) -> Tensor | list[Tensor]:
        """Every member's feature map before its head: ``[B, M, ...]`` (timm's ``forward_features``, per member).

        A member's features are the feature map of the state its head reads:
        for a tree of ResNets ``[B, M, C, H, W]`` (``b m c h w``), for a ViT
        ``[B, M, L, D]``. Members that exit after different blocks (a chain's
        exits) have features of different shapes: pass ``stack=False`` for a
        list of ``[B, ...]`` tensors in member order.

        Raises:
            ValueError: ``stack`` is on and the members' features differ in shape.
        """
        states = self._exit_states(x)
        features = [self._feature_of(m, state) for m, state in enumerate(states)]
        return _stack_members(features, stack, "features")

    def forward_head(self, x: Tensor | Sequence[Tensor], pre_logits: bool = False) -> Tensor | list[Tensor]:
        """Member logits ``[B, M, C]`` from ``forward_features``' output (timm's ``forward_head``, per member).

        Args:
            x: ``[B, M, ...]`` features, or a list of one ``[B, ...]`` tensor per member.
            pre_logits: return each member's pre-logits (its classifier's
                input, ``[B, M, D]``) instead of its logits, as timm does.

        Returns:
            A ``[B, M, ...]`` tensor; for pre-logits given features as a list,
            a list (members' pre-logits may differ in width).

        Raises:
            ValueError: a member's head reads more than its feature map (a state
                with side inputs, e.g. some exits of a chain): use
                ``forward_members`` or ``member_embeddings``, which
                keep the whole state.
        """
        features = list(x.unbind(1)) if isinstance(x, Tensor) else list(x)
        if len(features) != self.num_members:
            raise InvalidValueError(f"forward_head takes the features of all {self.num_members} members "
                                    f"([B, M, ...] or a list of M tensors), got {len(features)}")
        for m in range(self.num_members):
            block = self.graph.nodes[self.graph.members[m].exit_node].block
            if self._feature_index[block] is not None:
                raise InvalidValueError(f"member {m}'s head reads a state of several values after block {block} (its "
                                        "feature map and side inputs), which forward_head cannot rebuild from the "
                                        "features; use forward_members(x) or member_embeddings(x)")
        outputs = self._head_outputs(features, pre_logits)
        return _stack_members(outputs, isinstance(x, Tensor) or not pre_logits, "pre-logits")

    def member_embeddings(self, x: Tensor, *, stack: bool = True) -> Tensor | list[Tensor]:
        """Every member's embedding ``[B, M, D]``: the input of its classifier (timm's pre-logits).

        The same as ``forward_head(forward_features(x), pre_logits=True)``
        (pooled, after the head's norm and dropout, before the classifier),
        for any head. ``stack=False`` gives a list of ``[B, D]`` tensors, for
        members of different widths.
        """
        return _stack_members(self._head_outputs(self._exit_states(x), True), stack, "embeddings")

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Give every member a new classifier with ``num_classes`` outputs (timm's ``reset_classifier``).

        Each member's layer with the old number of outputs is replaced by a new
        ``nn.Linear`` drawn independently by PyTorch's default initialisation;
        the rest of each head is kept. ``num_classes`` follows. An ensemble
        built by ``ensemblekit.wrap`` or a recipe records the change, so
        that ``ensemblekit.load`` makes it again.

        Args:
            num_classes: the new number of classes (at least 1; for features,
                use ``member_embeddings``).
            global_pool: must be ``None``: the heads keep their pooling.

        Raises:
            ValueError: ``num_classes`` is not a positive integer, ``global_pool``
                is given, a head reads the previous member's logits (IMTA's ISC:
                reset the classifier before adding those), or the halting policy
                was built for the old classes (set ``ensemble.halting = None``
                first, then give a new policy).
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise InvalidValueError(f"num_classes must be an integer >= 1, got {num_classes!r}; an ensemble's members "
                                    "keep a classifier (for features, use member_embeddings(x))")
        if global_pool is not None:
            raise InvalidValueError("an ensemble's heads keep their pooling: reset_classifier takes no global_pool")
        if any(getattr(h, "takes_previous_logits", False) for h in self.heads):
            raise InvalidValueError("a head reads the previous member's logits (IMTA's inline subnetwork "
                                    "collaboration), sized by the number of classes: reset the classifier before "
                                    "adding those heads")
        old_heads, old_classes = list(self.heads), self.num_classes
        for m, head in enumerate(old_heads):
            self.heads[m] = replace_classifier(copy.deepcopy(head), old_classes, num_classes)
        self.num_classes = num_classes
        try:
            if self.halting is not None:
                self.halting.bind(self)
            if self.loss_strategy is not None:
                self.loss_strategy.check(self)
        except Exception as err:
            for m, head in enumerate(old_heads):
                self.heads[m] = head
            self.num_classes = old_classes
            raise InvalidValueError(f"reset_classifier({num_classes}): {err}; set ensemble.halting = None (or give "
                                    "another loss) first, then give a new one") from err
        self._costs.clear()
        spec = vars(self).get("build_spec")  # ensemblekit.build's record: loading replays the change
        if isinstance(spec, dict) and isinstance(spec.get("preparations"), list):
            spec["preparations"].append({"name": "reset_classifier", "num_classes": num_classes})

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's ``feature_info`` of the blocks on member 0's path: one dict per block.

        Each has ``num_chs`` (channels of the block's feature map), ``reduction``
        (input size over the feature map's size), ``module`` (the node's name,
        ``nodes.<i>``), ``block`` and ``fmt`` (the layout: "NCHW", "NHWC", "NLC"
        or "NC"). Measured once, on a zero image of the ensemble's input size.
        """
        if self._feature_info is None:
            self._feature_info = self._measure_feature_info()
        return self._feature_info

    @property
    def num_features(self) -> int:
        """Channels of the last block's feature map (timm's ``num_features``), from ``feature_info``."""
        return int(self.feature_info[-1]["num_chs"])

    def _exit_states(self, x: Tensor) -> list[State]:
        """Every member's exit state (what its head reads), in member order."""
        self.check_input(x)
        members = list(range(self.num_members))
        exits = [self.graph.members[m].exit_node for m in members]
        cache = NodeCache(x)
        self.compute_nodes(cache, self.graph.nodes_for(members), keep=set(exits))
        return [cache.states[e] for e in exits]

    def _feature_of(self, member: int, state: State) -> Tensor:
        index = self._feature_index[self.graph.nodes[self.graph.members[member].exit_node].block]
        return cast(Tensor, state if index is None else state[index])

    def _head_outputs(self, states: Sequence[State], pre_logits: bool) -> list[Tensor]:
        """Each member's logits, or with ``pre_logits`` its classifier's input, from its exit state."""
        logits: list[Tensor] = []
        outputs: list[Tensor] = []
        for m, state in enumerate(states):
            if not pre_logits:
                logits.append(self._call_head(m, state, lambda: logits[-1]))
                continue
            with classifier_input(self.heads[m], self.num_classes) as captured:
                logits.append(self._call_head(m, state, lambda: logits[-1]))
            outputs.append(captured[-1])
        return outputs if pre_logits else logits

    @torch.no_grad()
    def _measure_feature_info(self) -> list[dict[str, Any]]:
        weight = next(self.parameters(), None)
        h, w = self.input_size or self.example_size
        state: State = torch.zeros(2, self.in_chans or 3, h, w,
                                   device=None if weight is None else weight.device,
                                   dtype=None if weight is None or not weight.is_floating_point() else weight.dtype)
        path = self.graph.members[0].path
        nodes = [self.nodes[i] for i in path]
        modes = [n.training for n in nodes]
        info: list[dict[str, Any]] = []
        try:
            for node in nodes:
                node.eval()
            for i, node in zip(path, nodes):
                block = self.graph.nodes[i].block
                state = call_block(node, state)
                index, fmt = self._feature_index[block], self._feature_format[block]
                feature = cast(Tensor, state if index is None else state[index])
                info.append({"num_chs": feature_dim(feature, fmt), "reduction": _reduction(feature, fmt, h, w,
                             self._num_prefix_tokens), "module": f"nodes.{i}", "block": block, "fmt": fmt})
        finally:
            for node, mode in zip(nodes, modes):
                node.train(mode)
        for a, b in zip(info, info[1:]):  # timm's FeatureInfo wants reductions that never shrink
            b["reduction"] = max(a["reduction"], b["reduction"])
        return info


def _override(modules: list[nn.Module | None], replace: dict[int, nn.Module] | None, kind: str) -> list[nn.Module]:
    """``modules`` (``None`` where not built) with the entries named in ``replace`` swapped for the given ones."""
    replace = replace or {}
    for index in replace:
        if not 0 <= index < len(modules):
            raise InvalidValueError(f"{kind}_modules has index {index}, but the ensemble has {kind}s "
                                    f"0..{len(modules) - 1}")
    return [replace[i] if i in replace else cast(nn.Module, m) for i, m in enumerate(modules)]


def _stack_members(values: list[Tensor], stack: bool, what: str) -> Tensor | list[Tensor]:
    """``values`` (one per member) stacked on dim 1, or the list itself when ``stack`` is off."""
    if not stack:
        return values
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise InvalidValueError(f"the members' {what} differ in shape ({', '.join(map(str, sorted(shapes)))}: members "
                                "exit after different blocks); pass stack=False for a list, one tensor per member")
    return torch.stack(values, dim=1)


def _reduction(feature: Tensor, fmt: str, h: int, w: int, num_prefix_tokens: int) -> int:
    """How many input pixels one feature-map position spans, along a side."""
    if fmt == "NCHW":
        return max(1, round(h / feature.shape[-2]))
    if fmt == "NHWC":
        return max(1, round(h / feature.shape[1]))
    if fmt == "NLC":
        tokens = max(1, feature.shape[1] - num_prefix_tokens)
        return max(1, round((h * w / tokens) ** 0.5))
    return max(h, w)  # "NC": pooled, one position for the whole image


def _check_target(target: Any, members: Tensor) -> None:
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        got = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise InvalidTypeError(f"labels must be an integer tensor [B] of class indices, got {got}")
    if target.shape != members.shape[:1]:
        raise InvalidValueError(f"labels have shape {tuple(target.shape)}, expected [{members.shape[0]}]")
    c = members.shape[-1]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= c):
        raise InvalidValueError(f"labels must be in 0..{c - 1}, got values in {int(target.min())}..{int(target.max())}")


@torch.no_grad()
def _example_features(split: BlockSplit, blocks: list[int]) -> dict[int, Tensor]:
    """Feature maps after the given blocks for one example image (to size exit heads)."""
    h, w = split.input_size or split.example_size
    state: State = torch.zeros(2, split.in_chans or 3, h, w)
    out = {}
    was_training = [b.training for b in split.blocks]
    for block in split.blocks:
        block.eval()
    try:
        for b, block in enumerate(split.blocks):
            state = call_block(block, state)
            if b in blocks:
                out[b] = split.feature(state, b)
    finally:
        for block, mode in zip(split.blocks, was_training):
            block.train(mode)
    return out
