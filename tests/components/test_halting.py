"""Confidence and budgeted halting: thresholds, calibration, and real batch compaction."""

from __future__ import annotations

import math

import pytest
import torch

import ensemblekit as ek
from ensemblekit.components.halting import Budgeted, Confidence, Fixed
from ensemblekit.components.halting.budgeted import (
    exit_distribution,
    exit_indices,
    expected_flops,
    fit_thresholds,
    solve_q,
)
from ensemblekit.components.halting.confidence import confidence
from ensemblekit.core.interfaces import HaltingStep
from ensemblekit.methods.imta.recipe import multi_exit
from tests.conftest import toy_split

# Ten held-out samples, three exits. With q = 1 each exit should take floor(10/3) = 3 samples.
CONF = torch.tensor([
    [0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55, 0.50],  # exit 0: samples 0-2 stop, threshold 0.85
    [0.99, 0.99, 0.99, 0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70],  # exit 1: of 3-9, samples 7-9 stop at 0.50
    [0.30, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30, 0.30],  # exit 2 takes the rest
]).T
EXITS = [0, 0, 0, 2, 2, 2, 2, 1, 1, 1]
CUM_FLOPS = [100.0, 250.0, 400.0]


def logits_with_confidence(conf, num_classes=20):
    """Logits whose max-softmax is ``conf`` (class 0 wins); needs conf >= 1/num_classes."""
    rest = ((1 - conf) / (num_classes - 1)).unsqueeze(-1).expand(*conf.shape, num_classes - 1)
    return torch.cat([conf.unsqueeze(-1), rest], -1).log()


def test_exit_distribution_is_geometric():
    pi = exit_distribution(0.5, 3)
    torch.testing.assert_close(pi, torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64) / 0.875)
    assert torch.allclose(exit_distribution(1.0, 4), torch.full((4,), 0.25, dtype=torch.float64))


def test_thresholds_on_a_constructed_case():
    thresholds = fit_thresholds(CONF, exit_distribution(1.0, 3))
    assert thresholds[:2].tolist() == pytest.approx([0.85, 0.50])
    assert thresholds[2] == -math.inf
    assert exit_indices(CONF, thresholds).tolist() == EXITS
    # floor(N pi_k) = 0 lets nobody stop; a tiny q sends all but the floor's remainder to exit 0.
    assert fit_thresholds(CONF, torch.tensor([0.05, 0.05, 0.9], dtype=torch.float64))[:2].tolist() == [math.inf] * 2
    assert exit_indices(CONF, fit_thresholds(CONF, exit_distribution(1e-3, 3))).tolist() == [0] * 9 + [2]


def test_budgeted_calibration_predicts_the_expected_cost():
    preds = logits_with_confidence(CONF)
    labels = torch.zeros(10, dtype=torch.long)
    labels[[3, 7]] = 1  # wrong for a sample that stops at exit 2 and one at exit 1
    policy = Budgeted(q=1.0)
    policy.calibrate_from_predictions(preds, labels, CUM_FLOPS)
    assert policy.fractions == pytest.approx([0.3, 0.3, 0.4])
    assert policy.expected_flops == pytest.approx(0.3 * 100 + 0.3 * 250 + 0.4 * 400)
    assert policy.held_out_accuracy == pytest.approx(0.8)
    assert policy.thresholds[:2].tolist() == pytest.approx([0.85, 0.50], abs=1e-6)


def test_target_flops_solves_for_q():
    grid = [expected_flops(CONF, CUM_FLOPS, 10 ** (e / 100)) for e in range(-300, 301)]
    for target in (150.0, 250.0, 330.0):
        cost = expected_flops(CONF, CUM_FLOPS, solve_q(CONF, CUM_FLOPS, target))
        assert cost == max(c for c in grid if c <= target)  # the closest to the target from below
    policy = Budgeted(flops=250.0)
    policy.calibrate_from_predictions(logits_with_confidence(CONF), torch.zeros(10, dtype=torch.long), CUM_FLOPS)
    assert policy.expected_flops <= 250.0 and policy.q > 0
    with pytest.raises(ValueError, match="below the cheapest"):
        solve_q(CONF, CUM_FLOPS, 50.0)
    with pytest.raises(ValueError, match="exactly one"):
        Budgeted(q=1.0, flops=100.0)
    with pytest.raises(ValueError, match="not calibrated"):
        Budgeted(q=1.0).step(HaltingStep(0, 3, CONF[:, :1], CONF, 1.0), None)
    given = Budgeted(thresholds=[0.85, 0.45, -math.inf])  # a calibration found earlier
    preds = logits_with_confidence(CONF)
    assert given.step(HaltingStep(1, 3, preds[:, 1], preds[:, 1], 1.0), None)[0].tolist() == [
        c >= 0.45 for c in CONF[:, 1].tolist()]
    with pytest.raises(ValueError, match="needs q or flops"):
        given.calibrate_from_predictions(preds, torch.zeros(10, dtype=torch.long), CUM_FLOPS)


