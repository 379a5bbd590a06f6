"""IRENE's training schedule, its utility metric and the WoC baseline (Li et al., AAAI 2023).

* :func:`fit`: sequential training (Algorithm 1: member ``t`` trained at step
  ``t`` with the earlier ones frozen, optimisers re-created at every step) or
  joint training, with the paper's optimisers (App. A.1).
* :func:`utility`: the utility of Eq. 14 as Tables 1-2 report it.
* :class:`WoC`: the confidence-threshold cascade on an average ensemble
  (Wang et al. 2021), threshold searched on a held-out split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ensemblekit.components.halting.learned import Learned
from ensemblekit.core.interfaces import Aggregator

TAU_C = 0.01
"""IRENE's cost exponent of Eq. 14 (App. C: "We set tau_c = 0.01")."""

LR_MILESTONES = (0.3, 0.6, 0.8)
"""Where the learning rate is divided by 5: IRENE trains 200 epochs with steps at 60, 120, 160 (App. A.1.2)."""
LR_DECAY = 0.2


def utility(accuracy: float, cost: float, single_accuracy: float, ensemble_accuracy: float,
            members: int = 3) -> float:
    """Utility of a method relative to the single model, as in IRENE's Tables 1-2.

    Eq. 14 with ``v = c = 1``: ``U = V^tau_v / C^tau_c``. ``tau_c = 0.01``;
    ``tau_v`` makes the single model (cost 1) and the average ensemble of
    ``T`` members (cost ``T``) equally useful (App. C):
    ``tau_v = tau_c ln T / ln(V_T / V_1)``. The tables report
    ``exp((ln U - ln U_single) / tau_c) = (V / V_1)^(tau_v / tau_c) / C``;
    this reading reproduces 18 of the tables' 21 utilities within 0.02 from
    their accuracies and costs (all but three cost-3 baselines of CIFAR-100
    ResNet-32). ``tau_c`` cancels out.

    Args:
        accuracy: the method's top-1 accuracy ``V`` (any unit, same for all).
        cost: its average cost ``C`` (members used).
        single_accuracy: ``V_1`` of the single model.
        ensemble_accuracy: ``V_T`` of the average ensemble of ``members``.
        members: ``T``.
    """
    if not ensemble_accuracy > single_accuracy > 0:
        raise ValueError(
            f"utility needs an average ensemble more accurate than the single model "
            f"(got {ensemble_accuracy} vs {single_accuracy}): tau_v is undefined otherwise")
    tau_v = TAU_C * math.log(members) / math.log(ensemble_accuracy / single_accuracy)
    log_u = tau_v * math.log(accuracy) - TAU_C * math.log(cost) if accuracy > 0 else -math.inf
    log_u_single = tau_v * math.log(single_accuracy)
    return math.exp((log_u - log_u_single) / TAU_C)


# --------------------------------------------------------------------- WoC
@dataclass
class WoC:
    """Wisdom of Committees: exit after member ``k`` once the average ensemble is confident.

    After member ``k`` (``k < T``) a sample stops if the maximum softmax
    probability of the aggregated prediction of members ``1..k`` is at least
    ``threshold``; the others go on, and member ``T`` takes the rest.

    Attributes:
        threshold: the confidence threshold.
    """

    threshold: float

    GRID = tuple(i / 100 for i in range(101))
    """IRENE App. A.2: "start at 0.0 and end at 1.0 with an interval of 0.01"."""

    def members_used(self, members: Tensor, aggregator: Aggregator) -> Tensor:
        """Members evaluated per sample ``[N]`` (1-based) for member logits ``[N, T, C]``."""
        confidence = aggregator.prefixes(members).softmax(-1).amax(-1)
        return _exits(confidence, torch.tensor([self.threshold]))[0] + 1

    def predict(self, members: Tensor, aggregator: Aggregator) -> tuple[Tensor, Tensor]:
        """``(prediction [N, C] at each sample's exit, members used [N])``."""
        used = self.members_used(members, aggregator)
        prefixes = aggregator.prefixes(members)
        return prefixes[torch.arange(len(used)), used - 1], used

    @classmethod
    def fit(cls, members: Tensor, labels: Tensor, aggregator: Aggregator) -> WoC:
        """Search the threshold on held-out member logits ``[N, T, C]`` and labels ``[N]``.

        Every threshold of :attr:`GRID` is tried; the one of highest held-out
        :func:`utility` wins (the lowest on ties, i.e. the cheapest), the
        metric the methods are compared by. If the held-out average ensemble
        is no more accurate than its first member, extra members cannot pay
        for themselves and the threshold is 0 (stop after one member).
        """
        prefixes = aggregator.prefixes(members)
        correct = (prefixes.argmax(-1) == labels[:, None]).float()
        single, full = correct[:, 0].mean().item(), correct[:, -1].mean().item()
        if not full > single:
            return cls(0.0)
        grid = torch.tensor(cls.GRID)
        exits = _exits(prefixes.softmax(-1).amax(-1), grid)
        accuracy = correct.gather(1, exits.T).mean(0)
        cost = (exits + 1).float().mean(1)
        scores = [utility(a, c, single, full, members.shape[1]) for a, c in zip(accuracy.tolist(), cost.tolist())]
        return cls(float(grid[max(range(len(scores)), key=lambda i: (scores[i], -i))]))


def _exits(confidence: Tensor, thresholds: Tensor) -> Tensor:
    """0-based exit step ``[G, N]`` for each threshold, from confidences ``[N, T]``."""
    n, t = confidence.shape
    confident = confidence[None, :, :-1] >= thresholds.to(confidence)[:, None, None]
    last = torch.ones(len(thresholds), n, 1, dtype=torch.bool, device=confidence.device)
    return torch.cat([confident, last], dim=-1).long().argmax(-1)


