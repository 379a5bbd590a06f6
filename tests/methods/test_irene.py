"""IRENE: halting probabilities, the straight-through estimator, the loss terms, the schedule, WoC, utility."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import ensemblekit as ek
from ensemblekit.components.aggregators import MeanProbs
from ensemblekit.components.halting.learned import gumbel_halting, halting_distribution, survival
from ensemblekit.components.losses import IreneLoss
from ensemblekit.core.interfaces import EnsembleOutput
from ensemblekit.core.stages import frozen_except
from ensemblekit.methods.irene.schedule import LR_DECAY, sequential, stage_modules
from ensemblekit.methods.irene.woc import WoC, utility
from ensemblekit.training.config import TrainConfig
from ensemblekit.training.trainer import resolve_stages, train
from tests.conftest import toy_split

FIT = TrainConfig(epochs=1, batch_size=16, lr=0.1, progress="none", device="cpu")
"""The settings ``irene.fit`` had by default (SGD lr 0.1, momentum 0.9, weight decay 5e-4)."""


def irene_ensemble(topology: str = "cascade", seed: int = 0, **options):
    torch.manual_seed(seed)
    if topology == "cascade":
        options.setdefault("members", 3)
    return ek.recipes.irene(toy_split(3), topology=topology, **{"members": None, **options})


def selector_params(ens) -> set[int]:
    return {id(p) for p in ens.halting.selector_parameters()}


def with_grad(ens) -> set[int]:
    return {id(p) for p in ens.parameters() if p.grad is not None and p.grad.abs().sum() > 0}


# ------------------------------------------------------------ S(t), p_t
def test_survival_and_halting_distribution_follow_eq_2_to_5():
    torch.manual_seed(0)
    h = torch.rand(4, 5)
    s, p = survival(h), halting_distribution(h)
    for b in range(4):
        for t in range(5):
            expected_s = math.prod(1 - h[b, i].item() for i in range(t))  # Eq. 4
            assert s[b, t].item() == pytest.approx(expected_s, rel=1e-5)
            assert p[b, t].item() == pytest.approx(h[b, t].item() * expected_s, rel=1e-5)  # Eq. 5
    assert torch.allclose(s[:, 1:], 1 - p[:, :-1].cumsum(1), atol=1e-6)  # Eq. 2: S(t) = 1 - sum_{i<t} p_i
    assert torch.allclose((s[:, :-1] - s[:, 1:]) / s[:, :-1], h[:, :-1], atol=1e-5)  # Eq. 3
    last = torch.cat([h[:, :-1], torch.ones(4, 1)], 1)
    assert torch.allclose(halting_distribution(last).sum(1), torch.ones(4), atol=1e-6)


def test_straight_through_sample_is_binary_and_passes_gradients():
    logits = torch.tensor([-2.0, 0.0, 0.5, 3.0], requires_grad=True)
    torch.manual_seed(1)
    hard = gumbel_halting(logits)
    assert set(hard.tolist()) <= {0.0, 1.0}
    (hard * torch.arange(1.0, 5.0)).sum().backward()
    torch.manual_seed(1)
    soft_logits = logits.detach().requires_grad_()
    soft = gumbel_halting(soft_logits, hard=False)
    (soft * torch.arange(1.0, 5.0)).sum().backward()
    assert torch.equal(hard.detach(), (soft.detach() > 0.5).float())
    assert torch.allclose(logits.grad, soft_logits.grad) and logits.grad.abs().sum() > 0
    many = gumbel_halting(torch.full((20000,), 0.5))
    assert many.mean().item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item(), abs=0.015)


# ------------------------------------------------------------ the policy
def test_learned_policy_builds_on_bind_and_provides_extras():
    ens = irene_ensemble()
    assert isinstance(ens.halting, ek.halting.Learned) and len(ens.halting.aux_heads) == 3
    out = ens.forward_output(torch.randn(4, 3, 8, 8))
    assert out.extras["halting_probabilities"].shape == (4, 3)
    assert out.extras["aux_logits"].shape == (4, 3, 5)
    assert torch.equal(out.extras["halting_probabilities"][:, -1], torch.ones(4))
    assert torch.allclose(out.extras["prefix_costs"][0], torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="another ensemble"):
        ek.wrap(toy_split(3), "cascade", members=2, halting=ens.halting)


UNTRAINED = pytest.mark.filterwarnings("ignore::ensemblekit.core.interfaces.UntrainedHaltingWarning")
"""For tests of the inference mechanics, which run an untrained selector on purpose."""


@UNTRAINED
def test_inference_is_deterministic_and_matches_the_eval_extras():
    ens = irene_ensemble().eval()
    x = torch.randn(16, 3, 8, 8)
    logits = ens.forward_output(x).extras["halting_logits"]
    ens.halting.threshold = torch.sigmoid(logits[:, 0]).median().item()  # about half stop after member 1
    out = ens.forward_output(x)
    h = out.extras["halting_probabilities"]
    expected_used = h.argmax(1) + 1  # Eq. 6: the first t with h_t = 1
    first = ens.predict(x)
    assert 0 < (first.members_used == 1).sum() < 16  # samples really leave the batch
    assert torch.equal(first.members_used, expected_used)
    assert torch.allclose(first.prediction, out.prefixes()[torch.arange(16), expected_used - 1], atol=1e-5)
    second = ens.predict(x)
    assert torch.equal(first.members_used, second.members_used) and torch.equal(first.prediction, second.prediction)
    assert torch.equal(h, ens.forward_output(x).extras["halting_probabilities"])


@UNTRAINED
def test_halted_samples_skip_the_later_members():
    ens = irene_ensemble().eval()
    x = torch.randn(16, 3, 8, 8)
    logits = ens.forward_output(x).extras["halting_logits"]
    ens.halting.threshold = torch.sigmoid(logits[:, 0]).median().item()
    sizes = {}

    def record(m):
        def hook(module, args, out):
            sizes[m] = len(out)
        return hook
    for m, member in enumerate(ens.graph.members):
        ens.nodes[member.path[0]].register_forward_hook(record(m))
    used = ens.predict(x).members_used
    assert sizes[0] == 16 and sizes[1] == int((used > 1).sum()) and sizes.get(2, 0) == int((used > 2).sum())


@UNTRAINED
@pytest.mark.parametrize("topology,options", [("tree", {"depth": 2}), ("multi_branch", {"members": 3})])
def test_learned_halting_on_shared_topologies(topology, options):
    ens = irene_ensemble(topology, **options)
    assert ens.loss_strategy.cost == "flops"
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    out = ens.forward_output(x)
    flops = torch.tensor([float(r.flops) for r in ens.cost_table()])
    assert torch.allclose(out.extras["prefix_costs"][0], flops / flops[0])
    with pytest.raises(ValueError, match="frozen"):
        ens.loss(out, y)  # sequential: nothing frozen here
    ens.loss_strategy.schedule = "joint"
    ens.loss(out, y).total.backward()
    result = ens.eval().predict(x)
    assert result.members_used.min() >= 1 and result.members_used.max() <= ens.num_members


def test_wrap_fails_without_a_learned_policy():
    with pytest.raises(ValueError, match="halting='learned'"):
        ek.wrap(toy_split(3), "cascade", members=3, loss="irene")
    with pytest.raises(ValueError, match="halting='learned'"):
        ek.wrap(toy_split(3), "cascade", members=3, loss="irene", halting={"name": "fixed", "members": 2})
    ek.wrap(toy_split(3), "cascade", members=3, loss="irene", halting="learned")


# ------------------------------------------------------------ the loss
def direct_terms(logits, h, target, costs, steps):
    """Eq. 8-12 written out with loops, one sample at a time."""
    b, t_all, _ = logits.shape
    terms = {"base": 0.0, "ens": 0.0, "cost": 0.0, "rank": 0.0}
    for i in range(b):
        s = [math.prod(1 - h[i, j].item() for j in range(t)) for t in range(t_all)]
        probs = logits[i].softmax(-1)

        def ens_ce(t):  # Eq. 9-10, prefix of t members
            mix = sum(s[j] * probs[j] for j in range(t)) / sum(s[:t])
            return -math.log(mix[target[i]].item())
        for t in steps:
            ce_t = F.cross_entropy(logits[i, t - 1][None], target[i][None]).item()
            terms["base"] += ce_t / b
            terms["ens"] += ens_ce(t) / b
            if t > 1:
                terms["rank"] += max(0.0, s[t - 1] * (ce_t - ens_ce(t - 1))) / b
        last = max(steps)
        p = [h[i, j].item() * s[j] for j in range(last - 1)] + [s[last - 1]]
        terms["cost"] += sum(costs[j] * p[j] for j in range(last)) / b  # Eq. 11
    return terms


@pytest.mark.parametrize("schedule", ["sequential", "joint"])
@pytest.mark.parametrize("cost", ["members", "flops"])
def test_loss_terms_match_the_equations(schedule, cost):
    torch.manual_seed(0)
    logits, h, y = torch.randn(6, 4, 5), torch.rand(6, 4), torch.randint(0, 5, (6,))
    prefix = torch.tensor([1.0, 1.5, 2.5, 3.0])
    out = EnsembleOutput(logits, MeanProbs(), (1, 2, 3, 4),
                         {"halting_probabilities": h, "prefix_costs": prefix.expand(6, 4)})
    loss = IreneLoss(cost=cost, schedule=schedule, ens_weight=0.3, cost_weight=0.2, rank_weight=0.7)
    terms = loss.terms(out, y)
    costs = [1, 2, 3, 4] if cost == "members" else prefix.tolist()
    steps = [4] if schedule == "sequential" else [1, 2, 3, 4]
    for name, value in direct_terms(logits, h, y, costs, steps).items():
        assert terms[name].item() == pytest.approx(value, rel=1e-4, abs=1e-6), name
    expected_total = sum(w * terms[k] for k, w in [("base", 1.0), ("ens", 0.3), ("cost", 0.2), ("rank", 0.7)])
    assert loss(out, y).total.item() == pytest.approx(expected_total.item(), rel=1e-5)


def test_cost_term_is_the_expected_number_of_members():
    torch.manual_seed(0)
    h = torch.cat([torch.rand(8, 2), torch.ones(8, 1)], 1)
    out = EnsembleOutput(torch.randn(8, 3, 5), MeanProbs(), (1, 2, 3), {"halting_probabilities": h})
    cost = IreneLoss().terms(out, torch.zeros(8, dtype=torch.long))["cost"]
    p = halting_distribution(h)
    assert cost.item() == pytest.approx((p * torch.tensor([1.0, 2.0, 3.0])).sum(1).mean().item(), rel=1e-6)
    assert cost.item() == pytest.approx(survival(h).sum(1).mean().item(), rel=1e-6)  # E[z] = sum_t S(t)
    binary = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = EnsembleOutput(torch.randn(3, 3, 5), MeanProbs(), (1, 2, 3), {"halting_probabilities": binary})
    assert IreneLoss().terms(out, torch.zeros(3, dtype=torch.long))["cost"].item() == pytest.approx(2.0)


@pytest.mark.parametrize("term", ["ens", "cost", "rank", "base", "aux"])
def test_each_term_updates_only_its_parameters(term):
    ens = irene_ensemble(seed=3).train()
    heads = {id(p) for p in ens.heads.parameters()}
    aux = {id(p) for p in ens.halting.aux_heads.parameters()}
    nodes = {id(p) for p in ens.nodes.parameters()}
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    torch.manual_seed(4)
    terms = ens.loss_strategy.terms(ens.forward_output(x), y)
    assert terms[term].requires_grad
    terms[term].backward()
    got = with_grad(ens)
    selector = selector_params(ens)
    if term in ("ens", "cost"):  # Eq. 10, 11: the selector only
        assert got == selector
    elif term == "rank":  # Eq. 12: members (their own loss) and selector (through S(t))
        assert got & selector and got & heads and got & nodes and not got & aux
    elif term == "base":
        assert got & heads and got & nodes and not got & (selector | aux)
    else:  # the sequential step t = 3 trains the auxiliary head of member 3
        assert got == {id(p) for p in ens.halting.aux_heads[2].parameters()}


def test_sequential_step_t_trains_member_t_and_the_selector():
    ens = irene_ensemble(seed=1)
    loss = ens.loss_strategy
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    modules = stage_modules(ens, 2)
    frozen_bn = ens.nodes[ens.graph.members[0].path[0]][1]
    stats = frozen_bn.running_mean.clone()
    with frozen_except(ens, modules):
        out = ens.forward_output(x, members=[0, 1])
        loss(out, y).total.backward()
    trainable = {id(p) for m in modules for p in m.parameters()}
    assert with_grad(ens) <= trainable and with_grad(ens) & selector_params(ens)
    assert {id(p) for p in ens.heads[1].parameters()} <= with_grad(ens)
    assert torch.equal(frozen_bn.running_mean, stats)  # frozen members stay in eval mode
    assert all(p.requires_grad for p in ens.parameters()) and ens.training  # restored


def test_sequential_schedule_freezes_earlier_members():
    ens = irene_ensemble(seed=2)
    data = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 5, (32,)))
    snapshots = {}

    def log(record):
        snapshots[record["stage"]] = [p.detach().clone() for p in ens.heads[0].parameters()]
    history = train(ens, data, FIT, on_epoch=log).history  # the loss asks for Algorithm 1
    assert [r["stage"] for r in history] == ["step 1", "step 2", "step 3"]
    assert {f"part.{k}" for k in ("base", "ens", "cost", "rank", "aux", "discrepancy")} | {"loss"} <= history[-1].keys()
    initial = snapshots["step 1"]
    assert all(torch.equal(a, b) for a, b in zip(initial, snapshots["step 3"]))  # member 1 frozen after step 1
    assert all(p.requires_grad for p in ens.parameters())  # the freezing is undone


def test_joint_schedule_trains_everything():
    ens = irene_ensemble(seed=2, schedule="joint")
    before = [p.detach().clone() for p in ens.parameters()]
    data = TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,)))
    history = train(ens, data, replace(FIT, stages="irene")).history  # IRENE's optimisers
    assert [r["stage"] for r in history] == ["joint"]
    changed = [not torch.equal(a, b) for a, b in zip(before, ens.parameters())]
    assert sum(changed) > 0.9 * len(changed)


def test_sequential_schedule_trains_what_algorithm_1_says_at_each_step():
    """Step t changes only member t's new nodes, its head, its aux head and the selector; the rest (weights
    and BatchNorm statistics) is bit-identical (Algorithm 1). The policy is marked trained at step 1."""
    ens = irene_ensemble(seed=5)
    data = TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,)))
    names = {id(p): n for n, p in ens.named_parameters()}
    owner = {}  # state-dict key -> the module that holds it
    for prefix, module in ens.named_modules():
        for key in module.state_dict(keep_vars=True):
            owner.setdefault(f"{prefix}.{key}" if prefix else key, set()).add(module)
    snapshots = [copy.deepcopy(ens.state_dict())]
    train(ens, data, FIT, on_epoch=lambda record: snapshots.append(copy.deepcopy(ens.state_dict())))
    assert len(snapshots) == 4
    for t in (1, 2, 3):
        modules = stage_modules(ens, t)
        inside = {m for top in modules for m in top.modules()}
        trained = {names[id(p)] for m in modules for p in m.parameters()}
        before, after = snapshots[t - 1], snapshots[t]
        changed = {k for k in before if not torch.equal(before[k], after[k])} - {"halting.trained"}
        assert changed and bool(after["halting.trained"]), t
        assert all(owner[k] & inside for k in changed), (t, sorted(changed - trained))  # nothing else moved
        own = [n for n, p in ens.named_parameters() if n in trained and not n.startswith("halting.")]
        assert set(own) <= changed, t  # the member's nodes and head did train
        if t > 1:
            assert any(k.startswith("halting.") and k in trained for k in changed), t  # and the selector


def test_sequential_schedule_optimisers_and_step_decay():
    """SGD (Nesterov) for the models, Adam for the selector, re-created at each step; lr / 5 at 30/60/80%."""
    ens = irene_ensemble(seed=6)
    settings = TrainConfig(epochs=5, lr=0.1, momentum=0.9, weight_decay=5e-4, progress="none", device="cpu")
    stages = sequential(ens, settings, selector_lr=0.002)
    assert [s.members for s in stages] == [[0], [0, 1], [0, 1, 2]]
    params = list(ens.parameters())
    sgd, adam = stages[1].optimizer(params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["weight_decay"] == 5e-4
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 0.002
    assert {id(p) for p in adam.param_groups[0]["params"]} == selector_params(ens)
    data = TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,)))
    history = train(ens, data, replace(settings, batch_size=16),
                    stages=sequential(ens, settings)).history
    lrs = [r["lr"] for r in history if r["stage"] == "step 2"]
    # 5 epochs: milestones round(1.5), 3, 4 -> the rate after epochs 1..5
    assert lrs == pytest.approx([0.1, 0.1 * LR_DECAY, 0.1 * LR_DECAY**2, 0.1 * LR_DECAY**3, 0.1 * LR_DECAY**3])
    assert [r["lr"] for r in history if r["stage"] == "step 3"][0] == 0.1  # a fresh schedule at every step


# ------------------------------------------------------------ the cascade
def call_order(ens, x):
    """``(kind, member)`` of every node and head call of one forward pass, in call order, and its output."""
    owner = {n: m.index for m in ens.graph.members for n in m.path}  # members share no node
    calls = []
    handles = [ens.nodes[n].register_forward_hook(lambda *_, m=m: calls.append(("node", m))) for n, m in owner.items()]
    handles += [head.register_forward_hook(lambda *_, m=m: calls.append(("head", m)))
                for m, head in enumerate(ens.heads)]
    try:
        out = ens.forward_output(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls, out


def evaluated_in_order(calls) -> bool:
    """Whether member k's head runs before any node of a later member, for every k."""
    return all(calls.index(("head", k)) < min(i for i, (kind, m) in enumerate(calls) if kind == "node" and m > k)
               for k in range(max(m for _, m in calls)))


