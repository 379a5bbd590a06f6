"""IRENE's learned halting (Li et al., AAAI 2023): a recurrent selector outputs h_t.

The selector ``g_phi`` reads, after member ``t``, features of that member and
its recurrent state ``d_{t-1}`` (``d_0 = 0``) and outputs the conditional
halting probability ``h_t = Pr(z = t | z > t-1)`` (Eq. 3). From it:

* survival ``S(t) = Pr(z >= t) = prod_{i<t} (1 - h_i)`` (Eq. 2, 4),
* halting distribution ``p_t = h_t S(t)`` (Eq. 5),

both in [`ensemblekit.functional`][ensemblekit.functional] (imported here too).

The last member always halts (``h_T = 1``), so ``p`` sums to 1. Training
samples ``h_t`` with a binary Gumbel-softmax and binarises it with a
straight-through estimator (Eq. 6 and below); inference thresholds ``h_t``
and is deterministic.

The policy trains with any task loss: [`Learned.loss()`][ensemblekit.components.halting.learned.Learned.loss]
holds IRENE's selector terms (Eq. 9-12), which [`Ensemble.loss`][ensemblekit.core.ensemble.Ensemble.loss] adds
to the task loss (IRENE's own loss holds them already). Until it is trained (the trainer marks it, see
[`Learned.mark_trained()`][ensemblekit.components.halting.learned.Learned.mark_trained]), ``predict()`` warns
that it halts at random.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from ensemblekit.components.losses.learned_halting import halting_terms
from ensemblekit.core.blocks import State, call_block
from ensemblekit.core.heads import fresh_copy
from ensemblekit.core.interfaces import EnsembleOutput, HaltingPolicy, HaltingStep, LossResult
from ensemblekit.errors import EnsembleKitError, InvalidValueError
from ensemblekit.functional import halting_distribution, kl_divergence, survival

__all__ = ["CELLS", "Learned", "LearnedHaltingError", "gumbel_halting", "halting_distribution", "survival"]

CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}


def gumbel_halting(logits: Tensor, temperature: float = 1.0, hard: bool = True) -> Tensor:
    """Sample ``h_t ~ Bernoulli(sigmoid(logit))`` with the Gumbel-softmax relaxation.

    For two outcomes the difference of two Gumbel variables is logistic, so
    the relaxed sample is ``sigmoid((logit + log u - log(1-u)) / temperature)``
    (Jang et al. 2016). With ``hard`` the sample is binarised at 0.5 and the
    gradient is that of the relaxed sample (straight-through, the trainable
    binary mask of Mallya et al. 2018 that IRENE uses).
    """
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + u.log() - (-u).log1p()) / temperature)
    if not hard:
        return soft
    return (soft > 0.5).to(soft.dtype) + soft - soft.detach()


class LearnedHaltingError(EnsembleKitError, ValueError):
    """The learned policy cannot compute its loss from what it was given."""


def _detach(state: State) -> State:
    if isinstance(state, Tensor):
        return state.detach()
    return tuple(v.detach() if isinstance(v, Tensor) else v for v in state)


class Learned(HaltingPolicy):
    """IRENE's selector: a recurrent cell over per-member features -> ``h_t``.

    Features of member ``t`` (detached, so only the losses that name the
    selector train it): its softmax ``y_t`` sorted in decreasing order (IRENE
    feeds "the t-th model outcomes"; sorted, the input says how confident the
    member is whatever the class, which a recurrent cell cannot compute from
    raw probabilities with one linear layer) and, with ``aux_head``, the uncertainty
    ``KL(y_t || softmax(a_t))`` between the member's head and a second,
    auxiliary head ``a_t`` on the same features (IRENE App. A.1.2, after Cho
    et al. 2022). The auxiliary head is a re-initialised copy of the member's
    own head (pool + linear for a ResNet: the paper's one-layer classifier);
    it reads detached features, so its losses (see
    [`IreneLoss`][ensemblekit.components.losses.IreneLoss]) train it alone.

    The policy is built when bound to an ensemble (``wrap(..., halting=...)``
    does it): the selector reads ``num_classes`` (+1 with ``aux_head``) features. Its recurrent
    state is batch-first (``[B, hidden]``), so [`Ensemble.predict()`][ensemblekit.core.ensemble.Ensemble.predict] drops
    halted samples from it too.

    Whatever the task loss, [`loss()`][ensemblekit.components.halting.learned.Learned.loss] trains the selector
    with IRENE's terms, weighted by the ``*_weight`` options (with IRENE's own loss, the loss's weights apply
    instead). The buffer ``trained`` records whether it was trained (it goes into ``state_dict()`` and
    checkpoints).

    Args:
        hidden: width of the recurrent state ``d_t`` (the paper gives none; ours).
        cell: "lstm" (IRENE's choice) or "gru".
        threshold: inference halts where ``h_t >= threshold``.
        temperature: Gumbel-softmax temperature in training.
        hard: binarise sampled ``h_t`` with the straight-through estimator in
            training (IRENE); ``False`` keeps the relaxed sample.
        aux_head: add the auxiliary head and its uncertainty feature.
        ens_weight: weight of ``L_ens`` (Eq. 10, omega_1).
        cost_weight: weight of ``L_cost`` (Eq. 11, omega_2), the expected prefix FLOPs.
        rank_weight: weight of ``L_rank`` (Eq. 12, omega_3).
        aux_weight: weight of the auxiliary heads' cross-entropy.
        discrepancy_weight: weight of ``-L1`` between the two heads' outputs.
    """

    provides: frozenset[str] = frozenset(  # without aux_logits for a policy without the auxiliary heads
        {"halting_probabilities", "halting_logits", "aux_logits", "prefix_costs"})
    step_inputs: ClassVar[frozenset[str]] = frozenset({"head_input"})
    trained: Tensor

    def __init__(self, hidden: int = 16, cell: str = "lstm", threshold: float = 0.5, temperature: float = 1.0,
                 hard: bool = True, aux_head: bool = True, ens_weight: float = 0.1, cost_weight: float = 0.01,
                 rank_weight: float = 0.1, aux_weight: float = 1.0, discrepancy_weight: float = 0.1):
        super().__init__()
        if not isinstance(hidden, int) or hidden < 1:
            raise InvalidValueError(f"hidden must be an integer >= 1, got {hidden!r}")
        if cell not in CELLS:
            raise InvalidValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        if not 0 < threshold < 1:
            raise InvalidValueError(f"threshold must be in (0, 1), got {threshold!r}")
        if not temperature > 0:
            raise InvalidValueError(f"temperature must be > 0, got {temperature!r}")
        self.hidden = hidden
        self.cell_type = cell
        self.threshold = threshold
        self.temperature = temperature
        self.hard = hard
        self.aux_head = aux_head
        if not aux_head:
            self.provides = type(self).provides - {"aux_logits"}
        self.cell: nn.Module | None = None
        self.out: nn.Linear | None = None
        self.aux_heads = nn.ModuleList()
        self.weights = {"ens": ens_weight, "cost": cost_weight, "rank": rank_weight, "aux": aux_weight,
                        "discrepancy": discrepancy_weight}
        self.register_buffer("trained", torch.tensor(False))

    # ------------------------------------------------------------------ build
    def build_options(self) -> dict[str, Any]:
        """The constructor options that rebuild this policy (what a checkpoint records; its weights are tensors)."""
        return {"hidden": self.hidden, "cell": self.cell_type, "threshold": self.threshold,
                "temperature": self.temperature, "hard": self.hard, "aux_head": self.aux_head,
                **{f"{name}_weight": value for name, value in self.weights.items()}}

    def bind(self, ensemble) -> None:
        """Build the selector (and auxiliary heads) for ``ensemble``; a no-op once built for it."""
        if self.cell is not None:
            if self.cell.input_size != self._in_features(ensemble.num_classes) or (
                    self.aux_head and len(self.aux_heads) != ensemble.num_members):
                raise InvalidValueError(
                    f"this learned halting policy was built for another ensemble "
                    f"({len(self.aux_heads)} members, selector input {self.cell.input_size}); create a new one")
            return
        for head in ensemble.heads:
            if getattr(head, "takes_previous_logits", False):
                raise InvalidValueError("learned halting cannot copy a head that reads the previous member's logits")
        self.cell = CELLS[self.cell_type](self._in_features(ensemble.num_classes), self.hidden)
        self.out = nn.Linear(self.hidden, 1)
        if self.aux_head:
            self.aux_heads = nn.ModuleList(fresh_copy(head, reinit=True) for head in ensemble.heads)
        reference = next(ensemble.nodes.parameters(), None)
        if reference is not None:
            self.to(reference.device)

    def _in_features(self, num_classes: int) -> int:
        return num_classes + int(self.aux_head)

    def _bound(self) -> tuple[nn.Module, nn.Linear]:
        """The selector's recurrent cell and output layer; refuses a policy not bound to an ensemble yet."""
        if self.cell is None or self.out is None:
            raise InvalidValueError("the learned halting policy is not bound to an ensemble; pass it to "
                                    "wrap(halting=...)")
        return self.cell, self.out

    def selector_parameters(self) -> list[nn.Parameter]:
        """Parameters of the selector ``g_phi`` (not of the auxiliary heads)."""
        cell, out = self._bound()
        return [*cell.parameters(), *out.parameters()]

    # ---------------------------------------------------------------- compute
    def _aux_logits(self, member: int, head_input: State) -> Tensor:
        return cast(Tensor, call_block(self.aux_heads[member], _detach(head_input)))  # a head returns logits

    def _selector(self, logits: Tensor, aux_logits: Tensor | None,
                  state: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        """One selector step: halting logit ``[B]`` and the new recurrent state."""
        cell, out = self._bound()
        log_p = logits.detach().float().log_softmax(dim=-1)
        features = [log_p.exp().sort(dim=-1, descending=True).values]
        if aux_logits is not None:
            log_q = aux_logits.detach().float().log_softmax(dim=-1)
            features.append(kl_divergence(log_p, log_q).unsqueeze(-1))
        x = torch.cat(features, dim=-1).to(out.weight.dtype)  # softmax in float32, the selector in its own dtype
        if self.cell_type == "lstm":
            hc = None if state is None else (state["h"], state["c"])
            h, c = cell(x, hc)
            new_state = {"h": h, "c": c}
        else:
            h = cell(x, None if state is None else state["h"])
            new_state = {"h": h}
        return out(h).squeeze(-1), new_state

    def step(self, step: HaltingStep, state: dict[str, Tensor] | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Deterministic inference: halt where ``h_t = sigmoid(g_phi) >= threshold``."""
        self._bound()
        aux = self._aux_logits(step.index, step.extras["head_input"]) if self.aux_head else None
        logit, state = self._selector(step.member_logits, aux, state)
        return torch.sigmoid(logit) >= self.threshold, state

    def training_extras(self, output: EnsembleOutput, ensemble) -> dict[str, Any]:
        """``h_t`` for every computed member (a prefix ``0..T'-1``), ``h_{T'}`` forced to 1.

        Returns extras ``halting_logits`` ``[B, T']``, ``halting_probabilities``
        (``h``: a straight-through Gumbel sample in training, the thresholded
        decision in eval mode, as [`step()`][ensemblekit.components.halting.learned.Learned.step] takes it),
        ``aux_logits`` ``[B, T', C]`` and ``prefix_costs`` ``[B, T']`` (prefix FLOPs in units of the first
        member's).
        """
        self._bound()
        head_inputs = output.extras["head_inputs"]
        count = output.num_members
        if sorted(head_inputs) != list(range(count)):
            raise LearnedHaltingError("learned halting needs a prefix of members 0..k-1, got members "
                                      f"{sorted(head_inputs)}")
        state, logits, aux_all = None, [], []
        for t in range(count):
            aux = self._aux_logits(t, head_inputs[t]) if self.aux_head else None
            logit, state = self._selector(output.members[:, t], aux, state)
            logits.append(logit)
            if aux is not None:
                aux_all.append(aux)
        halting_logits = torch.stack(logits, dim=1)
        if self.training:
            h = gumbel_halting(halting_logits, self.temperature, self.hard)
        else:
            h = (torch.sigmoid(halting_logits) >= self.threshold).to(halting_logits.dtype)
        h = torch.cat([h[:, :-1], torch.ones_like(h[:, -1:])], dim=1)
        flops = torch.tensor([row.flops for row in ensemble.cost_table()[:count]], dtype=h.dtype, device=h.device)
        extras = {
            "halting_logits": halting_logits,
            "halting_probabilities": h,
            "prefix_costs": (flops / flops[0]).expand_as(h),
        }
        if self.aux_head:
            extras["aux_logits"] = torch.stack(aux_all, dim=1)
        return extras

    # --------------------------------------------------------------- training
    def loss(self, output: EnsembleOutput, target: Tensor) -> LossResult:
        """IRENE's selector terms over every prefix ``t = 1..T'`` of ``output``, weighted (Eq. 9-12).

        ``L_ens`` and ``L_cost`` (expected prefix FLOPs in units of the first
        member's) train the selector, ``L_rank`` the selector and the members,
        the auxiliary heads' cross-entropy and discrepancy those heads; see
        [`halting_terms()`][ensemblekit.components.losses.learned_halting.halting_terms].
        """
        if "halting_probabilities" not in output.extras:
            raise LearnedHaltingError(
                "the learned halting policy trains with the loss and needs the output of ens.forward_output(x) "
                "(its halting probabilities), not a tensor of member logits")
        parts = halting_terms(output, target, list(range(1, output.num_members + 1)), "flops")
        total = torch.stack([self.weights[name] * value for name, value in parts.items()]).sum()
        return LossResult(total, {name: value.detach() for name, value in parts.items()})

    @property
    def is_trained(self) -> bool:
        """Whether [`mark_trained()`][ensemblekit.components.halting.learned.Learned.mark_trained] was called
        (on this policy or on the one whose state it loaded)."""
        return bool(self.trained)

    def mark_trained(self) -> None:
        """Record that the selector was trained; the trainer calls it, your own loop calls it after training."""
        self.trained.fill_(True)
