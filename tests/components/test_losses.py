"""Every loss against a direct computation of its formula: values, gradients, stop-gradient."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ensemblekit as ek
from ensemblekit.components.aggregators import MeanLogits, MeanProbs
from ensemblekit.components.losses import BUILTIN_LOSSES
from ensemblekit.core.interfaces import EnsembleOutput
from ensemblekit.core.registry import LOSSES
from tests.conftest import toy_split

TREE_SIZES = (1, 2, 4, 8)  # a binary tree of depth 3


# ----------------------------------------------------------- reference formulas
def ce(logits, y):
    """Batch mean of -log softmax(logits)[y], written out."""
    log_p = logits - logits.exp().sum(-1, keepdim=True).log()
    return -log_p[torch.arange(len(y)), y].mean()


def kd(student, teacher, t):
    """T^2 * batch mean of KL(softmax(teacher/T) || softmax(student/T)), written out."""
    p_t = torch.softmax(teacher / t, -1)
    p_s = torch.softmax(student / t, -1)
    return t**2 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()


def mean_logits(z, k):
    return z[:, :k].mean(1)


def reference(name, z, y, sizes, opts):
    """The issue's table, with the teacher built from a detached copy of the members."""
    n = z.shape[1]
    zd = z.detach()
    l_i = sum(ce(z[:, i], y) for i in range(n))
    l_s = sum(ce(mean_logits(z, s), y) for s in sizes)
    alpha, t = opts.get("alpha", 0.5), opts.get("temperature", 2.0)
    if name == "independent":
        return l_i
    if name == "nested":
        return l_s
    if name == "independent+nested":
        return l_i + l_s
    if name == "codistillation":
        return (1 - alpha) * l_i + alpha * sum(kd(z[:, i], mean_logits(zd, n), t) for i in range(n))
    if name == "hierarchical_distillation":
        return (1 - alpha) * l_i + alpha * sum(kd(mean_logits(z, s), mean_logits(zd, n), t) for s in sizes if s < n)
    if name == "ensemblenet_ensembling":
        lam = opts.get("lam", -1.5)
        return sum((1 - lam) * ce(z[:, i], y) for i in range(n)) + n * lam * ce(mean_logits(z, n), y)
    if name == "ensemblenet_codistillation":
        mu = opts.get("mu", 3.0)
        return mu * sum(kd(z[:, i], mean_logits(zd, n), 1.0) for i in range(n)) + n * ce(mean_logits(z, n), y)
    raise AssertionError(name)


CASES = [
    ("independent", {}),
    ("nested", {}),
    ("independent+nested", {}),
    ("codistillation", {}),
    ("codistillation", {"alpha": 0.3, "temperature": 4.0}),
    ("hierarchical_distillation", {}),
    ("hierarchical_distillation", {"alpha": 1.0, "temperature": 1.0}),
    ("ensemblenet_ensembling", {}),
    ("ensemblenet_ensembling", {"lam": 0.5}),
    ("ensemblenet_codistillation", {}),
    ("ensemblenet_codistillation", {"mu": 0.7}),
]


ISSUE_LOSSES = sorted({name for name, _ in CASES})


def test_every_issue_loss_is_registered():
    assert set(ISSUE_LOSSES) <= set(BUILTIN_LOSSES)
    assert set(ISSUE_LOSSES) <= set(LOSSES.names())


