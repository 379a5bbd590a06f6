"""BatchNorm layers of timm backbones in their synchronised form, for multi-process training."""

from __future__ import annotations

from torch import nn

__all__ = ["convert_sync_batchnorm"]


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm, timm's ``BatchNormAct2d`` included, turned into its synchronised form.

    timm's converter (torch's own skips timm's fused BatchNorm + activation
    layers); the module is changed in place where possible and returned.
    """
    from timm.layers import convert_sync_batchnorm as convert

    return convert(module)