def test_a_cascade_evaluates_member_by_member():
    """Its forward has member k's logits before any node of member k + 1 runs; independent members run level
    by level. Same weights, same outputs and gradients."""
    torch.manual_seed(0)
    cascade = ek.wrap(toy_split(3), "cascade", members=3, halting="learned")
    independent = ek.wrap(toy_split(3), "independent", members=3, halting="learned")
    independent.load_state_dict(cascade.state_dict())
    x = torch.randn(4, 3, 8, 8)
    calls, out = call_order(cascade, x)
    assert evaluated_in_order(calls)
    assert calls[:4] == [("node", 0)] * 3 + [("head", 0)]
    other_calls, other = call_order(independent, x)
    assert not evaluated_in_order(other_calls)
    assert torch.allclose(out.members, other.members)
    out.members.sum().backward()
    other.members.sum().backward()
    for a, b in zip(cascade.parameters(), independent.parameters()):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.allclose(a.grad, b.grad))


def test_a_cascade_trains_stage_by_stage_by_default():
    """The trainer's default schedule for a cascade is IRENE's "sequential", whatever the loss; a loss that names
    its own schedule wins, and independent members train jointly."""
    def stages(topology, loss="independent", config=FIT):
        torch.manual_seed(0)
        ens = ek.wrap(toy_split(3), topology, members=3, loss=loss, halting="learned")
        return [(s.name, s.members) for s in resolve_stages(ens, config)]
    steps = [("step 1", [0]), ("step 2", [0, 1]), ("step 3", [0, 1, 2])]
    assert stages("cascade") == steps
    assert stages("cascade", config=replace(FIT, stages="irene")) == steps
    assert stages("independent") == [("joint", None)]
    assert stages("cascade", loss={"name": "irene", "schedule": "joint"}) == [("joint", None)]


