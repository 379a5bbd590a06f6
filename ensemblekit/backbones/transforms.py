"""Image preprocessing as timm does it: a backbone's data config and the transforms made from it.

A *data config* is what ``timm.data.resolve_data_config`` returns: ``input_size``
``(C, H, W)``, ``interpolation``, ``mean``, ``std``, ``crop_pct`` and
``crop_mode``, from the backbone's ``pretrained_cfg`` (an ensemble carries its
backbone's). ``image_transform`` makes timm's training or evaluation
transform of it (``timm.data.create_transform``), which ImageFolder datasets use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg
from torch import nn

from ensemblekit.backbones.factory import UnknownBackboneError

__all__ = ["data_config", "image_transform"]


def data_config(source: nn.Module | str | None = None, *, image_size: int | tuple[int, int] | None = None,
                in_chans: int | None = None, use_test_size: bool = False) -> dict[str, Any]:
    """timm's data config of a backbone, with the image size and channels given here put first.

    Args:
        source: a timm model or an ensemble (its ``pretrained_cfg``), a timm
            architecture name, tag allowed (``"resnet18.a1_in1k"``; nothing is
            built), or ``None`` for timm's defaults (224, ImageNet mean and std).
        image_size: ``S`` or ``(H, W)`` instead of the config's input size.
        in_chans: input channels instead of the config's.
        use_test_size: the config's test input size and crop, where it has them.

    Raises:
        UnknownBackboneError: ``source`` names no timm model.

    Examples:
        >>> data_config("resnet10t")["input_size"]
        (3, 176, 176)
        >>> data_config("resnet10t", image_size=64)["input_size"], data_config()["mean"]
        ((3, 64, 64), (0.485, 0.456, 0.406))
    """
    pretrained_cfg: dict[str, Any] = {}
    model = None
    if isinstance(source, str):
        cfg = get_pretrained_cfg(source, allow_unregistered=False) if timm.is_model(source) else None
        if cfg is None:
            raise UnknownBackboneError(f"unknown timm model {source!r}: no data config")
        pretrained_cfg = cfg.to_dict()
    elif source is not None:
        model = source
        pretrained_cfg = dict(getattr(source, "pretrained_cfg", None) or {})
    channels = in_chans or int(pretrained_cfg.get("input_size", (3,))[0])
    args: dict[str, Any] = {"in_chans": channels}
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        args["input_size"] = (channels, int(h), int(w))
    elif in_chans is not None and "input_size" in pretrained_cfg:
        key = "test_input_size" if use_test_size and pretrained_cfg.get("test_input_size") else "input_size"
        args["input_size"] = (channels, *pretrained_cfg[key][-2:])
    return resolve_data_config(args, pretrained_cfg=pretrained_cfg, model=model, use_test_size=use_test_size)


def image_transform(config: dict[str, Any], augment: bool) -> Callable[[Any], Any]:
    """timm's transform for ``config``: PIL image -> normalised float tensor ``[C, H, W]``.

    With ``augment``, timm's training transform (random resized crop,
    horizontal flip, colour jitter); otherwise its evaluation transform
    (resize to ``size / crop_pct``, centre crop).
    """
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: config[k] for k in keys if k in config}, is_training=augment)

