"""Creating timm backbones: the one place a model is built by name."""

from __future__ import annotations

import difflib
import json
from typing import Any

import timm
from torch import nn

from ensemblekit.backbones.spec import PRETRAINED_ATTR, SPEC_ATTR, check_backbone_options
from ensemblekit.errors import EnsembleKitError

__all__ = ["UnknownBackboneError", "create_backbone"]


class UnknownBackboneError(EnsembleKitError, ValueError):
    """A name that is not a timm model; the message lists close matches."""


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """The timm model ``name``, randomly initialised unless ``pretrained``.

    The model records its spec (``ensemblekit.backbones.spec``) and whether it
    holds loaded weights, so that [`ensemblekit.wrap()`][ensemblekit.build.wrap] draws copies by the
    backbone's own rule and picks ``init="pretrained"`` for loaded weights.

    Args:
        name: a timm model name, e.g. "resnet18".
        **kwargs: keywords of ``timm.create_model`` (``num_classes``, ``in_chans``,
            widths, ...), among them ``pretrained``: load weights. With ``pretrained_cfg_overlay=dict(file=path)``
            (or ``state_dict=...``) they come from that file, never from the
            network; without one timm downloads the architecture's default weights.
            ``checkpoint_path`` is refused (timm would read it with ``torch.load``):
            give a ``.safetensors`` file through ``pretrained_cfg_overlay`` instead.

    Raises:
        UnknownBackboneError: ``name`` is not a timm model (close names are suggested).
        BackboneOptionError: ``checkpoint_path`` was given.

    Examples:
        >>> create_backbone("resnet10t", num_classes=3).num_classes
        3
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownBackboneError(f"unknown timm model {name!r}{hint}")
    check_backbone_options(kwargs)
    pretrained = bool(kwargs.pop("pretrained", False))
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    if pretrained and overlay and (overlay.get("file") or overlay.get("state_dict") is not None):
        overlay = {**overlay, "source": overlay.get("source") or ""}  # timm would try the hub before a file
    model = timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs)
    spec = {"kind": "timm", "name": name, "kwargs": {k: v for k, v in kwargs.items() if k != "cache_dir"}}
    try:
        json.dumps(spec)
    except (TypeError, ValueError):
        pass  # not recordable: backbone_spec infers what it can from the model
    else:
        setattr(model, SPEC_ATTR, spec)
    setattr(model, PRETRAINED_ATTR, bool(pretrained))
    return model