def test_confidence_policy_thresholds():
    pred = logits_with_confidence(torch.tensor([0.9, 0.5, 0.2]))
    step = HaltingStep(0, 3, pred, pred, 1.0)
    torch.testing.assert_close(confidence(pred), torch.tensor([0.9, 0.5, 0.2]))
    assert Confidence(0.5).step(step, None)[0].tolist() == [True, True, False]
    per_member = Confidence([0.95, 0.3, 0.0])
    assert per_member.step(step, None)[0].tolist() == [False, False, False]
    assert per_member.step(HaltingStep(1, 3, pred, pred, 1.0), None)[0].tolist() == [True, True, False]
    with pytest.raises(ValueError, match="2 thresholds"):
        Confidence([0.5, 0.5]).step(step, None)


def test_policies_are_registered():
    ens = ek.wrap(toy_split(3), "chain", halting={"name": "confidence", "threshold": [0.5, 0.6, 0.0]})
    assert isinstance(ens.halting, Confidence)
    ens = ek.wrap(toy_split(3), "chain", halting={"name": "budgeted", "q": 0.5})
    assert isinstance(ens.halting, Budgeted)


def held_out_and_test(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_val, x_test = torch.randn(40, 3, 8, 8, generator=g), torch.randn(24, 3, 8, 8, generator=g)
    return (x_val, torch.randint(0, 5, (40,), generator=g)), x_test


@pytest.mark.parametrize("build", [
    lambda: multi_exit(toy_split(4)),
    lambda: ek.wrap(toy_split(3), "tree", depth=2),
    lambda: ek.wrap(toy_split(3), "independent", members=3, aggregator="mean_probs"),
])
def test_budgeted_predict_with_compaction_matches_evaluating_everything(build):
    torch.manual_seed(0)
    ens = build().eval()
    val, x = held_out_and_test()
    policy = Budgeted(q=1.0)
    policy.calibrate(ens, val)
    batches = [(val[0][i:i + 16], val[1][i:i + 16]) for i in range(0, 40, 16)]
    from_loader = Budgeted(q=1.0)
    from_loader.calibrate(ens, batches)
    assert torch.equal(from_loader.thresholds, policy.thresholds)
    with torch.no_grad():
        prefixes = ens.forward_output(x).prefixes()
    chosen = exit_indices(confidence(prefixes), policy.thresholds)
    assert len(set(chosen.tolist())) > 1  # the case exercises early and late stops
    result = ens.predict(x, halting=policy)
    assert torch.equal(result.members_used, chosen + 1)
    torch.testing.assert_close(result.prediction, prefixes[torch.arange(len(x)), chosen])
    costs = torch.tensor([float(r.flops) for r in ens.cost_table()], dtype=torch.float64)
    torch.testing.assert_close(result.flops, costs[chosen])


def test_confidence_on_an_ensemble_uses_the_prefix_prediction():
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(3), "independent", members=3).eval()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        prefixes = ens.forward_output(x).prefixes()
    conf = confidence(prefixes)
    threshold = float(conf.median())
    result = ens.predict(x, halting=Confidence(threshold))
    chosen = exit_indices(conf, torch.full((3,), threshold))
    assert torch.equal(result.members_used, chosen + 1)
    torch.testing.assert_close(result.prediction, prefixes[torch.arange(16), chosen])


def test_stopped_samples_leave_the_batch():
    torch.manual_seed(0)
    ens = multi_exit(toy_split(3)).eval()
    x = torch.randn(12, 3, 8, 8)
    with torch.no_grad():
        conf = confidence(ens.forward_output(x).prefixes())
    ens.cost_table()  # FLOPs are counted once, on one image, before the hook goes on
    seen: list[int] = []
    ens.nodes[2].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    threshold = float(conf[:, 0].sort().values[6])  # 6 of 12 samples stop at exit 0
    ens.predict(x, halting=Confidence([threshold, 1.0, 0.0]))
    assert seen == [6]  # the last block ran on the samples still going only


def test_per_member_thresholds_of_the_wrong_length_are_refused_when_wrapping():
    with pytest.raises(ValueError, match="3 thresholds given for an ensemble of 2 members"):
        ek.wrap(toy_split(2), "independent", members=2, halting=ek.halting.Confidence([0.5, 0.6, 0.7]))


