"""timm backbones: creating them by name, describing them as JSON, narrowing their width."""

from ensemblekit.backbones.factory import UnknownBackboneError, create_backbone
from ensemblekit.backbones.narrow import WIDTH_ARGS, narrow_model, width_arg
from ensemblekit.backbones.spec import (
    BackboneOptionError,
    BackboneSpecError,
    backbone_spec,
    build_backbone,
    check_backbone_options,
    check_backbone_spec,
    draw_split,
)

__all__ = ["WIDTH_ARGS", "BackboneOptionError", "BackboneSpecError", "UnknownBackboneError", "backbone_spec",
           "build_backbone", "check_backbone_options", "check_backbone_spec", "create_backbone", "draw_split",
           "narrow_model", "width_arg"]
