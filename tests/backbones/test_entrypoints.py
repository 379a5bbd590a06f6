"""ensemblekit's recipes as timm models: timm.create_model("ek_hne_resnet18", depth=4) builds an ensemble."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from timm.data import resolve_model_data_config

import ensemblekit as ek
from ensemblekit.backbones import UnknownBackboneError
from ensemblekit.backbones.entrypoints import (
    BACKBONES,
    NARROWABLE,
    TimmEntrypointError,
    entrypoint_name,
    register_timm_model,
    registered_timm_models,
)
from ensemblekit.components.losses import HierarchicalDistillation

TINY = {"stem_width": 8, "channels": [8, 16, 32, 64]}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_import_registers_every_recipe_with_the_listed_backbones():
    names = timm.list_models("ek_*")
    assert set(registered_timm_models()) <= set(names)
    for backbone in BACKBONES:
        for recipe in ("hne", "multi_exit", "irene"):
            assert timm.is_model(entrypoint_name(recipe, backbone))
    assert "ek_ensemblenet_resnet18" in names and "ek_ensemblenet_efficientnet_b0" not in names  # no width argument


def test_narrowable_lists_the_backbones_with_a_width_argument():
    from ensemblekit.backbones import width_arg

    assert {b for b in BACKBONES if width_arg(b) is not None} == NARROWABLE


@pytest.mark.parametrize("imports", [
    "import ensemblekit; import timm",  # isort's order: ensemblekit before timm
    "import timm; import ensemblekit",
    "import ensemblekit as ek; ek.split; import timm",  # ensemblekit's own code imports timm first
    "import ensemblekit.splitting.timm; import timm",  # ... while a module of ensemblekit is half-initialised
])
def test_the_entrypoints_are_registered_whichever_is_imported_first(imports):
    code = (f"{imports}; import sys; assert 'ensemblekit.backbones.entrypoints' in sys.modules; "
            "print(timm.create_model('ek_hne_resnet10t', depth=1, num_classes=3).num_members)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"


def test_import_ensemblekit_alone_imports_neither_timm_nor_torch():
    code = "import sys, ensemblekit; print('timm' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False False", out.stderr


def test_create_model_builds_the_recipe():
    torch.manual_seed(0)
    ens = timm.create_model("ek_hne_resnet18", depth=4, num_classes=10, **TINY)
    assert isinstance(ens, ek.Ensemble) and ens.num_members == 16 and ens.num_classes == 10
    assert isinstance(ens.loss_strategy, HierarchicalDistillation)
    assert ens(X).shape == (2, 10)
    assert ens.heads[0].fc.weight.shape == (10, 64)  # the widths went to the backbone
    chain = timm.create_model("ek_multi_exit_resnet10t", num_classes=3, exits=[2, 4], **TINY)
    assert chain.num_members == 2
    assert timm.create_model("ek_irene_resnet10t", members=2, num_classes=3, **TINY).num_members == 2


def test_data_config_is_the_backbones():
    ens = timm.create_model("ek_hne_resnet10t", depth=1, num_classes=3, **TINY)
    config = resolve_model_data_config(ens)
    assert config == resolve_model_data_config(timm.create_model("resnet10t"))
    assert config["input_size"] == (3, 176, 176)
    assert ens.pretrained_cfg["architecture"] == "ek_hne_resnet10t"
    assert timm.models.get_pretrained_cfg("ek_hne_resnet10t").input_size == (3, 176, 176)


def test_an_ensemble_from_timm_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    ens = timm.create_model("ek_hne_resnet10t", depth=1, num_classes=3, **TINY).eval()
    ek.save(ens, tmp_path / "model.ek")
    with torch.no_grad():
        assert torch.equal(ek.load(tmp_path / "model.ek")(X), ens(X))


def test_pretrained_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet10t", num_classes=3, **TINY)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    ens = timm.create_model("ek_hne_resnet10t", pretrained=True, depth=1, num_classes=3, **TINY,
                            pretrained_cfg_overlay={"file": str(tmp_path / "weights.pth")})
    assert ens.init_mode == "pretrained"  # init="auto": the members start from the weights
    stem = dict(ens.nodes[0].named_parameters())
    for name, value in source.named_parameters():
        if name in stem:
            assert torch.equal(stem[name], value), name


def test_timm_checkpoint_path_loads_an_ensembles_state_dict(tmp_path):
    torch.manual_seed(0)
    ens = timm.create_model("ek_hne_resnet10t", depth=1, num_classes=3, **TINY).eval()
    torch.save(ens.state_dict(), tmp_path / "ens.pth")
    again = timm.create_model("ek_hne_resnet10t", depth=1, num_classes=3, **TINY,
                              checkpoint_path=str(tmp_path / "ens.pth")).eval()
    with torch.no_grad():
        assert torch.equal(again(X), ens(X))


def test_backbone_kwargs_for_names_the_recipe_takes_too():
    vit = timm.create_model("ek_hne_vit_tiny_patch16_224", depth=1, num_classes=3,
                            backbone_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32})
    assert vit.num_members == 2 and vit.num_features == 32
    assert resolve_model_data_config(vit)["input_size"] == (3, 32, 32)
    with pytest.raises(TimmEntrypointError, match="stem_width given for the backbone both"):
        timm.create_model("ek_hne_resnet10t", depth=1, stem_width=8, backbone_kwargs={"stem_width": 8})


def test_clear_errors():
    with pytest.raises(TimmEntrypointError, match="no features_only mode.*forward_features"):
        timm.create_model("ek_hne_resnet10t", features_only=True)
    with pytest.raises(TimmEntrypointError, match="deptth.*the hne recipe takes .*depth"):
        timm.create_model("ek_hne_resnet10t", deptth=2)
    with pytest.raises(UnknownBackboneError, match="not a timm backbone"):
        register_timm_model("hne", "resnet_nope")
    with pytest.raises(TimmEntrypointError, match="taken"):
        register_timm_model("hne", "resnet10t", name="resnet18")
    with pytest.raises(TimmEntrypointError, match="taken"):
        register_timm_model("multi_exit", "resnet10t", name="ek_hne_resnet10t")


def test_register_another_pair():
    name = register_timm_model("multi_exit", "test_convnext")
    assert name == "ek_multi_exit_test_convnext" and register_timm_model("multi_exit", "test_convnext") == name
    assert timm.create_model(name, num_classes=4).num_members >= 2
