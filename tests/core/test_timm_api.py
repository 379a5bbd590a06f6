"""An ensemble has timm's model API where it makes sense: pretrained_cfg, forward_features / forward_head,
member embeddings, reset_classifier, gradient checkpointing, feature_info."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.data import resolve_data_config, resolve_model_data_config
from timm.models import FeatureInfo
from torch import nn

import ensemblekit as ek
from ensemblekit.backbones import create_backbone
from ensemblekit.core import ensemble as ensemble_module
from ensemblekit.methods.imta.isc import add_isc

TINY = {"stem_width": 8, "channels": [8, 16, 32, 64]}
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def tiny(**kwargs) -> nn.Module:
    return create_backbone("resnet10t", num_classes=kwargs.pop("num_classes", 10), **{**TINY, **kwargs})


@pytest.fixture(scope="module")
def tree():
    torch.manual_seed(0)
    return ek.wrap(tiny(), "tree", depth=2).eval()


@pytest.fixture(scope="module")
def chain():
    torch.manual_seed(0)
    return ek.recipes.multi_exit(tiny()).eval()


# ------------------------------------------------------------------ pretrained_cfg
def test_data_config_is_the_backbones():
    backbone = tiny()
    ens = ek.wrap(backbone, "independent", members=2)
    ours, theirs = resolve_model_data_config(ens), resolve_model_data_config(backbone)
    assert ours == theirs and ours["input_size"] == (3, 176, 176)  # resnet10t's own size, not timm's 224 default
    assert ens.default_cfg is ens.pretrained_cfg and ens.pretrained_cfg is not backbone.pretrained_cfg
    assert resolve_data_config(model=ens)["crop_pct"] == backbone.pretrained_cfg["crop_pct"]


def test_data_config_gives_the_input_the_ensemble_takes():
    gray = ek.wrap(tiny(in_chans=1), "independent", members=2)
    assert resolve_model_data_config(gray)["input_size"] == (1, 176, 176)
    vit = ek.wrap(create_backbone("test_vit", num_classes=4, img_size=32), "independent", members=2)
    assert resolve_model_data_config(vit)["input_size"] == (3, 32, 32)
    assert vit.pretrained_cfg.get("test_input_size") in (None, (3, 32, 32))
    vit.pretrained_cfg = {"input_size": (3, 48, 48)}  # settable, as on a timm model
    assert vit.default_cfg["input_size"] == (3, 48, 48)


def test_a_backbone_without_config_gives_timms_defaults(make_split):
    ens = ek.wrap(make_split(3), "chain")
    assert ens.pretrained_cfg == {}
    assert resolve_model_data_config(ens)["input_size"] == (3, 224, 224)


# ------------------------------------------------------------------ forward_features / forward_head
def test_forward_features_then_head_is_forward_members(tree):
    with torch.no_grad():
        features = tree.forward_features(X)
        assert features.shape == (3, 4, 64, 1, 1)  # b m c h w
        assert torch.allclose(tree.forward_head(features), tree.forward_members(X), atol=1e-6)
        assert torch.allclose(tree.forward_head(list(features.unbind(1))), tree.forward_members(X), atol=1e-6)


def test_member_embeddings_are_the_pre_logits(tree):
    with torch.no_grad():
        embeddings = tree.member_embeddings(X)
        features = tree.forward_features(X)
        assert embeddings.shape == (3, 4, tree.num_features) == (3, 4, 64)
        assert torch.allclose(embeddings, tree.forward_head(features, pre_logits=True))
        assert torch.allclose(embeddings, features.mean(dim=(-2, -1)), atol=1e-6)  # resnet: pool, then fc
        logits = torch.stack([tree.heads[m].fc(embeddings[:, m]) for m in range(4)], dim=1)
        assert torch.allclose(logits, tree.forward_members(X), atol=1e-6)


def test_members_of_different_shapes_give_lists(chain):
    with pytest.raises(ValueError, match="differ in shape.*stack=False"):
        chain.forward_features(X)
    with torch.no_grad():
        features = chain.forward_features(X, stack=False)
        assert [f.shape[1] for f in features] == [16, 8, 16, 32, 64]
        assert torch.allclose(chain.forward_head(features), chain.forward_members(X), atol=1e-6)
        embeddings = chain.member_embeddings(X, stack=False)
        assert [e.shape for e in embeddings] == [(3, c) for c in (16, 8, 16, 32, 64)]
        assert all(torch.equal(a, b) for a, b in zip(embeddings, chain.forward_head(features, pre_logits=True)))
    with pytest.raises(ValueError, match="5 members"):
        chain.forward_head(features[:2])


def test_isc_heads_read_the_previous_logits_in_forward_head():
    torch.manual_seed(0)
    ens = ek.recipes.multi_exit(tiny(), isc="concat").eval()
    with torch.no_grad():
        features = ens.forward_features(X, stack=False)
        assert torch.allclose(ens.forward_head(features), ens.forward_members(X), atol=1e-6)
        assert [e.shape[1] for e in ens.member_embeddings(X, stack=False)] == [16, 8, 16, 32, 64]


# ------------------------------------------------------------------ reset_classifier
def test_reset_classifier_gives_every_member_a_new_classifier():
    torch.manual_seed(0)
    ens = ek.wrap(tiny(), "tree", depth=2)
    before = copy.deepcopy(ens)
    ens.reset_classifier(7)
    assert ens.num_classes == 7 and ens(X).shape == (3, 7) and ens.forward_members(X).shape == (3, 4, 7)
    weights = [h.fc.weight for h in ens.heads]
    assert all(w.shape == (7, 64) for w in weights)
    assert not any(torch.equal(a, b) for i, a in enumerate(weights) for b in weights[i + 1:])  # independent draws
    for old, new in zip(before.nodes.parameters(), ens.nodes.parameters()):
        assert torch.equal(old, new)  # the blocks are kept
    result = ens.loss(ens.forward_output(X), torch.tensor([0, 3, 6]))
    result.total.backward()
    assert ens.heads[0].fc.weight.grad is not None


def test_reset_classifier_keeps_dtype_device_and_mode():
    ens = ek.wrap(tiny(), "independent", members=2).double().train()
    ens.reset_classifier(3)
    assert ens.heads[1].fc.weight.dtype == torch.float64 and ens.heads[1].fc.training
    assert ens(X.double()).dtype == torch.float64


def test_reset_classifier_is_saved_and_loaded(tmp_path):
    torch.manual_seed(0)
    ens = ek.wrap(tiny(), "tree", depth=1)
    ens.reset_classifier(4)
    ek.save(ens, tmp_path / "model.ek")
    loaded = ek.load(tmp_path / "model.ek")
    assert loaded.num_classes == 4
    with torch.no_grad():
        assert torch.equal(loaded(X), ens.eval()(X))


@pytest.mark.parametrize("args, match", [((0,), "integer >= 1"), ((True,), "integer >= 1"),
                                         ((5, "max"), "pooling")])
def test_reset_classifier_refuses_bad_arguments(tree, args, match):
    with pytest.raises(ValueError, match=match):
        tree.reset_classifier(*args)
    assert tree.num_classes == 10


def test_reset_classifier_refuses_what_is_sized_by_the_classes():
    isc = ek.recipes.multi_exit(tiny())
    add_isc(isc)
    with pytest.raises(ValueError, match="before adding those heads"):
        isc.reset_classifier(3)
    learned = ek.wrap(tiny(), "tree", depth=1, halting="learned")
    heads = list(learned.heads)
    with pytest.raises(ValueError, match="halting = None"):
        learned.reset_classifier(3)
    assert learned.num_classes == 10 and all(a is b for a, b in zip(heads, learned.heads))  # left as it was
    learned.halting = None
    learned.reset_classifier(3)
    assert learned(X).shape == (3, 3)


# ------------------------------------------------------------------ gradient checkpointing
def test_grad_checkpointing_gives_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    plain = ek.wrap(tiny(drop_rate=0.0), "tree", depth=2).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    calls = []
    original = ensemble_module.checkpoint
    monkeypatch.setattr(ensemble_module, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    target = torch.tensor([1, 2, 3])
    for model in (plain, checkpointed):
        model.loss(model.forward_output(X), target).total.backward()
    assert len(calls) == 3  # one per level
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    calls.clear()
    with torch.no_grad():
        checkpointed(X)
    checkpointed.eval()(X)
    assert not calls  # only where a backward pass follows
    checkpointed.set_grad_checkpointing(False)
    assert not checkpointed.grad_checkpointing


# ------------------------------------------------------------------ feature_info
def test_feature_info_is_timms(tree):
    info = FeatureInfo(tree.feature_info, out_indices=(0, 1, 2))
    assert info.channels() == [8, 16, 64] and info.reduction() == [2, 2, 32]
    assert info.module_name() == ["nodes.0", "nodes.1", "nodes.3"]  # member 0's path
    assert tree.num_features == 64
    vit = ek.wrap(create_backbone("test_vit", num_classes=4, img_size=32), "independent", members=2)
    assert {(i["num_chs"], i["reduction"], i["fmt"]) for i in vit.feature_info} == {(64, 16, "NLC")}


def test_timm_features_come_from_the_named_nodes(tree):
    """feature_info's modules are real submodules whose outputs are the listed feature maps."""
    outputs = {}
    hooks = [tree.get_submodule(i["module"]).register_forward_hook(
        lambda _m, _a, out, name=i["module"]: outputs.setdefault(name, out)) for i in tree.feature_info]
    with torch.no_grad():
        tree(X)
    for hook in hooks:
        hook.remove()
    for info in tree.feature_info:
        assert outputs[info["module"]].shape[1] == info["num_chs"]
        assert X.shape[-1] // outputs[info["module"]].shape[-1] == info["reduction"]

