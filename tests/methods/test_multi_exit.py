"""Multi-exit chains: gradient equilibrium, ISC, One-for-all KD, the recipe and phase II."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ensemblekit as ek
from ensemblekit.components.aggregators import LastExit
from ensemblekit.components.losses.multi_exit import MultiExitLoss
from ensemblekit.core.cache import NodeCache
from ensemblekit.core.interfaces import EnsembleOutput
from ensemblekit.methods.imta.gradient_equilibrium import (
    apply_gradient_equilibrium,
    equilibrium_scales,
    rescale_gradient,
)
from ensemblekit.methods.imta.isc import ISCExit
from ensemblekit.methods.imta.recipe import multi_exit, start_phase2
from tests.conftest import toy_split

N_EXITS = 4


def chain(ge: bool, **options):
    torch.manual_seed(0)
    return multi_exit(toy_split(N_EXITS), gradient_equilibrium=ge, **options)


def exit_state_grads(ens, x, weights, j):
    """Gradient of ``<weights, z_j>`` w.r.t. every block output (raw node states)."""
    cache = NodeCache(x)
    ens.compute_nodes(cache, range(ens.graph.num_nodes))
    states = [cache.states[i] for i in range(ens.graph.num_nodes)]
    loss = (ens.member_logits(cache, j) * weights).sum()
    return torch.autograd.grad(loss, states[: j + 1])


def test_rescale_gradient_is_identity_forward_scaled_backward():
    x = torch.randn(3, 4, requires_grad=True)
    y = rescale_gradient(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.25))


def test_gradient_equilibrium_scales():
    plain, ge = chain(False), chain(True)
    ge.load_state_dict(plain.state_dict())  # hooks change no parameter or key
    x = torch.randn(4, 3, 8, 8)
    weights = torch.randn(4, 5)
    n = N_EXITS
    for j in range(n):
        g_plain = exit_state_grads(plain, x, weights, j)
        g_ge = exit_state_grads(ge, x, weights, j)
        for i in range(j + 1):  # every exit j >= i reaches block i scaled by 1/(n-i): the mean (Eq. 5)
            torch.testing.assert_close(g_ge[i], g_plain[i] / (n - i), rtol=1e-5, atol=1e-7)
    # The two factors one by one: 1/(n-i) into exit i's head, (n-i-1)/(n-i) into block i+1.
    assert equilibrium_scales(n) == [(1 / (n - i), (n - i - 1) / (n - i)) for i in range(n)]
    j = n - 1
    cache = NodeCache(x)
    ge.compute_nodes(cache, range(n))
    states = [cache.states[i] for i in range(n)]
    for i in range(n - 1):
        (g_i, g_next) = torch.autograd.grad((ge.member_logits(cache, j) * weights).sum(), [states[i], states[i + 1]],
                                            retain_graph=True)
        block = ge.nodes[i + 1]
        through_block = torch.autograd.grad(block.forward(states[i]), states[i], grad_outputs=g_next)[0]
        torch.testing.assert_close(g_i, through_block * (n - i - 1) / (n - i), rtol=1e-5, atol=1e-7)
        head_only = torch.autograd.grad((ge.heads[i](states[i]) * weights).sum(), states[i])[0]
        head_plain = torch.autograd.grad((ge.heads[i].forward(states[i]) * weights).sum(), states[i])[0]
        torch.testing.assert_close(head_only, head_plain / (n - i), rtol=1e-5, atol=1e-7)


def test_gradient_equilibrium_keeps_outputs_and_needs_a_chain():
    plain, ge = chain(False), chain(True)
    ge.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(plain.eval().forward_members(x), ge.eval().forward_members(x))
    with pytest.raises(ValueError, match="already"):
        apply_gradient_equilibrium(ge)
    with pytest.raises(ValueError, match="chain"):
        apply_gradient_equilibrium(ek.wrap(toy_split(3), "tree", depth=2))


def test_recipe_members_are_exits_in_depth_order():
    ens = multi_exit(toy_split(4), exits=[1, 3], gradient_equilibrium=False).eval()
    assert ens.num_members == 2
    assert [ens.graph.nodes[m.exit_node].block for m in ens.graph.members] == [1, 3]
    x = torch.randn(2, 3, 8, 8)
    members = ens.forward_members(x)
    assert isinstance(ens.aggregator, LastExit)
    assert torch.equal(ens(x), members[:, -1])
    assert torch.equal(ens.forward_output(x).prefixes(), members)


@pytest.mark.parametrize("mode", ["concat", "add"])
def test_isc_wiring(mode):
    ens = chain(False, isc=mode).eval()
    x = torch.randn(3, 3, 8, 8)
    members = ens.forward_members(x)
    assert not isinstance(ens.heads[0], ISCExit) and all(isinstance(h, ISCExit) for h in ens.heads[1:])
    cache = NodeCache(x)
    ens.compute_nodes(cache, range(N_EXITS))
    for k in range(1, N_EXITS):
        isc = ens.heads[k]
        own = isc.head(cache.states[k])
        previous = members[:, k - 1]
        expected = own + previous if mode == "add" else own + isc.transfer(isc.project(previous))
        torch.testing.assert_close(members[:, k], expected)
    # Anytime and halting pass the same previous logits as the batched forward.
    for step in ens.anytime(x):
        torch.testing.assert_close(step.prediction, members[:, step.members - 1])


def test_isc_concat_is_a_classifier_on_concatenated_features():
    ens = chain(False, isc="concat").eval()
    x = torch.randn(3, 3, 8, 8)
    members = ens.forward_members(x)
    isc = ens.heads[1]
    feature_exit = isc.head  # FeatureExit(ExitHead): pool + linear
    cache = NodeCache(x)
    ens.compute_nodes(cache, range(2))
    f = feature_exit.head.forward_features(cache.states[1])
    p = isc.project(members[:, 0])
    w = torch.cat([feature_exit.head.fc.weight, isc.transfer.weight], dim=1)
    torch.testing.assert_close(members[:, 1], torch.cat([f, p], 1) @ w.T + feature_exit.head.fc.bias)
    assert isc.project[0].out_features == feature_exit.head.fc.in_features  # the authors' width


@pytest.mark.parametrize("detach", [True, False])
def test_isc_stop_gradient_switch(detach):
    ens = chain(False, isc="add", isc_detach=detach)
    out = ens.forward_output(torch.randn(4, 3, 8, 8))
    out.members[:, 2].sum().backward()
    reached = any(p.grad is not None and p.grad.abs().sum() > 0 for p in ens.heads[1].parameters())
    assert reached is not detach  # exit 2's loss reaches exit 1's head only through ISC


def test_isc_predict_with_compaction_matches_full_evaluation():
    ens = chain(True, isc="concat").eval()
    x = torch.randn(8, 3, 8, 8)
    prefixes = ens.forward_output(x).prefixes()

    class StopOnSample(ek.halting.Fixed):
        def step(self, step, state):
            idx = state["idx"] if state else torch.arange(step.prediction.shape[0])
            return idx % N_EXITS <= step.index, {"idx": idx}

    result = ens.predict(x, halting=StopOnSample())
    used = torch.arange(8) % N_EXITS + 1
    assert torch.equal(result.members_used, used)
    torch.testing.assert_close(result.prediction, prefixes[torch.arange(8), used - 1])


def reference_ofa(members, target, alpha, t, weights):
    """Eq. 7-8 written out; ``alpha`` weighs the distillation term, as in the HNE losses."""
    n = members.shape[1]
    teacher = F.softmax(members[:, -1] / t, dim=-1)
    total = weights[-1] * F.cross_entropy(members[:, -1], target)
    for k in range(n - 1):
        log_s = F.log_softmax(members[:, k] / t, dim=-1)
        kl = (teacher * (teacher.log() - log_s)).sum(-1).mean()  # KL(p_last || p_k), Eq. 8
        total = total + weights[k] * ((1 - alpha) * F.cross_entropy(members[:, k], target) + alpha * t * t * kl)
    return total


def test_ofa_matches_the_formula_and_spares_the_teacher():
    torch.manual_seed(0)
    members = torch.randn(6, 3, 5, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    weights = [0.5, 1.0, 2.0]
    loss = MultiExitLoss(weights=weights, ofa=True, alpha=0.3, temperature=2.5)
    out = loss(EnsembleOutput(members, LastExit(), (1, 2, 3)), target)
    torch.testing.assert_close(out.total, reference_ofa(members, target, 0.3, 2.5, weights))
    out.total.backward()
    # The last exit is the teacher under a stop-gradient: only its own CE reaches it.
    last = members.detach()[:, -1].requires_grad_()
    (2.0 * F.cross_entropy(last, target)).backward()
    torch.testing.assert_close(members.grad[:, -1], last.grad)
    plain = MultiExitLoss()(EnsembleOutput(members, LastExit(), (1, 2, 3)), target)
    torch.testing.assert_close(plain.total, sum(F.cross_entropy(members[:, k], target) for k in range(3)))


def test_loss_is_registered_and_checks_weights():
    ens = ek.wrap(toy_split(3), "chain", loss={"name": "multi_exit", "ofa": True})
    assert isinstance(ens.loss_strategy, MultiExitLoss) and ens.loss_strategy.ofa
    ens.loss_strategy = MultiExitLoss(weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="2 weights"):
        ens.loss(ens.forward_output(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1]))


def test_phase2_freezes_blocks_and_their_batchnorm():
    ens = chain(True, isc="concat", ofa=True)
    ens.train()
    ens.forward_output(torch.randn(8, 3, 8, 8))  # phase I leaves non-trivial BN statistics
    trainable = start_phase2(ens)
    assert {id(p) for p in trainable} == {id(p) for p in ens.heads.parameters()}
    frozen = copy.deepcopy(ens.nodes.state_dict())
    heads_before = copy.deepcopy(ens.heads.state_dict())
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    ens.train()  # phase II calls train() every epoch: the blocks' BN must stay in eval
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    ens.loss(ens.forward_output(x), y).total.backward()
    optimizer.step()
    assert all(p.grad is None for p in ens.nodes.parameters())
    for key, value in ens.nodes.state_dict().items():  # weights and running statistics
        assert torch.equal(value, frozen[key]), key
    assert any(not torch.equal(v, heads_before[k]) for k, v in ens.heads.state_dict().items())
    start_phase2(ens)  # idempotent


def test_two_phase_schedule_equals_the_manual_phases():
    """IMTA's two phases (Sec. 3) as the trainer's stages equal the manual sequence they replace: train phase I,
    add ISC, switch to the OFA loss, start_phase2, train again."""
    from dataclasses import replace

    from torch.utils.data import TensorDataset

    from ensemblekit.methods.imta.isc import add_isc
    from ensemblekit.training.config import TrainConfig
    from ensemblekit.training.trainer import train

    torch.manual_seed(1)  # one item repeated: every shuffle gives the same batches, so the epochs' orders cannot differ
    data = TensorDataset(torch.randn(1, 3, 8, 8).repeat(8, 1, 1, 1), torch.tensor([2] * 8))
    config = TrainConfig(epochs=2, batch_size=4, lr=0.1, nesterov=True, progress="none", device="cpu")

    manual = chain(True)
    train(manual, data, config)
    add_isc(manual, mode="concat")
    manual.loss_strategy = MultiExitLoss(ofa=True, alpha=0.3, temperature=2.0)
    start_phase2(manual)
    train(manual, data, replace(config, epochs=1))

    staged = chain(True)
    stages = {"name": "two_phase", "phase2_epochs": 1, "isc": "concat", "ofa": True, "alpha": 0.3, "temperature": 2.0}
    history = train(staged, data, replace(config, stages=stages)).history
    assert [h["stage"] for h in history] == ["phase I", "phase I", "phase II"]
    assert all(isinstance(h, ISCExit) for h in staged.heads[1:])
    assert staged.loss_strategy.ofa and staged.loss_strategy.alpha == 0.3
    assert not any(p.requires_grad for p in staged.nodes.parameters())  # phase II's freezing stays, as start_phase2's
    expected = manual.state_dict()
    assert list(staged.state_dict()) == list(expected)
    for key, value in staged.state_dict().items():
        assert torch.equal(value, expected[key]), key
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(staged.eval().forward_members(x), manual.eval().forward_members(x))


def test_two_phase_schedule_refuses_a_second_isc():
    from ensemblekit.methods.imta.schedule import two_phase
    from ensemblekit.training.config import TrainConfig

    with pytest.raises(ValueError, match="already has ISC heads"):
        two_phase(chain(False, isc="concat"), TrainConfig(epochs=1), isc="concat")
    phase1, phase2 = two_phase(chain(False, isc="concat"), TrainConfig(epochs=3))
    assert (phase1.epochs, phase2.epochs, phase2.loss) == (3, 3, None)  # no OFA option: the loss stays
