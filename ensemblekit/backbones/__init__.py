"""timm backbones: creating them by name and narrowing their width."""

from ensemblekit.backbones.factory import UnknownBackboneError, create_backbone
from ensemblekit.backbones.narrow import WIDTH_ARGS, narrow_model, width_arg

__all__ = ["WIDTH_ARGS", "UnknownBackboneError", "create_backbone", "narrow_model", "width_arg"]