def test_a_cascade_with_any_loss_trains_like_irene():
    """Cascade + the independent loss + learned halting: member t trains at step t with the earlier ones frozen,
    and the selector learns from its own terms at every step."""
    torch.manual_seed(7)
    ens = ek.wrap(toy_split(3), "cascade", members=3, aggregator="mean_probs", loss="independent", halting="learned")
    data = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 5, (32,)))
    snapshots = [copy.deepcopy(ens.state_dict())]
    history = train(ens, data, FIT, on_epoch=lambda record: snapshots.append(copy.deepcopy(ens.state_dict()))).history
    assert [r["stage"] for r in history] == ["step 1", "step 2", "step 3"]
    assert {"part.independent", "part.halting.ens", "part.halting.cost", "part.halting.rank"} <= history[-1].keys()
    for t in (1, 2, 3):
        before, after = snapshots[t - 1], snapshots[t]
        moved = {k.split(".")[1] for k in before if k.startswith("heads.") and not torch.equal(before[k], after[k])}
        assert moved == {str(t - 1)}, t  # only member t's head
        selector_moved = not torch.equal(before["halting.cell.weight_ih"], after["halting.cell.weight_ih"])
        assert selector_moved == (t > 1), t  # one member alone always halts: nothing to learn at step 1
    assert ens.halting.is_trained


