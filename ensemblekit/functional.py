"""Pure functions on tensors: the math that losses, halting policies and methods share.

Nothing here holds state or imports another ensemblekit layer; every function
is the one implementation of its formula (losses and halting policies import
them from here). Notation: ``z`` logits, ``y`` labels, ``T`` a softmax
temperature, ``h_t`` IRENE's conditional halting probability.

References: HNE (Ruiz & Verbeek, "Anytime inference with distilled
hierarchical neural ensembles", AAAI 2021), IMTA (Li et al., "Improved
techniques for training adaptive deep networks", ICCV 2019), MSDNet (Huang
et al., ICLR 2018), IRENE (Li et al., AAAI 2023), Hinton et al. 2015 (KD).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ensemblekit.errors import InvalidValueError

__all__ = [
    "confidence",
    "exit_distribution",
    "exit_indices",
    "expected_cost",
    "halting_distribution",
    "kd_loss",
    "kl_divergence",
    "member_cross_entropy",
    "survival",
    "survival_weighted_cross_entropy",
]


# ------------------------------------------------------------ entropies and KD
def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` over the last dimension, from log-probabilities.

    ``[..., C], [..., C] -> [...]``. IRENE's uncertainty feature (App. A.1.2,
    ``KL(y_t || softmax(a_t))``) and, through [`kd_loss()`][ensemblekit.functional.kd_loss], every KD term.
    """
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``KD_T(s, t) = T^2 * mean_batch KL(softmax(t / T) || softmax(s / T))`` (Hinton et al. 2015).

    The distillation term of HNE Eq. 5-6 (``L_D``, ``L_HD``), IMTA Eq. 8 (One-for-all
    KD) and EnsembleNet Eq. 3 (``T = 1``). ``teacher`` is used as given: detach it
    first for a stop-gradient. The papers write a cross-entropy against the soft
    targets; it differs by the targets' entropy, a constant under the
    stop-gradient, so the gradients are the same.

    Args:
        student: logits ``[B, C]``.
        teacher: logits ``[B, C]``.
        temperature: ``T > 0``.
    """
    t = temperature
    log_p_teacher = F.log_softmax(teacher / t, dim=-1)
    log_p_student = F.log_softmax(student / t, dim=-1)
    return t * t * kl_divergence(log_p_teacher, log_p_student).mean()


def member_cross_entropy(members: Tensor, target: Tensor) -> Tensor:
    """``[CE(z_n, y) for n]``: one batch-mean cross-entropy per member, ``[B, N, C] -> [N]``.

    The terms of HNE's ``L_I = sum_n CE(z_n, y)`` (AAAI Eq. 3) and of IMTA Eq. 1.
    """
    b, n, c = members.shape
    ce = F.cross_entropy(members.reshape(b * n, c), target.repeat_interleave(n), reduction="none")
    return ce.view(b, n).mean(0)


def survival_weighted_cross_entropy(probs: Tensor, s: Tensor, target: Tensor) -> Tensor:
    """``CE(y, y^ens_t)`` per sample and prefix ``t``, ``y^ens_t = sum_{i<=t} S(i) y_i / sum_{i<=t} S(i)``.

    IRENE Eq. 9-10: the prefix ensemble whose members are weighted by their
    survival ``S(i)`` ([`survival()`][ensemblekit.functional.survival]).

    Args:
        probs: members' softmax outputs ``[B, T, C]``.
        s: survival ``[B, T]``.
        target: labels ``[B]``.

    Returns:
        ``[B, T]``.
    """
    weighted = torch.cumsum(s.unsqueeze(-1) * probs, dim=1) / torch.cumsum(s, dim=1).unsqueeze(-1)
    picked = weighted.gather(-1, target.view(-1, 1, 1).expand(-1, probs.shape[1], 1)).squeeze(-1)
    return -picked.clamp_min(torch.finfo(picked.dtype).tiny).log()


# ------------------------------------------------------------ confidence exits
def confidence(prediction: Tensor) -> Tensor:
    """Max-softmax confidence ``max_c softmax(z)_c`` per sample, ``[..., C] -> [...]`` (float32).

    The exit criterion of MSDNet's budgeted classification (Sec. 4.1), IMTA's
    dynamic evaluation (Sec. 4) and the WoC cascade.
    """
    return prediction.float().softmax(dim=-1).amax(dim=-1)


def exit_indices(conf: Tensor, thresholds: Tensor) -> Tensor:
    """0-based exit of each sample: the first step ``k`` with ``conf[..., k] >= thresholds[..., k]``.

    The last step when no earlier one is confident enough (MSDNet Sec. 4.1:
    "the sample exits at the first classifier whose confidence reaches its
    threshold"; the last classifier takes the rest). ``thresholds``
    broadcasts against ``conf [..., N, K]``: ``[K]`` gives one threshold per
    exit, ``[G, 1, 1]`` one per grid point for every exit (then the result is
    ``[G, N]``).
    """
    stops = conf >= thresholds.to(conf)
    stops[..., -1] = True
    return stops.int().argmax(dim=-1)


def exit_distribution(q: float, num_exits: int) -> Tensor:
    """``pi_k = q^k / sum_j q^j`` for ``k = 1..num_exits`` (float64): MSDNet's budgeted exits (Sec. 4.1).

    Examples:
        >>> [round(p, 4) for p in exit_distribution(0.5, 3).tolist()]
        [0.5714, 0.2857, 0.1429]
    """
    if not q > 0:
        raise InvalidValueError(f"q must be > 0, got {q}")
    log_w = torch.arange(1, num_exits + 1, dtype=torch.float64) * math.log(q)
    return torch.softmax(log_w, dim=0)


# ------------------------------------------------------- halting and cost sums
def survival(h: Tensor) -> Tensor:
    """``S(t) = Pr(z >= t) = prod_{i<t} (1 - h_i)`` (IRENE Eq. 2, 4): ``[B, T] -> [B, T]``, ``S(1) = 1``."""
    ones = torch.ones_like(h[:, :1])
    return torch.cat([ones, torch.cumprod(1 - h[:, :-1], dim=1)], dim=1)


def halting_distribution(h: Tensor) -> Tensor:
    """``p_t = h_t S(t) = h_t prod_{i<t} (1 - h_i)`` (IRENE Eq. 5): ``[B, T] -> [B, T]``."""
    return h * survival(h)


def expected_cost(distribution: Tensor, costs: Tensor | Sequence[float]) -> Tensor:
    """``sum_k p_k c_k`` over the last dimension: the expected cost of stopping at ``k`` with probability ``p_k``.

    IRENE's ``L_cost`` (Eq. 11, ``p`` from [`halting_distribution()`][ensemblekit.functional.halting_distribution]) and
    MSDNet's expected budget ``sum_k f_k C_k`` (Sec. 4.1, ``f_k`` the fraction
    of samples leaving at exit ``k``, ``C_k`` the cumulative FLOPs).
    """
    costs = torch.as_tensor(costs, dtype=distribution.dtype, device=distribution.device)
    return (distribution * costs).sum(-1)
