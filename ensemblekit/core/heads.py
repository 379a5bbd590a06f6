"""Member heads: copies of the backbone's head, and exit heads for early exits."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ensemblekit.core.blocks import FeatureFormat
from ensemblekit.errors import EnsembleKitError, InvalidValueError

__all__ = [
    "ExitHead",
    "StateShapeError",
    "classifier_input",
    "classifier_names",
    "copy_with_state",
    "feature_dim",
    "fresh_copy",
    "pool_features",
    "replace_classifier",
    "reset_parameters",
]


def pool_features(feature: Tensor, fmt: FeatureFormat, num_prefix_tokens: int = 0) -> Tensor:
    """Global average pool of a feature map of layout ``fmt`` -> ``[B, D]``."""
    if fmt == "NCHW":
        return feature.mean(dim=(2, 3))
    if fmt == "NHWC":
        return feature.mean(dim=(1, 2))
    if fmt == "NLC":
        tokens = feature[:, num_prefix_tokens:] if feature.shape[1] > num_prefix_tokens else feature
        return tokens.mean(dim=1)
    if fmt == "NC":
        return feature
    raise InvalidValueError(f"unknown feature format {fmt!r}; expected NCHW, NHWC, NLC or NC")


def feature_dim(feature: Tensor, fmt: FeatureFormat) -> int:
    """Channels of a feature map of layout ``fmt``."""
    return feature.shape[1] if fmt in ("NCHW", "NC") else feature.shape[-1]


class ExitHead(nn.Module):
    """An early exit: global average pool, optional norm, then a linear classifier.

    Args:
        in_features: channels of the feature map it reads.
        num_classes: classes to predict.
        fmt: layout of the feature map ("NCHW", "NHWC", "NLC" or "NC").
        num_prefix_tokens: leading tokens of an "NLC" map left out of the pool.
        hidden: width of an extra Linear-BN-ReLU layer before the classifier
            (MSDNet-style exits are deeper than one linear layer); 0 for none.
    """

    def __init__(self, in_features: int, num_classes: int, fmt: FeatureFormat = "NCHW",
                 num_prefix_tokens: int = 0, hidden: int = 0):
        super().__init__()
        self.fmt = fmt
        self.num_prefix_tokens = num_prefix_tokens
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            in_features = hidden
        self.pre_logits = nn.Sequential(*layers)
        self.fc = nn.Linear(in_features, num_classes)

    def forward_features(self, feature: Tensor) -> Tensor:
        """Pooled (and projected) features ``[B, D]`` before the classifier."""
        return self.pre_logits(pool_features(feature, self.fmt, self.num_prefix_tokens))

    def forward(self, feature: Tensor) -> Tensor:
        return self.fc(self.forward_features(feature))


def reset_parameters(module: nn.Module) -> nn.Module:
    """Redraw every parameter of ``module`` from its initial distribution.

    Every submodule that defines ``reset_parameters`` (convolutions, linear
    layers, norms) draws anew from the global torch RNG. A parameter held
    directly by a module without one (a position embedding or class token of a
    token model) is redrawn from a normal with its current mean and standard
    deviation; a constant one (e.g. a layer-scale vector) is left as it is. So
    copies made one after another start from different random initialisations.
    """
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
            continue
        for param in sub.parameters(recurse=False):
            std = param.detach().float().std() if param.numel() > 1 else param.new_zeros(())
            if std > 0:
                with torch.no_grad():
                    param.normal_(float(param.detach().float().mean()), float(std))
    return module


def fresh_copy(module: nn.Module, reinit: bool) -> nn.Module:
    """A deep copy of ``module``; with ``reinit`` its parameters are redrawn."""
    clone = copy.deepcopy(module)
    return reset_parameters(clone) if reinit else clone


class StateShapeError(EnsembleKitError, ValueError):
    """A tensor given for a module's parameter or buffer has another shape."""