# ------------------------------------------------------------ utility, WoC
@pytest.mark.parametrize("row", [
    # (V_1, V_T, V, C, the paper's utility): Tables 1-2
    (94.94, 95.62, 95.48, 1.15, 2.10), (94.94, 95.62, 95.81, 1.32, 3.10),
    (93.10, 94.46, 94.46, 2.21, 1.37), (77.18, 80.28, 80.10, 1.88, 1.50),
    (69.58, 74.94, 73.90, 2.31, 1.05), (94.94, 95.62, 94.41, 3.00, 0.14),
])
def test_utility_reproduces_the_papers_tables(row):
    single, full, top1, cost, reported = row
    assert utility(top1, cost, single, full) == pytest.approx(reported, abs=0.03)
    assert utility(single, 1, single, full) == pytest.approx(1.0)
    assert utility(full, 3, single, full) == pytest.approx(1.0)


def test_utility_needs_a_better_ensemble():
    with pytest.raises(ValueError, match="more accurate"):
        utility(0.9, 1.0, 0.9, 0.9)


def test_woc_exits_on_confidence_and_matches_the_confidence_policy():
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(3), "cascade", members=3, aggregator="mean_probs").eval()
    x = torch.randn(20, 3, 8, 8)
    members = ens.forward_members(x)
    confidence = ens.aggregator.prefixes(members).softmax(-1).amax(-1)
    woc = WoC(confidence[:, 0].median().item())
    used = woc.members_used(members, ens.aggregator)
    first = confidence[:, 0] >= woc.threshold
    assert torch.equal(used == 1, first)
    assert torch.equal(used == 2, ~first & (confidence[:, 1] >= woc.threshold))
    halted = ens.predict(x, halting=ek.halting.Confidence(woc.threshold))
    assert torch.equal(halted.members_used, used)
    prediction, _ = woc.predict(members, ens.aggregator)
    assert torch.allclose(halted.prediction, prediction, atol=1e-5)


