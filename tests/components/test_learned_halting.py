"""A learned halting policy trains with any task loss, and says when it was never trained."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

import ensemblekit as ek
from ensemblekit.components.halting.learned import LearnedHaltingError
from ensemblekit.components.losses import IreneLoss
from ensemblekit.core.interfaces import UntrainedHaltingWarning
from ensemblekit.core.stages import Stage
from ensemblekit.training.config import TrainConfig
from ensemblekit.training.trainer import train
from tests.conftest import toy_split

TERMS = ("ens", "cost", "rank", "aux", "discrepancy")
CONFIG = TrainConfig(epochs=1, batch_size=16, lr=0.05, progress="none", device="cpu")


def tree_hd(seed: int = 0, **halting):
    """The issue's case: a depth-2 tree, hierarchical distillation, a learned policy."""
    torch.manual_seed(seed)
    return ek.wrap(toy_split(3), topology="tree", depth=2, loss="hierarchical_distillation",
                   halting={"name": "learned", **halting})


def policy_parameters(ens) -> list[torch.nn.Parameter]:
    """The selector's parameters and the auxiliary heads': everything the policy owns."""
    return list(ens.halting.parameters())


def batch(n: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_tree_with_hierarchical_distillation_trains_the_selector():
    ens = tree_hd().train()
    params = policy_parameters(ens)
    assert len(params) == 14  # LSTM 4 + output layer 2 + four auxiliary heads 2 each
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(ens.parameters(), lr=0.1)
    x, y = batch()
    for _ in range(3):
        result = ens.loss(ens.forward_output(x), y)
        opt.zero_grad()
        result.total.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    assert {f"halting.{name}" for name in TERMS} | {"independent", "hierarchical_distillation"} == set(result.parts)


def test_the_policy_terms_are_added_to_the_task_loss():
    ens = tree_hd(cost_weight=0.5, rank_weight=0.3).train()
    x, y = batch()
    torch.manual_seed(2)
    out = ens.forward_output(x)
    task = ens.loss_strategy(out, y)
    own = ens.halting.loss(out, y)
    result = ens.loss(out, y)
    assert torch.allclose(result.total, task.total + own.total)
    weights = {"ens": 0.1, "cost": 0.5, "rank": 0.3, "aux": 1.0, "discrepancy": 0.1}
    assert torch.allclose(own.total, sum(w * own.parts[k] for k, w in weights.items()))
    # the same math as IRENE's loss trained jointly, its cost in prefix FLOPs (Eq. 9-12)
    irene = IreneLoss(cost="flops", schedule="joint").terms(out, y)
    for name in TERMS:
        assert torch.allclose(own.parts[name], irene[name].detach()), name


def test_irene_loss_holds_the_terms_already():
    """No double counting: with IRENE's loss the ensemble's loss is the loss's own."""
    torch.manual_seed(0)
    ens = ek.recipes.irene(toy_split(3), members=3, schedule="joint").train()
    x, y = batch()
    torch.manual_seed(3)
    out = ens.forward_output(x)
    result = ens.loss(out, y)
    assert torch.equal(result.total, ens.loss_strategy(out, y).total)
    assert not any(name.startswith("halting.") for name in result.parts)


def test_member_logits_alone_cannot_train_the_policy():
    ens = tree_hd()
    x, y = batch()
    with pytest.raises(LearnedHaltingError, match="forward_output"):
        ens.loss(ens.forward_members(x), y)


def test_predict_warns_until_the_policy_is_trained():
    ens = tree_hd().eval()
    x, _ = batch()
    with pytest.warns(UntrainedHaltingWarning, match="never trained") as record:
        ens.predict(x)
    assert record[0].filename == __file__  # points at the caller
    ens.halting.mark_trained()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ens.predict(x)


def test_the_trained_state_survives_state_dict_and_safetensors(tmp_path):
    trained = tree_hd(seed=0)
    trained.halting.mark_trained()
    assert trained.state_dict()["halting.trained"].item() is True
    save_file(trained.state_dict(), tmp_path / "model.safetensors")
    fresh = tree_hd(seed=1).eval()
    assert not fresh.halting.is_trained
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert fresh.halting.is_trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.predict(batch()[0])


def test_the_trainer_trains_and_marks_the_policy():
    ens = tree_hd(seed=4)
    before = [p.detach().clone() for p in policy_parameters(ens)]
    data = TensorDataset(*batch(32))
    history = train(ens, data, CONFIG).history
    assert [r["stage"] for r in history] == ["joint"]
    assert {f"part.halting.{name}" for name in TERMS} <= history[-1].keys()
    assert all(not torch.equal(a, p) for a, p in zip(before, policy_parameters(ens)))
    assert ens.halting.is_trained


def test_a_stage_that_does_not_train_the_policy_does_not_mark_it():
    ens = tree_hd(seed=5)
    data = TensorDataset(*batch(16))
    train(ens, data, CONFIG, stages=[Stage("members only", 1, trainable=[ens.nodes, ens.heads])])
    assert not ens.halting.is_trained
