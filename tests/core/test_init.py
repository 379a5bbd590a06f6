"""Where members start (``init=``): i.i.d. draws of the backbone's own initialisation, or its weights on purpose."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import ensemblekit as ek
from ensemblekit.backbones import backbone_spec, build_backbone, create_backbone
from ensemblekit.core.initialisation import NOISE_SCALE, InitError, InitWarning
from tests.conftest import toy_split


def copies_by_block(ens):
    """``{block: [node modules in copy order]}`` plus ``"head"``: the copies of the last block's head."""
    out: dict = {}
    for node in ens.graph.nodes:
        out.setdefault(node.block, []).append(ens.nodes[node.index])
    out["head"] = list(ens.heads)
    return out


def assert_same_statistics(copies):
    """Every copy's per-parameter mean and std match copy 0's within sampling error; constants are equal."""
    reference = dict(copies[0].named_parameters())
    for k, other in enumerate(copies[1:], 1):
        for name, p in other.named_parameters():
            ref, p = reference[name].detach().float(), p.detach().float()
            if bool((ref == ref.flatten()[0]).all()):
                assert torch.equal(p, ref), f"copy {k} {name}: {ref.flatten()[0]} at init, got {p.flatten()[:3]}"
                continue
            n = ref.numel()
            if n < 64:
                continue
            tol = 0.05 + 5 / math.sqrt(2 * n)
            assert abs(p.std() / ref.std() - 1) < tol, f"copy {k} {name}: std {p.std():.4f} vs {ref.std():.4f}"
            assert abs(p.mean() - ref.mean()) < 6 * ref.std() / math.sqrt(n) + 1e-6 * ref.abs().max(), (
                f"copy {k} {name}: mean {p.mean():.4f} vs {ref.mean():.4f}")


def zero_initialised(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.ndim == 1 and "weight" in n and not p.any()}


@pytest.mark.parametrize(("name", "options", "zero_init"), [
    ("resnet10t", {}, True),  # timm zero-initialises the last BN of each residual block
    ("vit_tiny_patch16_224", {"img_size": 32}, False),
])
def test_every_copy_is_drawn_by_the_backbones_own_rule(name, options, zero_init):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **options)
    ens = ek.wrap(model, "tree", depth=2)
    assert ens.init_mode == "reinit"
    for copies in copies_by_block(ens).values():
        assert_same_statistics(copies)
    zeros = zero_initialised(model)
    assert bool(zeros) == zero_init
    x = torch.randn(2, 3, 32, 32)  # untrained weights are one draw already: member 0 is the given model
    assert torch.allclose(ens.eval().forward_members(x)[:, 0], model.eval()(x), atol=1e-5)
    for node in ens.nodes:  # zero in every member
        own = {n for n, _ in node.named_parameters()}
        assert zeros & own <= zero_initialised(node)


def test_vit_head_std_is_timms_in_every_member():
    torch.manual_seed(0)
    ens = ek.wrap(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10), "independent", members=3)
    stds = [float(h.get_submodule("head").weight.detach().std()) for h in ens.heads]
    assert all(abs(s - 0.02) < 0.003 for s in stds), stds  # trunc_normal(std=.02); PyTorch's default gives 0.042