def test_woc_search_picks_the_best_utility():
    # member 1 is right on samples 0-5 (confident on 0-3), members 2-3 fix samples 6-7
    members = torch.full((10, 3, 2), 0.0)
    labels = torch.tensor([0] * 8 + [1] * 2)
    members[:4, 0, 0] = 4.0
    members[4:6, 0, 0] = 0.5
    members[6:8, 0, 1] = 0.2
    members[6:8, 1:, 0] = 6.0
    members[8:, :, 1] = 3.0
    woc = WoC.fit(members, labels, MeanProbs())
    used = woc.members_used(members, MeanProbs())
    grid = torch.tensor(WoC.GRID)
    scores = []
    for thr in grid.tolist():
        pred, u = WoC(thr).predict(members, MeanProbs())
        acc = (pred.argmax(-1) == labels).float().mean().item()
        scores.append(utility(acc, u.float().mean().item(), 0.6, 1.0))
    assert utility((WoC(woc.threshold).predict(members, MeanProbs())[0].argmax(-1) == labels).float().mean().item(),
                   used.float().mean().item(), 0.6, 1.0) == pytest.approx(max(scores))
    assert woc.threshold == grid[scores.index(max(scores))].item()
    no_gain = members.clone()
    no_gain[:, 1:] = no_gain[:, :1]
    assert WoC.fit(no_gain, labels, MeanProbs()).threshold == 0.0


def test_woc_search_when_the_first_member_is_never_right():
    # member 1 is wrong on every held-out sample; members 1-2 together are right on the confident half
    members = torch.zeros(8, 2, 2)
    labels = torch.tensor([0, 1] * 4)
    members[:, 0, 0] = torch.where(labels == 0, -1.0, 1.0)  # always the other class, at low confidence
    members[:4, 1] = torch.nn.functional.one_hot(labels[:4], 2).float() * 8.0
    with pytest.raises(ValueError, match="accuracy > 0, got 0.0"):
        utility(0.5, 1.5, 0.0, 0.5, members=2)
    woc = WoC.fit(members, labels, MeanProbs())  # raised "got 0.5 vs 0.0" before
    accuracy = [(WoC(t).predict(members, MeanProbs())[0].argmax(-1) == labels).float().mean().item()
                for t in WoC.GRID]
    assert woc.threshold == pytest.approx(WoC.GRID[accuracy.index(max(accuracy))])
    assert max(accuracy) == 0.5 and woc.threshold > 0.5  # never the untrained-looking first member alone