# --------------------------------------------------------------- training
def stage_modules(ensemble, step: int) -> list[nn.Module]:
    """Modules trained at step ``step`` (1-based) of Algorithm 1.

    The nodes member ``step`` adds to the earlier members (its whole path in
    a cascade, its own branch in a tree or multi-branch ensemble), its head,
    its auxiliary head and the selector; everything else is frozen.
    """
    member = step - 1
    modules = [ensemble.nodes[i] for i in ensemble.graph.new_nodes(member)] + [ensemble.heads[member]]
    policy = ensemble.halting
    if isinstance(policy, Learned):
        if policy.aux_head:
            modules.append(policy.aux_heads[member])
        modules += [policy.cell, policy.out]
    return modules


@contextmanager
def frozen_except(ensemble, modules: list[nn.Module]) -> Iterator[None]:
    """Freeze every parameter of ``ensemble`` but those of ``modules``.

    Frozen modules are also put in eval mode (batch-norm statistics stay as
    they are); flags and modes are restored on exit.
    """
    trainable = {id(p) for m in modules for p in m.parameters()}
    flags = {p: p.requires_grad for p in ensemble.parameters()}
    modes = {m: m.training for m in ensemble.modules()}
    try:
        ensemble.train()
        for m in ensemble.modules():
            params = list(m.parameters())
            if params and not any(id(p) in trainable for p in params):
                m.eval()
        for p in ensemble.parameters():
            p.requires_grad_(id(p) in trainable)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode


def _optimizers(ensemble, epochs: int, lr: float, momentum: float, weight_decay: float,
                selector_lr: float) -> list[tuple[torch.optim.Optimizer, Any]]:
    """SGD (Nesterov) for the models, Adam for the selector, each with IRENE's step decay."""
    policy = ensemble.halting
    selector = {id(p) for p in policy.selector_parameters()} if isinstance(policy, Learned) else set()
    params = [p for p in ensemble.parameters() if p.requires_grad]
    base = [p for p in params if id(p) not in selector]
    chosen = [p for p in params if id(p) in selector]
    optimizers = []
    if base:
        optimizers.append(torch.optim.SGD(base, lr=lr, momentum=momentum, nesterov=momentum > 0,
                                          weight_decay=weight_decay))
    if chosen:
        optimizers.append(torch.optim.Adam(chosen, lr=selector_lr))
    milestones = sorted({max(1, round(f * epochs)) for f in LR_MILESTONES if round(f * epochs) < epochs})
    return [(opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, LR_DECAY)) for opt in optimizers]


def fit(ensemble, loader: Iterable, epochs: int, *, lr: float = 0.1, momentum: float = 0.9,
        weight_decay: float = 5e-4, selector_lr: float = 1e-3, device: torch.device | str = "cpu",
        log: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train ``ensemble`` with its loss; IRENE's sequential schedule when its loss asks for it.

    With a loss whose ``schedule`` is "sequential" (:class:`~ensemblekit.components.losses.IreneLoss`),
    step ``t = 1..T`` trains :func:`stage_modules` for ``epochs`` epochs on
    the first ``t`` members, the rest frozen (Algorithm 1); the optimisers
    and schedules are re-created at every step (App. A.1.1). Otherwise all
    members train together for ``epochs`` epochs. Models use SGD with
    Nesterov momentum and weight decay, the selector Adam (App. A.1); the
    learning rates are divided by 5 at 30%, 60% and 80% of the epochs.

    Args:
        ensemble: the ensemble, with a loss.
        loader: yields ``(images, labels, ...)`` batches.
        epochs: epochs per step (sequential) or in all (joint).
        lr: SGD learning rate of the models.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        selector_lr: Adam learning rate of the selector.
        device: where to train.
        log: called with every epoch's record.

    Returns:
        One record per epoch: ``step`` (members trained), ``epoch`` and the
        mean of every loss part.
    """
    if ensemble.loss_strategy is None:
        raise ValueError("fit() needs an ensemble with a loss; pass loss=... to wrap()")
    ensemble.to(device)
    ensemble.cost_table()  # measured (and cached) before any member is frozen
    sequential = getattr(ensemble.loss_strategy, "schedule", "joint") == "sequential"
    steps = range(1, ensemble.num_members + 1) if sequential else [ensemble.num_members]
    history = []
    for t in steps:
        modules = stage_modules(ensemble, t) if sequential else [ensemble]
        with frozen_except(ensemble, modules):
            optimizers = _optimizers(ensemble, epochs, lr, momentum, weight_decay, selector_lr)
            for epoch in range(epochs):
                record = _epoch(ensemble, loader, list(range(t)), optimizers, device)
                record = {"step": t, "epoch": epoch + 1, **record}
                history.append(record)
                if log is not None:
                    log(record)
    ensemble.eval()
    return history


def _epoch(ensemble, loader: Iterable, members: list[int], optimizers, device) -> dict[str, float]:
    sums: dict[str, float] = {}
    batches = 0
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        result = ensemble.loss(ensemble.forward_output(x, members=members), y)
        for opt, _ in optimizers:
            opt.zero_grad(set_to_none=True)
        result.total.backward()
        for opt, _ in optimizers:
            opt.step()
        for name, value in {"loss": result.total.detach(), **result.parts}.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        batches += 1
    for _, scheduler in optimizers:
        scheduler.step()
    return {name: value / max(batches, 1) for name, value in sums.items()}
