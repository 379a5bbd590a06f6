"""What a timm backbone is, as JSON, and fresh instances of it.

A *backbone spec* is ``{"kind": "timm", "name": <architecture>, "kwargs": {...}}``:
enough to build the same architecture again with
[`build_backbone()`][ensemblekit.backbones.spec.build_backbone], freshly initialised by the backbone's own rule
(timm's ``init_weights``, zero-initialised last norms, truncated normals, ...) and never downloading anything.
Ensembles use it to draw every member's copy of a block from that rule
([`draw_split()`][ensemblekit.backbones.spec.draw_split]), and checkpoints to rebuild an ensemble.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import timm
import torch
from torch import nn

from ensemblekit.core.blocks import BlockSplit
from ensemblekit.core.heads import classifier_names, copy_with_state
from ensemblekit.errors import EnsembleKitError
from ensemblekit.splitting.timm import img_size_attr, input_channels, is_timm_model

__all__ = ["PRETRAINED_ATTR", "REFUSED_OPTIONS", "SPEC_ATTR", "BackboneOptionError", "BackboneSpecError",
           "backbone_spec", "build_backbone", "check_backbone_options", "check_backbone_spec", "declared_pretrained",
           "draw_split", "with_fresh_classifier"]

SPEC_ATTR = "ensemblekit_spec"
"""Attribute where [`create_backbone()`][ensemblekit.backbones.factory.create_backbone] records the spec of the model it
made."""
PRETRAINED_ATTR = "ensemblekit_pretrained"
"""Attribute where [`create_backbone()`][ensemblekit.backbones.factory.create_backbone] records whether it loaded
weights."""


REFUSED_OPTIONS = ("checkpoint_path",)
"""Keywords of ``timm.create_model`` ensemblekit refuses: timm would read a file with ``torch.load`` (pickle)."""


class BackboneSpecError(EnsembleKitError, ValueError):
    """A backbone spec that does not describe a timm model."""


class BackboneOptionError(EnsembleKitError, ValueError):
    """A backbone option ensemblekit refuses (``checkpoint_path``); the message names it and says what to use."""


def check_backbone_options(options: Any, where: str = "backbone option") -> None:
    """Refuse the options of [`REFUSED_OPTIONS`][ensemblekit.backbones.spec.REFUSED_OPTIONS], from a config, a
    spec or a checkpoint's manifest.

    ensemblekit reads weights from safetensors only; timm reads a ``checkpoint_path``
    with ``torch.load`` from anywhere on disk.

    Raises:
        BackboneOptionError: ``options`` holds one; the message names it and its value.
    """
    for key in REFUSED_OPTIONS:
        if isinstance(options, dict) and key in options:
            raise BackboneOptionError(
                f"{where} {key}={options[key]!r} is refused: timm would read that file with torch.load (pickle), "
                "and ensemblekit reads weights from JSON and safetensors only. Start from weights with "
                "pretrained=True and pretrained_cfg_overlay={'file': '<weights>.safetensors'}, or continue a run "
                "from its ensemblekit checkpoint (--resume, ek.load)")


def check_backbone_spec(spec: Any, where: str = "backbone spec") -> str:
    """The architecture name of a valid backbone spec (see the module docstring).

    A spec rebuilds the architecture only, freshly initialised: its ``kwargs``
    may not load weights (``pretrained``, [`REFUSED_OPTIONS`][ensemblekit.backbones.spec.REFUSED_OPTIONS]).

    Raises:
        BackboneSpecError: ``spec`` is not a timm spec.
        BackboneOptionError: its ``kwargs`` name a refused option.
    """
    name = spec.get("name") if isinstance(spec, dict) else None
    kwargs = spec.get("kwargs", {}) if isinstance(spec, dict) else None
    if (not isinstance(spec, dict) or spec.get("kind") != "timm" or not isinstance(name, str) or not timm.is_model(name)
            or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs)):
        raise BackboneSpecError(f"{where}: not a timm backbone spec: {spec!r}; expected "
                                "{'kind': 'timm', 'name': <timm architecture>, 'kwargs': {...}}")
    check_backbone_options(kwargs, f"{where}: option")
    if "pretrained" in kwargs:
        raise BackboneSpecError(f"{where}: kwargs hold pretrained={kwargs['pretrained']!r}; a spec rebuilds the "
                                "architecture only (its weights come from elsewhere)")
    return name


def backbone_spec(model: nn.Module) -> dict[str, Any] | None:
    """The spec of a timm ``model``, or ``None`` when it cannot be verified.

    A model made by [`create_backbone()`][ensemblekit.backbones.factory.create_backbone] carries its
    spec. For one made with ``timm.create_model`` it is inferred from
    ``pretrained_cfg["architecture"]``, ``num_classes``, the input channels and
    a non-default image size. Either way the spec is returned only when a fresh
    instance built from it (on the meta device) has exactly the model's
    ``state_dict`` names and shapes. Keywords that change only initial values
    (``zero_init_last=False``, ``init_values``) cannot be read off a model:
    create it with ``create_backbone`` to have them recorded.

    Examples:
        >>> backbone_spec(timm.create_model("resnet10t", num_classes=3))
        {'kind': 'timm', 'name': 'resnet10t', 'kwargs': {'num_classes': 3}}
        >>> backbone_spec(nn.Linear(2, 2)) is None
        True
    """
    if not is_timm_model(model):
        return None
    recorded = getattr(model, SPEC_ATTR, None)
    spec: dict[str, Any] | None
    if isinstance(recorded, dict):
        spec = {**recorded, "kwargs": {**recorded["kwargs"], "num_classes": _num_classes(model)}}
    else:
        spec = _inferred_spec(model)
    return spec if spec is not None and _same_shapes(model, spec) else None


def build_backbone(spec: dict[str, Any]) -> nn.Module:
    """A fresh instance of the backbone ``spec`` describes: random init, nothing downloaded.

    It draws from the global torch RNG, so ``torch.manual_seed`` makes it reproducible.

    Raises:
        BackboneSpecError: ``spec`` is not a timm spec.
        BackboneOptionError: its ``kwargs`` would load weights from a file.
    """
    name = check_backbone_spec(spec)
    return timm.create_model(name, pretrained=False, **spec.get("kwargs", {}))


def declared_pretrained(model: nn.Module) -> bool | None:
    """Whether ``create_backbone`` loaded weights into ``model``; ``None`` for a model it did not make."""
    value = getattr(model, PRETRAINED_ATTR, None)
    return value if isinstance(value, bool) else None


def draw_split(split: BlockSplit, spec: dict[str, Any]) -> BlockSplit:
    """A new draw of ``split``: copies of its blocks and head holding a fresh backbone's tensors.

    The blocks of a timm split keep the backbone's parameter names, so each
    block copy takes its parameters and buffers by name from one fresh
    instance ([`build_backbone()`][ensemblekit.backbones.spec.build_backbone]), cast to the block's dtype and device.
    """
    fresh = build_backbone(spec)
    state = {**dict(fresh.named_parameters()), **dict(fresh.named_buffers())}
    for module in (*split.blocks, split.head):
        missing = [k for k in module.state_dict() if k not in state]
        if missing:
            raise BackboneSpecError(f"a fresh {spec['name']} has no {missing[:3]}: the split's modules are not named "
                                    "like the backbone's")
    return dataclasses.replace(split, blocks=[copy_with_state(b, state) for b in split.blocks],
                               head=copy_with_state(split.head, state), fresh=None)


def with_fresh_classifier(split: BlockSplit, spec: dict[str, Any]) -> BlockSplit:
    """``split`` whose head's classifier (the layers with ``num_classes`` outputs) is a fresh instance's.

    [`ensemblekit.wrap()`][ensemblekit.build.wrap] gives a new ``num_classes`` a classifier drawn by the
    backbone's own rule.
    """
    names = classifier_names(split.head, split.num_classes)
    fresh = build_backbone(spec).state_dict()
    state = {k: v for k, v in fresh.items() if any(k.startswith(f"{n}.") for n in names)}
    return dataclasses.replace(split, head=copy_with_state(split.head, state))


def _inferred_spec(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not isinstance(name, str) or not timm.is_model(name):
        return None
    kwargs: dict[str, Any] = {"num_classes": _num_classes(model)}
    in_chans = input_channels(model)[0]
    if in_chans <= 4 and in_chans != int(cfg.get("input_size", (3,))[0]):  # more: a space-to-depth stem
        kwargs["in_chans"] = in_chans
    size = img_size_attr(model)
    if size is not None and list(size) != list(cfg.get("input_size", (3, 0, 0))[-2:]):
        kwargs["img_size"] = list(size)
    return {"kind": "timm", "name": name, "kwargs": kwargs}


def _num_classes(model: nn.Module) -> int:
    return int(getattr(model, "num_classes"))  # noqa: B009 - an nn.Module attribute mypy cannot type


def _same_shapes(model: nn.Module, spec: dict[str, Any]) -> bool:
    """Whether a fresh instance of ``spec`` has ``model``'s state_dict names and shapes (and the spec is JSON)."""
    try:
        json.dumps(spec)
    except (TypeError, ValueError):
        return False
    try:
        with torch.device("meta"):
            fresh = build_backbone(spec)
    except Exception:  # noqa: BLE001 - some models cannot be built on meta; build them for real
        try:
            fresh = build_backbone(spec)
        except Exception:  # noqa: BLE001 - the spec does not build: not this model's
            return False
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return ours == {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
