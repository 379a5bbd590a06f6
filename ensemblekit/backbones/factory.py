"""Creating timm backbones: the one place a model is built by name."""

from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import nn

from ensemblekit.errors import EnsembleKitError

__all__ = ["UnknownBackboneError", "create_backbone"]


class UnknownBackboneError(EnsembleKitError, ValueError):
    """A name that is not a timm model; the message lists close matches."""


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """The timm model ``name``, never with pretrained weights (nothing is downloaded).

    Args:
        name: a timm model name, e.g. "resnet18".
        **kwargs: keywords of ``timm.create_model`` (``num_classes``, ``in_chans``, widths).

    Raises:
        UnknownBackboneError: ``name`` is not a timm model (close names are suggested).

    Examples:
        >>> create_backbone("resnet10t", num_classes=3).num_classes
        3
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownBackboneError(f"unknown timm model {name!r}{hint}")
    return timm.create_model(name, pretrained=False, **kwargs)
