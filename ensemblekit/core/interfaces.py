"""The four interfaces of ensemblekit and the values that flow between them.

* `SharingTopology` (in [`ensemblekit.components.topologies`][ensemblekit.components.topologies]) says which
  nodes (parameter copies of blocks) exist and which path each member takes.
* [`Aggregator`][ensemblekit.core.interfaces.Aggregator] turns member logits into one prediction, all at once or
  member by member.
* [`LossStrategy`][ensemblekit.core.interfaces.LossStrategy] turns an
  [`EnsembleOutput`][ensemblekit.core.interfaces.EnsembleOutput] and labels into a
  total loss and named parts.
* [`HaltingPolicy`][ensemblekit.core.interfaces.HaltingPolicy] decides per sample when to stop adding members.

Besides them, an [`Executor`][ensemblekit.core.interfaces.Executor] says how the nodes of one level are
evaluated (a loop, batched with ``vmap``, packed into grouped convolutions).

Every tensor of members is laid out ``b m c`` (einops notation): batch,
members in anytime (depth-first) order, classes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ensemblekit.errors import EnsembleKitWarning, InvalidValueError

if TYPE_CHECKING:
    from ensemblekit.core.blocks import State
    from ensemblekit.core.ensemble import Ensemble

__all__ = [
    "Aggregator",
    "AggregatorState",
    "EnsembleOutput",
    "Executor",
    "HaltingPolicy",
    "HaltingStep",
    "LossResult",
    "LossStrategy",
    "UntrainedHaltingWarning",
]

AggregatorState = dict[str, Tensor]
"""Running state of an incremental aggregation; its per-sample entries are batch-first."""


class Aggregator(nn.Module, ABC):
    """Members ``b m c`` -> prediction ``b c``, in a batch and an incremental form.

    Subclasses implement the incremental form ([`update()`][ensemblekit.core.interfaces.Aggregator.update] and
    [`value()`][ensemblekit.core.interfaces.Aggregator.value]); the batch form folds it, so both agree exactly. The
    prediction is a vector of scores whose ``softmax`` is the ensemble's
    predictive distribution (logits for a mean of logits, log-probabilities
    for a mean of probabilities), so a cross-entropy on it is meaningful.
    """

    per_sample_state: ClassVar[frozenset[str] | None] = None
    """Keys of the running state holding per-sample (batch-first) values: when samples stop,
    [`Ensemble.predict`][ensemblekit.core.ensemble.Ensemble.predict] drops them from these entries and keeps the
    others whole (counts, per-class tensors). ``None`` (the default): every tensor with a dimension is
    per-sample and must be batch-first; 0-dim tensors and other values are kept whole."""

    differentiable: ClassVar[bool] = True
    """False for an aggregation that passes no gradient to the members (a vote): losses that train
    through the aggregate refuse it at ``wrap()`` time."""

    @abstractmethod
    def update(self, state: AggregatorState | None, logits: Tensor, index: int) -> AggregatorState:
        """Add member ``index`` (0-based, anytime order) with ``logits`` ``b c``."""

    @abstractmethod
    def value(self, state: AggregatorState) -> Tensor:
        """The prediction ``b c`` of the members added so far."""

    def prefixes(self, members: Tensor) -> Tensor:
        """Predictions of every prefix: ``b m c -> b m c``, entry k uses members 0..k."""
        _check_members(members)
        state: AggregatorState | None = None
        out = []
        for k in range(members.shape[1]):
            state = self.update(state, members[:, k], k)
            out.append(self.value(state))
        return torch.stack(out, dim=1)

    def forward(self, members: Tensor) -> Tensor:
        """Prediction of all members: ``b m c -> b c``."""
        _check_members(members)
        state = self.update(None, members[:, 0], 0)
        for k in range(1, members.shape[1]):
            state = self.update(state, members[:, k], k)
        return self.value(state)


def _check_members(members: Tensor) -> None:
    if members.ndim != 3 or members.shape[1] == 0:
        raise InvalidValueError(
            f"members must be a [batch, members, classes] tensor with at least one member, "
            f"got shape {tuple(members.shape)}"
        )


@dataclass
class EnsembleOutput:
    """What one forward pass of an [`Ensemble`][ensemblekit.core.ensemble.Ensemble] produced.

    Attributes:
        members: member logits ``b m c`` in anytime order.
        aggregator: the ensemble's aggregator (for prefix predictions).
        nested_sizes: the member counts of the topology's nested sub-ensembles
            (``1, k, k^2, ...`` for a tree), used by nested losses.
        extras: what some strategies need besides logits (exit features,
            halting logits), keyed by name; every tensor is batch-first.
    """

    members: Tensor
    aggregator: Aggregator
    nested_sizes: tuple[int, ...]
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_members(self) -> int:
        return self.members.shape[1]

    def ensemble(self, k: int | None = None) -> Tensor:
        """Prediction ``b c`` of the first ``k`` members (all when ``k`` is None)."""
        k = self.num_members if k is None else k
        if not 1 <= k <= self.num_members:
            raise InvalidValueError(f"k must be in 1..{self.num_members}, got {k}")
        return self.aggregator(self.members[:, :k])

    def prefixes(self) -> Tensor:
        """Prediction of every prefix of members: ``b m c``."""
        return self.aggregator.prefixes(self.members)


@dataclass
class LossResult:
    """A total loss to call ``backward()`` on and its named parts for logging."""

    total: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


class LossStrategy(nn.Module, ABC):
    """(ensemble output, labels) -> [`LossResult`][ensemblekit.core.interfaces.LossResult].

    ``requires`` names the extras the strategy reads from
    `EnsembleOutput.extras`; [`check()`][ensemblekit.core.interfaces.LossStrategy.check] runs at ``wrap()`` time so a
    mismatch (an IRENE loss without a learned halting policy) fails there with
    a clear message instead of mid-training.
    """

    requires: frozenset[str] = frozenset()  # of the class; an instance may change it with its options
    trains_through_aggregate: ClassVar[bool] = False
    """True for a loss with a term on the aggregated prediction that must carry gradient to the members
    (L_S, EnsembleNet's ensemble term): it refuses an aggregator that is not differentiable."""
    trains_halting: ClassVar[bool] = False
    """True for a loss that holds the halting policy's training terms itself (IRENE's): then
    [`Ensemble.loss`][ensemblekit.core.ensemble.Ensemble.loss] does not add the policy's
    [`HaltingPolicy.loss()`][ensemblekit.core.interfaces.HaltingPolicy.loss]."""

    @abstractmethod
    def forward(self, output: EnsembleOutput, target: Tensor) -> LossResult:
        """Compute the loss of ``output`` against integer labels ``target`` ``[B]``."""

    def check(self, ensemble: Ensemble) -> None:
        """Raise ``ValueError`` if ``ensemble`` cannot provide what this loss needs."""
        missing = self.requires - ensemble.provides
        if missing:
            raise InvalidValueError(
                f"loss {type(self).__name__} needs {sorted(missing)} in the ensemble output, "
                f"but this ensemble provides {sorted(ensemble.provides) or 'nothing extra'}; "
                "choose a topology or halting policy that provides it"
            )
        if self.trains_through_aggregate and not ensemble.aggregator.differentiable:
            raise InvalidValueError(
                f"loss {type(self).__name__} trains the members through the aggregated prediction, but "
                f"aggregator {type(ensemble.aggregator).__name__} passes no gradient to them; "
                "use 'mean' or 'mean_probs' for training"
            )


@dataclass
class HaltingStep:
    """What a halting policy sees after member ``index`` has been evaluated.

    Attributes:
        index: 0-based index of the member just evaluated (anytime order).
        num_members: members in the ensemble; the last one always stops.
        member_logits: logits ``b c`` of member ``index``.
        prediction: the aggregated prediction ``b c`` of members ``0..index``.
        flops: FLOPs per sample spent on members ``0..index``.
        extras: per-sample extras (batch-first) named by the policy's ``step_inputs``: the
            member's head input (a state: a tensor or a tuple), the seconds elapsed.
    """

    index: int
    num_members: int
    member_logits: Tensor
    prediction: Tensor
    flops: float
    extras: dict[str, Any] = field(default_factory=dict)


class HaltingPolicy(nn.Module, ABC):
    """Decides per sample whether to stop adding members.

    A policy is called once after each member with a [`HaltingStep`][ensemblekit.core.interfaces.HaltingStep] and
    its own per-sample state (batch-first tensors, so the ensemble can drop
    samples that stopped). It returns a boolean mask ``[B]``: True where the
    sample stops now. After the last member every sample stops regardless.
    A policy with parameters to train overrides [`loss()`][ensemblekit.core.interfaces.HaltingPolicy.loss] (its
    own terms, which [`Ensemble.loss`][ensemblekit.core.ensemble.Ensemble.loss] adds to whatever the task loss
    is), [`is_trained`][ensemblekit.core.interfaces.HaltingPolicy.is_trained] and
    [`mark_trained()`][ensemblekit.core.interfaces.HaltingPolicy.mark_trained]; one that needs held-out data
    overrides [`calibrate()`][ensemblekit.core.interfaces.HaltingPolicy.calibrate].

    ``step_inputs`` names what the policy reads from `HaltingStep.extras`:
    "head_input" (the member's head input state; ``forward_output`` then also
    puts every member's in ``extras["head_inputs"]``) and "seconds" (``[B]``
    wall-clock seconds since the first member started).
    """

    provides: frozenset[str] = frozenset()  # of the class; an instance may change it with its options
    step_inputs: ClassVar[frozenset[str]] = frozenset()
    per_sample_state: ClassVar[frozenset[str] | None] = None
    """Keys of the running state holding per-sample (batch-first) values: when samples stop,
    [`Ensemble.predict`][ensemblekit.core.ensemble.Ensemble.predict] drops them from these entries and keeps the
    others whole (counts, per-class tensors). ``None`` (the default): every tensor with a dimension is
    per-sample and must be batch-first; 0-dim tensors and other values are kept whole."""

    def bind(self, ensemble: Ensemble) -> None:
        """Called when the policy is given to an ensemble (to read its heads or costs)."""

    @abstractmethod
    def step(self, step: HaltingStep, state: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Return ``(stop mask [B] bool, new state)`` for this step."""

    def training_extras(self, output: EnsembleOutput, ensemble: Ensemble) -> dict[str, Tensor]:
        """Extras this policy adds to a training forward pass (default none)."""
        return {}

    def calibrate(self, ensemble: Ensemble, data: Any) -> None:
        """Fit thresholds on held-out data; the default policy needs none."""

    def loss(self, output: EnsembleOutput, target: Tensor) -> LossResult | None:
        """The policy's own training terms on ``output`` (from ``forward_output``) and labels ``target``.

        ``None`` (the default): nothing to train. Named parts are logged as
        ``halting.<name>`` next to the task loss's.
        """
        return None

    @property
    def is_trained(self) -> bool:
        """False while a policy with parameters to train has never been trained
        ([`Ensemble.predict`][ensemblekit.core.ensemble.Ensemble.predict] then warns with
        [`UntrainedHaltingWarning`][ensemblekit.core.interfaces.UntrainedHaltingWarning])."""
        return True

    def mark_trained(self) -> None:  # noqa: B027  (a hook: a policy without parameters has nothing to record)
        """Record that the policy was trained (the trainer calls it; kept in a buffer, so in checkpoints)."""


class UntrainedHaltingWarning(EnsembleKitWarning):
    """``predict()`` with a halting policy whose parameters were never trained (it halts at random)."""


class Executor(ABC):
    """Evaluates the nodes of one level: ``run(modules, inputs) -> outputs``.

    ``modules`` are copies of one block (same structure, own parameters);
    ``inputs[i]`` is the state fed to ``modules[i]``. Several nodes may receive
    the very same input object (the children of one tree node). Every
    executor must compute what a loop over the nodes computes (outputs,
    gradients and BatchNorm running statistics). Registered by name through
    the ``register_executors`` hook; see [`ensemblekit.execution`][ensemblekit.execution].

    Pickling and ``copy.deepcopy`` keep the public attributes and pass them
    back to the constructor, so public attributes must be constructor
    arguments and caches must live in attributes starting with ``_``.
    """

    name: str = ""
    chains: bool = False
    """Whether consecutive levels run by this strategy pass data more cheaply than level-by-level timing shows."""

    def unsupported(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> str | None:
        """Why this strategy cannot run these nodes, or ``None`` when it can."""
        return None

    @abstractmethod
    def run(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> list[State]:
        """Output state of every node, in the order of ``modules``."""

    def forget(self, modules: Sequence[nn.Module]) -> None:  # noqa: B027  (a hook: nothing cached by default)
        """Drop what is cached for these nodes (packed parameters)."""

    def prepare_pass(self, key: Hashable, run_pass: Callable[[], Tensor], module: nn.Module) -> None:  # noqa: B027
        """Called before each whole forward pass of an ensemble; does nothing by default.

        A strategy that tunes itself on whole passes (``auto``) runs
        ``run_pass`` here as often as it needs.

        Args:
            key: what the pass's speed depends on beyond its levels (input
                shape, mode, members).
            run_pass: runs the pass and returns its output.
            module: the module whose parameters and buffers the pass uses.
        """

    def __getstate__(self) -> dict[str, Any]:
        # only the constructor arguments: caches hold the nodes and tensors derived from them
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]