def msdnet_thresholds(conf, pi, ties):
    """MSDNet's threshold search written as its loops (``dynamic_eval_find_threshold``), with both tie rules.

    For each exit in order: walk the samples by decreasing confidence, count the
    ones not yet exited, and take the confidence of the ``floor(N pi_k)``-th as
    the threshold; every sample at least as confident exits. When fewer samples
    are left than that count, MSDNet keeps the threshold at 1e8 (none exits);
    "early" takes the least confident one left (all exit).
    """
    n, m = conf.shape
    exited = [False] * n
    thresholds = [math.inf] * m
    for k in range(m - 1):
        quota, count, last = math.floor(n * float(pi[k])), 0, None
        for i in sorted(range(n), key=lambda i: -float(conf[i, k])):
            if not exited[i]:
                count, last = count + 1, float(conf[i, k])
                if count == quota:
                    thresholds[k] = last
                    break
        if 0 < count < quota and ties == "early":
            thresholds[k] = last
        exited = [e or float(conf[i, k]) >= thresholds[k] for i, e in enumerate(exited)]
    thresholds[m - 1] = -math.inf
    return thresholds


def test_tie_rules_match_direct_implementations_of_each():
    g = torch.Generator().manual_seed(0)
    conf = (torch.rand(50, 4, generator=g) * 3).round() / 3  # four distinct confidences: many ties
    differ = 0
    for p in range(1, 41):  # MSDNet's sweep: q = p / 20
        pi = exit_distribution(p / 20, 4)
        rules = {}
        for ties in ("early", "msdnet"):
            rules[ties] = fit_thresholds(conf, pi, ties=ties).tolist()
            assert rules[ties] == pytest.approx(msdnet_thresholds(conf, pi, ties)), (p, ties)
        differ += rules["early"] != rules["msdnet"]
    assert differ > 0  # ties make the two rules differ on some budgets
    distinct = torch.rand(50, 4, generator=g)  # without ties they agree on every budget
    for p in range(1, 41):
        pi = exit_distribution(p / 20, 4)
        assert torch.equal(fit_thresholds(distinct, pi, "early"), fit_thresholds(distinct, pi, "msdnet"))
    policy = Budgeted(q=1.0, ties="msdnet")
    preds = logits_with_confidence(conf.clamp_min(0.1))
    policy.calibrate_from_predictions(preds, torch.zeros(50, dtype=torch.long), [1.0, 2.0, 3.0, 4.0])
    assert policy.thresholds.tolist() == pytest.approx(
        msdnet_thresholds(confidence(preds), exit_distribution(1.0, 4), "msdnet"), abs=1e-6)
    with pytest.raises(ValueError, match="ties must be one of 'early', 'msdnet'"):
        Budgeted(q=1.0, ties="random")


def test_calibrated_thresholds_load_into_a_fresh_policy():
    torch.manual_seed(0)
    ens = ek.wrap(toy_split(3), "chain", halting={"name": "budgeted", "q": 0.5}).eval()
    val, x = held_out_and_test()
    ens.halting.calibrate(ens, val)
    fresh = ek.wrap(toy_split(3), "chain", halting={"name": "budgeted", "q": 0.5}).eval()
    assert fresh.halting.thresholds.isnan().all() and not fresh.halting.calibrated
    fresh.load_state_dict(ens.state_dict())  # raised "Unexpected key(s) in state_dict: halting.thresholds"
    assert torch.equal(fresh.halting.thresholds, ens.halting.thresholds)
    assert torch.equal(fresh.predict(x).members_used, ens.predict(x).members_used)
    with pytest.raises(ValueError, match="calibrated for 3 exits, the ensemble has 2"):
        ek.wrap(toy_split(2), "chain", halting=ens.halting)


@pytest.mark.parametrize("threshold", [1.5, -0.1, float("nan"), [0.5, float("nan")], [0.2, 2.0], "0.5"])
def test_confidence_thresholds_outside_the_unit_interval_are_refused(threshold):
    """A max-softmax confidence lies in [0, 1]: any other threshold (or NaN) is a mistake, named in the message."""
    with pytest.raises(ValueError, match=r"in \[0, 1\], got"):
        Confidence(threshold)


def test_fixed_asks_for_at_most_the_ensembles_members():
    ens = ek.wrap(toy_split(2), "independent", members=2)
    with pytest.raises(ValueError, match="Fixed\\(members=99\\) asks for more members than the ensemble's 2"):
        ens.eval().predict(torch.randn(2, 3, 8, 8), halting=Fixed(99))
    with pytest.raises(ValueError, match="members=3"):
        ek.wrap(toy_split(2), "independent", members=2, halting={"name": "fixed", "members": 3})