def copy_with_state(module: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers named in ``state`` are ``state``'s tensors.

    They are used as they are (no copy) when dtype and device already match
    ``module``'s, else cast; ``requires_grad`` follows ``module``. Tensors not
    named in ``state`` are copied.

    Raises:
        StateShapeError: a tensor of ``state`` has another shape than ``module``'s.
    """
    memo: dict[int, Any] = {}
    for named, make in ((module.named_parameters(), True), (module.named_buffers(), False)):
        for name, tensor in named:
            if name not in state:
                continue
            value = state[name].detach()
            if value.shape != tensor.shape:
                raise StateShapeError(f"{name}: the new value has shape {tuple(value.shape)}, "
                                      f"the module's {tuple(tensor.shape)}")
            value = value.to(device=tensor.device, dtype=tensor.dtype)
            memo[id(tensor)] = nn.Parameter(value, requires_grad=tensor.requires_grad) if make else value
    return copy.deepcopy(module, memo)


def classifier_names(head: nn.Module, num_classes: int) -> list[str]:
    """Paths of the layers of ``head`` that output the class logits (a linear or conv with ``num_classes`` outputs)."""
    return [name for name, sub in head.named_modules()
            if (isinstance(sub, nn.Linear) and sub.out_features == num_classes)
            or (isinstance(sub, nn.modules.conv._ConvNd) and sub.out_channels == num_classes)]


def replace_classifier(head: nn.Module, old_classes: int, num_classes: int) -> nn.Module:
    """Swap every ``nn.Linear`` of ``head`` with ``old_classes`` outputs for a new one.

    The new layer is drawn by PyTorch's default initialisation, on the old
    one's device and dtype, in the old one's training mode.
    """
    replaced = 0
    for name, sub in list(head.named_modules()):
        if isinstance(sub, nn.Linear) and sub.out_features == old_classes:
            parent = head.get_submodule(name.rpartition(".")[0]) if "." in name else head
            new = nn.Linear(sub.in_features, num_classes, bias=sub.bias is not None,
                            device=sub.weight.device, dtype=sub.weight.dtype).train(sub.training)
            setattr(parent, name.rpartition(".")[2], new)
            replaced += 1
    if not replaced:
        raise InvalidValueError(
            f"could not find the classifier ({old_classes} outputs) in the head to give it "
            f"{num_classes} classes; create the backbone with num_classes={num_classes} instead"
        )
    return head



@contextlib.contextmanager
def classifier_input(head: nn.Module, num_classes: int) -> Iterator[list[Tensor]]:
    """Within the block, every call of ``head`` appends its classifier's input (the pre-logits) to the list yielded.

    The classifier is the one layer of ``head`` with ``num_classes`` outputs
    (``classifier_names``); in a head that reads the previous member's
    logits (``takes_previous_logits``, IMTA's ISC) it is the wrapped head's
    (``head.head``). A ``[B, D, 1, 1]`` input (a conv classifier) is flattened
    to ``[B, D]``, as timm's ``forward_head(x, pre_logits=True)`` returns it.

    Raises:
        ValueError: the head has no such layer, or several (a distilled head).
    """
    inner = getattr(head, "head", None)
    target = inner if getattr(head, "takes_previous_logits", False) and isinstance(inner, nn.Module) else head
    names = classifier_names(target, num_classes)
    if len(names) != 1:
        found = f"{len(names)} ({', '.join(names)})" if names else "none"
        raise InvalidValueError(f"the pre-logits are the input of the head's classifier, its one layer with "
                                f"{num_classes} outputs; {type(head).__name__} has {found}")
    captured: list[Tensor] = []

    def keep(_module: nn.Module, args: tuple[Any, ...]) -> None:
        value = args[0]
        captured.append(value.flatten(1) if value.ndim == 4 and value.shape[-2:] == (1, 1) else value)

    handle = target.get_submodule(names[0]).register_forward_pre_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()
