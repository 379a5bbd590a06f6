"""ensemblekit's recipes as timm models: ``timm.create_model("ek_hne_resnet18", depth=4)`` builds an ensemble.

``import ensemblekit`` registers an entrypoint ``ek_<recipe>_<backbone>`` with
timm's ``register_model`` for each built-in recipe (``RECIPES_REGISTERED``) and each
backbone of ``BACKBONES`` (EnsembleNet only for those with a width
argument); ``register_timm_model`` adds any other pair, a plugin's recipe
too. Then ``timm.create_model``, ``timm.list_models("ek_*")`` and timm's own
scripts take them like any timm model:

* keywords the recipe takes (``depth``, ``branching``, ``alpha``, ``exits``,
  ``members``, ``init``, ``halting``, ...) go to the recipe; every other
  keyword (``num_classes``, ``in_chans``, ``drop_rate``, widths, ...) goes to
  the backbone's ``timm.create_model``, and so do those in
  ``backbone_kwargs={...}`` (for a name both take, e.g. a ViT's ``depth``);
* ``pretrained=True`` loads the backbone's weights (from the hub, or from a
  local file with ``pretrained_cfg_overlay=dict(file=path)``), and a tag picks
  them (``ek_hne_resnet18.a1_in1k``); members then start from them
  (``init="auto"`` unless given);
* the ensemble's ``pretrained_cfg`` is the backbone's, named after the entrypoint,
  so ``timm.data.resolve_model_data_config`` gives the backbone's data config.

Ensembles have no ``features_only`` mode: use ``forward_features`` and
``feature_info`` (see ``docs/timm.md``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import timm
from timm.models import generate_default_cfgs, get_arch_pretrained_cfgs, register_model

from ensemblekit.core.registry import RECIPES, accepts, keywords
from ensemblekit.errors import EnsembleKitError

if TYPE_CHECKING:
    from torch import nn

# This module runs right after timm's own import (see ensemblekit._timm_hook), possibly while an ensemblekit module
# that imports timm is still half-initialised: at import it needs only timm, the registry and the errors; the
# factory and the narrowing code are imported when an entrypoint builds or fails.

__all__ = [
    "BACKBONES",
    "NARROWABLE",
    "PREFIX",
    "RECIPES_REGISTERED",
    "TimmEntrypointError",
    "build_timm_model",
    "entrypoint_name",
    "register_builtin_models",
    "register_timm_model",
    "registered_timm_models",
]

PREFIX = "ek_"
"""What the name of every entrypoint ensemblekit registers with timm starts with."""
RECIPES_REGISTERED = ("hne", "ensemblenet", "multi_exit", "irene")
"""The built-in recipes registered for every backbone of ``BACKBONES``."""
BACKBONES = (
    "resnet10t", "resnet18", "resnet34", "resnet50",
    "convnext_atto", "convnext_tiny",
    "efficientnet_b0", "mobilenetv3_large_100",
    "vit_tiny_patch16_224", "vit_small_patch16_224",
)
"""Backbones registered with every recipe of ``RECIPES_REGISTERED`` (EnsembleNet: those of ``NARROWABLE``)."""
NARROWABLE = frozenset({"resnet10t", "resnet18", "resnet34", "resnet50", "convnext_atto", "convnext_tiny",
                        "vit_tiny_patch16_224", "vit_small_patch16_224"})
"""The ``BACKBONES`` with a width argument (``ensemblekit.backbones.width_arg``), which EnsembleNet's narrower
branches need; spelt out so that registering imports nothing but timm (a test checks it against ``width_arg``)."""
_BACKBONE_FIRST = frozenset({"num_classes"})
"""Keywords that a recipe takes too but that belong to the backbone (its classifier)."""

default_cfgs: dict[str, Any] = {}  # read by timm's register_model: each entrypoint's pretrained configs
_registered: dict[str, tuple[str, str]] = {}


class TimmEntrypointError(EnsembleKitError, ValueError):
    """An ensemblekit timm entrypoint given something it cannot build, or a name taken by another model."""


def entrypoint_name(recipe: str, backbone: str) -> str:
    """``ek_<recipe>_<backbone>``: the timm name of ``recipe`` on ``backbone``.

    Examples:
        >>> entrypoint_name("hne", "resnet18")
        'ek_hne_resnet18'
    """
    return f"{PREFIX}{recipe}_{backbone}"


def registered_timm_models() -> dict[str, tuple[str, str]]:
    """``{timm name: (recipe, backbone)}`` of every entrypoint registered so far."""
    return dict(_registered)


def register_timm_model(recipe: str, backbone: str, name: str | None = None) -> str:
    """Make ``timm.create_model(name)`` build ``recipe`` on the timm model ``backbone``.

    The entrypoint takes the keywords of ``build_timm_model``. Its
    pretrained configs are the backbone's (tags included), named ``name``.
    Registering the same pair again under the same name does nothing.

    Args:
        recipe: a registered recipe ("hne", "ensemblenet", "multi_exit",
            "irene", or a plugin's); checked when a model is built.
        backbone: a timm architecture name.
        name: the timm name (default ``ek_<recipe>_<backbone>``).

    Returns:
        The name registered.

    Raises:
        UnknownBackboneError: ``backbone`` is not a timm model.
        TimmEntrypointError: ``name`` is taken by a timm model or another entrypoint.

    Examples:
        >>> register_timm_model("hne", "resnet26")
        'ek_hne_resnet26'
        >>> timm.create_model("ek_hne_resnet26", depth=1, num_classes=3).num_members
        2
    """
    name = name or entrypoint_name(recipe, backbone)
    if _registered.get(name) == (recipe, backbone):
        return name
    if not timm.is_model(backbone) or backbone.startswith(PREFIX):
        from ensemblekit.backbones.factory import UnknownBackboneError

        raise UnknownBackboneError(f"{backbone!r} is not a timm backbone; register_timm_model needs an architecture "
                                   "name such as 'resnet18'")
    if name in _registered or timm.is_model(name) or "." in name:
        raise TimmEntrypointError(f"cannot register {name!r}: the name is taken by another timm model"
                                  + (" (or holds a '.', which timm reads as a tag)" if "." in name else ""))

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return build_timm_model(recipe, backbone, pretrained=pretrained, name=name, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (f"ensemblekit's {recipe} recipe on timm's {backbone}; keywords as "
                          "ensemblekit.backbones.entrypoints.build_timm_model takes them.")
    cfgs: dict[str, Any] = {f"{name}.{key.partition('.')[2]}" if "." in key else name: cfg
                            for key, cfg in get_arch_pretrained_cfgs(backbone).items()}
    if cfgs:
        default_cfgs.update(generate_default_cfgs(cfgs))
    setattr(sys.modules[__name__], name, entrypoint)
    register_model(entrypoint)
    _registered[name] = (recipe, backbone)
    return name


def register_builtin_models() -> list[str]:
    """Register ``ek_<recipe>_<backbone>`` for ``RECIPES_REGISTERED`` and ``BACKBONES``; returns the names."""
    names = []
    for backbone in BACKBONES:
        for recipe in RECIPES_REGISTERED:
            if recipe == "ensemblenet" and backbone not in NARROWABLE:
                continue  # its branches are narrower copies: the backbone needs a width argument
            names.append(register_timm_model(recipe, backbone))
    return names


def build_timm_model(
    recipe: str,
    backbone: str,
    *,
    pretrained: bool = False,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    cache_dir: Any = None,
    backbone_kwargs: dict[str, Any] | None = None,
    name: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """The ensemble a timm entrypoint builds: ``recipe`` on a new ``backbone``.

    Args:
        recipe: a registered recipe.
        backbone: a timm architecture name.
        pretrained: load the backbone's weights (with ``pretrained_cfg_overlay=
            dict(file=path)`` from that file, else from the hub); members
            start from them unless ``init`` says otherwise.
        pretrained_cfg: a tag of the backbone's weights (``"a1_in1k"``), as
            ``timm.create_model("ek_hne_resnet18.a1_in1k")`` passes it.
        pretrained_cfg_overlay: entries replacing the backbone's pretrained
            config (``file``: a local weights file).
        cache_dir: where timm keeps downloaded weights.
        backbone_kwargs: keywords of the backbone's ``timm.create_model``
            (for names the recipe takes too, e.g. a ViT's ``depth``).
        name: the entrypoint's name, for the ensemble's ``pretrained_cfg``.
        **kwargs: keywords of the recipe (its signature, and ``wrap``'s for
            those that pass them on: ``init``, ``halting``, ``execution``, ...),
            the rest, and ``num_classes``, for the backbone.

    Raises:
        TimmEntrypointError: ``features_only`` is asked for, a keyword is given
            twice, or the backbone does not take a keyword (the message lists
            the recipe's).
    """
    if kwargs.pop("features_only", False):
        raise TimmEntrypointError(f"{name or recipe}: an ensemble has no features_only mode; create it without and "
                                  "use ens.forward_features(x) (every member's features) and ens.feature_info")
    factory = RECIPES.get(recipe).factory
    options = {k: v for k, v in kwargs.items() if k not in _BACKBONE_FIRST and accepts(factory, k)}
    given = dict(backbone_kwargs or {})
    rest = {k: v for k, v in kwargs.items() if k not in options}
    twice = sorted(set(given) & set(rest))
    if twice:
        raise TimmEntrypointError(f"{', '.join(twice)} given for the backbone both as keywords and in "
                                  "backbone_kwargs")
    given.update(rest)
    if pretrained_cfg is not None:
        given["pretrained_cfg"] = _tag(pretrained_cfg)
    if cache_dir is not None:
        given["cache_dir"] = cache_dir
    if accepts(factory, "init"):
        options.setdefault("init", "auto")  # pretrained weights: members start from them
    from ensemblekit.backbones.factory import create_backbone

    try:
        model = create_backbone(backbone, pretrained=pretrained, pretrained_cfg_overlay=pretrained_cfg_overlay, **given)
    except TypeError as err:
        if "unexpected keyword" not in str(err):
            raise
        known = sorted(k for k in keywords(factory) if k not in _BACKBONE_FIRST)
        raise TimmEntrypointError(f"{name or backbone}: {err}; the {recipe} recipe takes {', '.join(known)}, every "
                                  f"other keyword goes to timm's {backbone}") from err
    ensemble = RECIPES.create(recipe, backbone=model, **options)
    if name is not None and isinstance(getattr(ensemble, "pretrained_cfg", None), dict):
        ensemble.pretrained_cfg["architecture"] = name
    return ensemble


def _tag(pretrained_cfg: Any) -> Any:
    """A tag (``"a1_in1k"``) stays; a config (a dict or timm's ``PretrainedCfg``) becomes its tag when it has one."""
    if isinstance(pretrained_cfg, str):
        return pretrained_cfg
    tag = pretrained_cfg.get("tag") if isinstance(pretrained_cfg, dict) else getattr(pretrained_cfg, "tag", None)
    return tag if isinstance(tag, str) and tag else pretrained_cfg


register_builtin_models()