def test_reinit_members_differ_and_a_seed_reproduces_them():
    def build(seed):
        torch.manual_seed(seed)
        return ek.wrap(timm.create_model("resnet10t", num_classes=4), "tree", depth=2, init="reinit")

    ens = build(0)
    for copies in copies_by_block(ens).values():
        weights = [next(p for p in c.parameters() if p.ndim > 1).detach() for c in copies]
        assert all(not torch.equal(weights[i], weights[j]) for i in range(len(weights)) for j in range(i))
    again, other = build(0), build(1)
    assert all(torch.equal(a, b) for a, b in zip(ens.state_dict().values(), again.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(ens.state_dict().values(), other.state_dict().values()))


def test_num_classes_given_to_wrap_gets_the_backbones_classifier_rule():
    torch.manual_seed(0)
    ens = ek.wrap(timm.create_model("vit_tiny_patch16_224", img_size=32), "independent", members=2, num_classes=7)
    assert all(abs(float(h.get_submodule("head").weight.detach().std()) - 0.02) < 0.003 for h in ens.heads)
    assert ens(torch.randn(1, 3, 32, 32)).shape == (1, 7)


# ------------------------------------------------------------------ pretrained weights from a file
@pytest.fixture
def weights_file(tmp_path):
    """A resnet10t state_dict that looks trained (every tensor moved), saved with safetensors."""
    torch.manual_seed(123)
    model = timm.create_model("resnet10t", num_classes=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to fetch weights over the network fails the test."""
    from timm.models import _builder

    def refuse(*args, **kwargs):
        raise AssertionError("tried the network")

    for name in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
        monkeypatch.setattr(_builder, name, refuse)


def pretrained_backbone(path):
    # num_classes in the overlay: timm keeps a file's classifier only when it matches the config's
    overlay = {"file": str(path), "num_classes": 5}
    return create_backbone("resnet10t", num_classes=5, pretrained=True, pretrained_cfg_overlay=overlay)


def test_create_backbone_loads_a_weights_file_without_the_network(weights_file, offline):
    path, state = weights_file
    model = pretrained_backbone(path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert backbone_spec(model) == {"kind": "timm", "name": "resnet10t", "kwargs": {"num_classes": 5}}


def node_state(ens, index):
    return ens.nodes[index].state_dict()


@pytest.mark.parametrize("init", ["auto", "pretrained", "pretrained+noise", "copy", "reinit"])
def test_every_member_starts_where_init_says(weights_file, offline, init):
    path, state = weights_file
    torch.manual_seed(0)
    ens = ek.wrap(pretrained_backbone(path), "tree", depth=2, init=init)
    mode = "pretrained" if init == "auto" else init
    assert ens.init_mode == mode
    for node in ens.nodes:
        for name, value in node.state_dict().items():
            given = state[name]
            if mode in ("pretrained", "copy") or not value.is_floating_point():
                assert torch.equal(value, given), name
            elif mode == "pretrained+noise":
                if name in dict(node.named_parameters()) and given.numel() > 1:
                    assert not torch.equal(value, given), name
                    ratio = float((value - given).std() / (given.std() * NOISE_SCALE))
                    assert given.numel() < 64 or abs(ratio - 1) < 0.5, (name, ratio)
                else:
                    assert torch.equal(value, given), name  # buffers (running statistics) are kept
            elif given.numel() > 1 and name in dict(node.named_parameters()):  # reinit: no given weight survives
                assert not torch.equal(value, given), name
    classifiers = [h.fc.weight.detach() for h in ens.heads]
    if mode == "copy":
        assert all(torch.equal(w, state["fc.weight"]) for w in classifiers)
    else:  # each member's classifier is its own draw
        assert all(not torch.equal(w, state["fc.weight"]) for w in classifiers)
        assert all(not torch.equal(a, b) for i, a in enumerate(classifiers) for b in classifiers[:i])
        bound = 1 / math.sqrt(classifiers[0].shape[1])  # nn.Linear's rule, which timm's ResNet keeps
        assert all(float(w.abs().max()) <= bound for w in classifiers)
    if mode.startswith("pretrained"):  # the rest of the head keeps the weights
        for head in ens.heads:
            assert all(torch.equal(v, state[k]) for k, v in head.state_dict().items() if not k.startswith("fc."))


def test_noise_scale_is_an_option(weights_file, offline):
    path, state = weights_file
    ens = ek.wrap(pretrained_backbone(path), "independent", members=2, init={"name": "pretrained+noise", "scale": 0.1})
    value, given = ens.nodes[-1].state_dict()["layer4.0.conv1.weight"], state["layer4.0.conv1.weight"]
    assert abs(float((value - given).std() / given.std()) - 0.1) < 0.01
    with pytest.raises(InitError, match="takes no scale"):
        ek.wrap(pretrained_backbone(path), "independent", members=2, init={"name": "pretrained", "scale": 0.1})


def test_auto_reads_trained_weights_off_a_users_timm_model(weights_file):
    _, state = weights_file
    scratch = timm.create_model("resnet10t", num_classes=5)
    assert ek.wrap(scratch, "independent", members=2).init_mode == "reinit"
    trained = timm.create_model("resnet10t", num_classes=5)
    trained.load_state_dict(state)
    assert ek.wrap(trained, "independent", members=2).init_mode == "pretrained"
    scratch_declared = create_backbone("resnet10t", num_classes=5)
    assert ek.wrap(scratch_declared, "independent", members=2).init_mode == "reinit"


# ------------------------------------------------------------------ hand-made splits (no spec)
def test_hand_made_split_copies_are_redrawn_by_reset_parameters():
    torch.manual_seed(0)
    split = toy_split(3)
    ens = ek.wrap(split, "tree", depth=2)
    assert ens.init_mode == "reinit"
    first = ens.nodes[0].state_dict()
    assert all(torch.equal(v, split.blocks[0].state_dict()[k]) for k, v in first.items())  # untrained: kept
    leaves = copies_by_block(ens)[2]
    assert not torch.equal(leaves[0][0].weight, leaves[1][0].weight)


def test_hand_made_trained_split_is_never_mixed_with_fresh_copies():
    torch.manual_seed(0)
    split = toy_split(3)
    with torch.no_grad():
        for p in [*split.blocks, split.head]:
            for q in p.parameters():
                q.add_(1.0)
    assert ek.wrap(split, "tree", depth=2).init_mode == "pretrained"
    ens = ek.wrap(split, "tree", depth=2, init="reinit")
    for node in ens.nodes:  # the first copy is redrawn too
        assert bool((node[1].weight == 1).all()) and bool((node[1].bias == 0).all())
    pretrained = ek.wrap(split, "tree", depth=2, init="pretrained")
    assert all(torch.equal(n[0].weight, split.blocks[2][0].weight) for n in copies_by_block(pretrained)[2])
    fcs = [h[2].weight for h in pretrained.heads]
    assert all(not torch.equal(w, split.head[2].weight) for w in fcs)


def test_pretrained_needs_a_classifier_to_redraw():
    split = toy_split(2)
    split.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    split.num_classes = 3
    with pytest.raises(InitError, match="no linear or conv layer with 3 outputs"):
        ek.wrap(split, "independent", members=2, init="pretrained")


# ------------------------------------------------------------------ specs
def test_spec_of_a_users_timm_model_is_inferred_and_verified():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    spec = backbone_spec(vit)
    assert spec == {"kind": "timm", "name": "vit_tiny_patch16_224", "kwargs": {"num_classes": 10, "img_size": [32, 32]}}
    assert json.loads(json.dumps(spec)) == spec
    fresh = build_backbone(spec)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in vit.state_dict().items()}
    changed = timm.create_model("resnet10t", num_classes=10)
    changed.fc = nn.Linear(512, 3)  # no longer what its config builds
    assert backbone_spec(changed) is None
    assert backbone_spec(nn.Sequential(nn.Linear(2, 2))) is None


def test_unknown_init_is_rejected():
    with pytest.raises(InitError, match="init must be one of"):
        ek.wrap(toy_split(2), "independent", members=2, init="random")


def test_a_timm_model_that_cannot_be_rebuilt_warns_and_create_backbone_records_it():
    width = {"stem_width": 8, "channels": [8, 16, 32, 64]}
    with pytest.warns(InitWarning, match="create_backbone"):
        ek.wrap(timm.create_model("resnet10t", num_classes=3, **width), "tree", depth=1)
    model = create_backbone("resnet10t", num_classes=3, **width)
    assert backbone_spec(model) == {"kind": "timm", "name": "resnet10t", "kwargs": {"num_classes": 3, **width}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", InitWarning)
        ens = ek.wrap(model, "tree", depth=1)
    for copies in copies_by_block(ens).values():
        assert_same_statistics(copies)


def test_copy_with_state_uses_the_given_tensors_and_checks_shapes():
    from ensemblekit.core.heads import StateShapeError, copy_with_state

    layer, weight = nn.Linear(2, 3), torch.ones(3, 2, dtype=torch.float64)
    layer.weight.requires_grad_(False)
    clone = copy_with_state(layer, {"weight": weight})
    assert torch.equal(clone.weight, torch.ones(3, 2)) and clone.weight.dtype == torch.float32
    assert not clone.weight.requires_grad and torch.equal(clone.bias, layer.bias) and clone.bias is not layer.bias
    with pytest.raises(StateShapeError, match=r"weight: the new value has shape \(2, 2\)"):
        copy_with_state(layer, {"weight": torch.zeros(2, 2)})