@pytest.mark.parametrize(("name", "opts"), CASES)
def test_value_and_gradient_match_the_formula(name, opts):
    torch.manual_seed(0)
    z = (3 * torch.randn(6, 8, 5, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 5, (6,))
    loss = LOSSES.create({"name": name, **opts})
    result = loss(EnsembleOutput(z, MeanLogits(), TREE_SIZES), y)
    expected = reference(name, z, y, TREE_SIZES, opts)
    assert torch.allclose(result.total, expected, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(result.total, z)
    (grad_ref,) = torch.autograd.grad(expected, z)
    assert torch.allclose(grad, grad_ref, rtol=1e-9, atol=1e-12)
    assert result.parts and all(not p.requires_grad for p in result.parts.values())


@given(st.integers(1, 5), st.sampled_from([1.0, 2.0, 3.5]), st.integers(0, 10_000))
def test_no_gradient_flows_through_the_teacher(n, t, seed):
    """With alpha = 1 only KD terms remain; their gradient is the closed form T (p_s - p_t) / B."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, n, 3, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, 3, (4,), generator=g)
    out = EnsembleOutput(z, MeanLogits(), tuple(range(1, n + 1)))
    total = ek.losses.CoDistillation(alpha=1.0, temperature=t)(out, y).total
    (grad,) = torch.autograd.grad(total, z)
    teacher = torch.softmax(z.detach().mean(1, keepdim=True) / t, -1)
    expected = t * (torch.softmax(z.detach() / t, -1) - teacher) / 4
    assert torch.allclose(grad, expected, atol=1e-12)


def test_hierarchical_distillation_leaves_the_full_ensemble_to_the_labels():
    """The largest ensemble is only the teacher: a change of the teacher alone changes no gradient."""
    torch.manual_seed(1)
    z = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (5,))
    loss = ek.losses.HierarchicalDistillation(alpha=1.0)
    total = loss(EnsembleOutput(z, MeanLogits(), (1, 2, 4)), y).total
    (grad,) = torch.autograd.grad(total, z)
    # Only members 0 and 1 are students (sizes 1 and 2); members 2, 3 feed the teacher only.
    assert grad[:, 2:].abs().max() == 0
    assert grad[:, :2].abs().max() > 0


def test_ensemblenet_codistillation_teaches_members_only_through_the_ensemble_term():
    torch.manual_seed(2)
    z = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    out = EnsembleOutput(z, MeanLogits(), (1, 2))
    with_mu = torch.autograd.grad(ek.losses.EnsembleNetCoDistillation(mu=0.0)(out, y).total, z)[0]
    expected = torch.autograd.grad(2 * ce(z.mean(1), y), z)[0]
    assert torch.allclose(with_mu, expected, atol=1e-12)


def test_nested_losses_use_the_configured_aggregator():
    torch.manual_seed(3)
    z = torch.randn(6, 4, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    out = EnsembleOutput(z, MeanProbs(), (1, 2, 4))
    got = ek.losses.NestedCE()(out, y).total
    expected = sum(-z[:, :s].softmax(-1).mean(1).log()[torch.arange(6), y].mean() for s in (1, 2, 4))
    assert torch.allclose(got, expected, atol=1e-10)


def test_ensemblenet_ensembling_is_independent_of_lambda_for_identical_members():
    """Eq. 2's rationale: equal branches make the loss the same for every lambda."""
    z = torch.randn(3, 1, 4).expand(3, 3, 4)
    y = torch.tensor([0, 1, 2])
    out = EnsembleOutput(z, MeanLogits(), (1, 3))
    values = [ek.losses.EnsembleNetEnsembling(lam)(out, y).total for lam in (-1.5, 0.0, 1.0)]
    assert all(math.isclose(v.item(), values[0].item(), rel_tol=1e-6) for v in values)


def test_parts_recombine_into_the_total():
    torch.manual_seed(4)
    z = torch.randn(6, 4, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    out = EnsembleOutput(z, MeanLogits(), (1, 2, 4))
    r = ek.losses.HierarchicalDistillation(alpha=0.25)(out, y)
    assert torch.allclose(r.total, 0.75 * r.parts["independent"] + 0.25 * r.parts["hierarchical_distillation"])
    r = ek.losses.IndependentNestedCE()(out, y)
    assert torch.allclose(r.total, r.parts["independent"] + r.parts["nested"])
    assert torch.allclose(r.parts["nested"], r.parts["nested_1"] + r.parts["nested_2"] + r.parts["nested_4"])


def test_single_member_hierarchical_distillation_is_scaled_independent():
    z = torch.randn(4, 1, 3)
    y = torch.tensor([0, 1, 2, 0])
    r = ek.losses.HierarchicalDistillation()(EnsembleOutput(z, MeanLogits(), (1,)), y)
    assert torch.allclose(r.total, 0.5 * ce(z[:, 0], y))


@pytest.mark.parametrize(("name", "bad"), [("codistillation", {"alpha": 1.5}),
                                            ("hierarchical_distillation", {"temperature": 0}),
                                            ("ensemblenet_codistillation", {"mu": -1})])
def test_bad_options_are_rejected(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LOSSES.create({"name": name, **bad})


@pytest.mark.parametrize("name", ISSUE_LOSSES)
def test_every_loss_trains_a_wrapped_ensemble(name):
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(3), "tree", depth=2, loss=name)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    result = ens.loss(ens.forward_output(x), y)
    result.total.backward()
    assert torch.isfinite(result.total)
    assert all(p.grad is not None for p in ens.parameters())


# ------------------------------------------------------------ renamed keywords
@pytest.mark.parametrize("cls", [ek.losses.CoDistillation, ek.losses.HierarchicalDistillation])
def test_T_is_a_deprecated_name_of_temperature(cls):
    with pytest.warns(DeprecationWarning, match=r"\(T=\.\.\.\) is deprecated; pass temperature"):
        loss = cls(alpha=0.3, T=4.0)
    assert loss.temperature == 4.0 and loss.alpha == 0.3
    with pytest.warns(DeprecationWarning, match="use .temperature"):
        assert loss.T == 4.0
    with pytest.warns(DeprecationWarning):
        by_name = LOSSES.create({"name": "hierarchical_distillation", "T": 3.0})  # configs written before
    assert by_name.temperature == 3.0
    with pytest.raises(ValueError, match="temperature must be > 0"), pytest.warns(DeprecationWarning):
        cls(T=0.0)
    torch.manual_seed(5)
    out, y = EnsembleOutput(torch.randn(4, 4, 3), MeanLogits(), (1, 2, 4)), torch.tensor([0, 1, 2, 0])
    with pytest.warns(DeprecationWarning):
        old = cls(0.3, T=4.0)(out, y).total
    assert torch.equal(old, cls(0.3, 4.0)(out, y).total)


def test_alpha_is_the_distillation_weight_in_every_loss():
    """MultiExitLoss's alpha weighs the KD term, as in the HNE losses; ce_weight keeps the old meaning."""
    from ensemblekit.components.losses import MultiExitLoss
    from ensemblekit.functional import kd_loss

    torch.manual_seed(6)
    z, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
    out = EnsembleOutput(z, MeanLogits(), (1, 2, 3))
    total = MultiExitLoss(ofa=True, alpha=0.3, temperature=2.0)(out, y).total
    expected = sum(0.7 * ce(z[:, k], y) + 0.3 * kd_loss(z[:, k], z[:, -1], 2.0) for k in range(2)) + ce(z[:, 2], y)
    assert torch.allclose(total, expected)
    assert MultiExitLoss().alpha == 0.1  # gamma = 0.1 of IMTA's released run script (was ce weight 0.9)
    with pytest.warns(DeprecationWarning, match="ce_weight"):
        old = MultiExitLoss(ofa=True, ce_weight=0.7, temperature=2.0)
    assert old.alpha == pytest.approx(0.3)
    assert torch.allclose(old(out, y).total, total)
    with pytest.raises(ValueError, match="ce_weight must be in"):
        MultiExitLoss(ce_weight=1.5)
    hne = ek.losses.CoDistillation(alpha=0.3)
    r = hne(EnsembleOutput(z, MeanLogits(), (1, 2, 3)), y)
    assert torch.allclose(r.total, 0.7 * r.parts["independent"] + 0.3 * r.parts["distillation"])


@pytest.mark.parametrize("name", sorted(e.name for e in LOSSES.entries()))
def test_losses_through_the_aggregate_refuse_a_vote(name):
    """A vote passes no gradient: a loss that trains through the aggregate refuses it at wrap() time,
    every other loss accepts it and still back-propagates into the members."""
    loss = LOSSES.create(name)
    if loss.requires:
        pytest.skip(f"{name} needs {sorted(loss.requires)}")
    if loss.trains_through_aggregate:
        with pytest.raises(ValueError, match="passes no gradient"):
            ek.wrap(toy_split(3), "tree", depth=2, aggregator="vote", loss=name)
        return
    ens = ek.wrap(toy_split(3), "tree", depth=2, aggregator="vote", loss=name)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    result = ens.loss(ens.forward_output(x), y % ens.num_classes)
    assert result.total.requires_grad
