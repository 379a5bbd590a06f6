"""timm backbones: creating them by name, describing them as JSON, narrowing their width.

The names below are imported on first use, so that ``ensemblekit.backbones.entrypoints``
(which registers ensemblekit's models with timm right after timm's own import) can be
imported while the splitting code is still being initialised.
"""

from importlib import import_module
from typing import Any

_LAZY = {
    "WIDTH_ARGS": "ensemblekit.backbones.narrow",
    "BackboneOptionError": "ensemblekit.backbones.spec",
    "BackboneSpecError": "ensemblekit.backbones.spec",
    "UnknownBackboneError": "ensemblekit.backbones.factory",
    "backbone_spec": "ensemblekit.backbones.spec",
    "build_backbone": "ensemblekit.backbones.spec",
    "check_backbone_options": "ensemblekit.backbones.spec",
    "check_backbone_spec": "ensemblekit.backbones.spec",
    "create_backbone": "ensemblekit.backbones.factory",
    "draw_split": "ensemblekit.backbones.spec",
    "narrow_model": "ensemblekit.backbones.narrow",
    "width_arg": "ensemblekit.backbones.narrow",
}

__all__ = ["WIDTH_ARGS", "BackboneOptionError", "BackboneSpecError", "UnknownBackboneError", "backbone_spec",
           "build_backbone", "check_backbone_options", "check_backbone_spec", "create_backbone", "draw_split",
           "narrow_model", "width_arg"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ensemblekit.backbones' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
