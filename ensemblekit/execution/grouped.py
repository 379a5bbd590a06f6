"""``grouped`` and ``grouped_nhwc``: the nodes packed into one module with ``N``-times grouped convolutions."""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call

from ensemblekit.core.blocks import State, TracedBlock
from ensemblekit.core.interfaces import Executor
from ensemblekit.errors import InvalidValueError
from ensemblekit.execution.common import PackCache, distinct, mismatch, packed_base, write_back

__all__ = ["GroupedExecutor"]


class GroupedExecutor(Executor):
    """All nodes packed into one module: ``N`` times the channels, ``N`` times the groups.

    Node ``i`` owns channels ``i*C .. (i+1)*C-1`` of every feature map (HNE,
    Fig. 2). Inputs shared by several nodes are replicated along the channel
    dimension; inputs that are consecutive channel slices of one packed tensor
    (the previous level's outputs) are used without a copy. Outputs are channel
    slices (views) of the packed output.

    Args:
        channels_last: run the packed level on channels-last inputs.
    """

    chains = True  # a packed output feeds the next packed level without a copy

    def __init__(self, channels_last: bool = False):
        self.channels_last = channels_last
        self._packs = PackCache()
        self._templates: dict[tuple[int, int], tuple[nn.Module, nn.Module]] = {}
        self._packable: dict[int, tuple[nn.Module, str | None]] = {}

    @property
    def name(self) -> str:  # type: ignore[override]
        return "grouped_nhwc" if self.channels_last else "grouped"

    def forget(self, modules: Sequence[nn.Module]) -> None:
        self._packs.forget(modules)

    def unsupported(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> str | None:
        if not all(isinstance(s, Tensor) and s.ndim == 4 for s in inputs):
            return "inputs are not single 4-D [B, C, H, W] tensors"
        first = modules[0]
        if id(first) not in self._packable:
            self._packable[id(first)] = (first, _why_not_packable(first))
        return self._packable[id(first)][1] or mismatch(modules, inputs)

    def run(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> list[State]:
        reason = self.unsupported(modules, inputs)
        if reason is not None:
            raise InvalidValueError(f"execution {self.name!r} cannot run these nodes: {reason}")
        n = len(modules)
        x = _pack_channels(cast(Sequence[Tensor], inputs))  # unsupported() found 4-D tensors
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        params, buffers = self._packs.get(modules, _cat_or_first)
        out = functional_call(self._template(modules[0], n), (params, buffers), (x,), strict=True)
        if modules[0].training:
            write_back(modules, buffers, lambda t, i: t.chunk(n, 0)[i])
        return list(out.chunk(n, 1))

    def _template(self, module: nn.Module, n: int) -> nn.Module:
        key = (id(module), n)
        if key not in self._templates:
            self._templates[key] = (module, _grouped_template(module, n))
        template = self._templates[key][1]
        template.train(module.training)
        return template


def _pack_channels(inputs: Sequence[Tensor]) -> Tensor:
    """Inputs ``[B, C, H, W]`` concatenated along channels, replicating shared ones."""
    unique, index = distinct(inputs)
    base = packed_base(unique, 1, stacked=False)
    if base is None:
        base = torch.cat(unique, 1) if len(unique) > 1 else unique[0]
    if index == list(range(len(unique))):
        return base
    c = unique[0].shape[1]
    grouped = base.unflatten(1, (len(unique), c))
    if index == sorted(index):  # children of one parent are adjacent: a broadcast copy
        counts = torch.tensor([index.count(u) for u in range(len(unique))], device=base.device)
        return grouped.repeat_interleave(counts, dim=1, output_size=len(index)).flatten(1, 2)
    return grouped.index_select(1, torch.tensor(index, device=base.device)).flatten(1, 2)


def _cat_or_first(tensors: list[Tensor]) -> Tensor:
    """Concatenate per-channel tensors along dim 0; 0-d counters: a copy of the first."""
    return torch.cat(tensors, 0) if tensors[0].ndim else tensors[0].clone()


# ---------------------------------------------------------------- packing rules
_CHANNEL_LOCAL_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_CHANNEL_LOCAL_FUNCTIONS = {
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.truediv, torch.add, torch.mul,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, F.relu, F.relu6, F.silu, F.gelu, F.hardswish,
    F.hardsigmoid, F.leaky_relu, F.mish, F.elu, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
}
_CHANNEL_LOCAL_METHODS = {"add", "add_", "mul", "mul_", "relu", "relu_", "sigmoid", "sigmoid_", "clone", "contiguous"}


def _why_not_packable(module: nn.Module) -> str | None:
    """``None`` when the module only holds channel-local layers, else what breaks packing."""
    if type(module) is nn.Conv2d:
        return None
    if type(module) is nn.BatchNorm2d:
        return "BatchNorm2d with momentum=None" if module.momentum is None else None
    if isinstance(module, _CHANNEL_LOCAL_MODULES) and not any(True for _ in module.parameters()):
        return None
    if type(module) is nn.Sequential:
        return next((r for r in map(_why_not_packable, module) if r), None)
    if isinstance(module, fx.GraphModule):
        return _why_not_packable_graphs(module, [module.graph])
    if isinstance(module, TracedBlock):
        return _why_not_packable_graphs(module, module.graphs.values())
    return f"{type(module).__name__} is not a conv/BN/element-wise layer"


def _why_not_packable_graphs(root: nn.Module, graphs: Iterable[fx.Graph]) -> str | None:
    for node in (n for g in graphs for n in g.nodes):
        if node.op == "call_module":
            reason = _why_not_packable(root.get_submodule(node.target))
        elif node.op == "call_function":
            reason = None if node.target in _CHANNEL_LOCAL_FUNCTIONS else f"function {node.target}"
        elif node.op == "call_method":
            reason = None if node.target in _CHANNEL_LOCAL_METHODS else f"method .{node.target}()"
        elif node.op == "get_attr":
            reason = f"tensor attribute {node.target}"
        else:
            reason = None
        if reason:
            return reason
    return None


def _grouped_template(module: nn.Module, n: int) -> nn.Module:
    """A copy of ``module`` whose layers take ``n`` times the channels (parameters on ``meta``)."""
    template = copy.deepcopy(module).to("meta")
    for m in template.modules():
        if isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels, m.groups = m.in_channels * n, m.out_channels * n, m.groups * n
        elif isinstance(m, nn.BatchNorm2d):
            m.num_features *= n
        else:
            continue
        for name, p in list(m.named_parameters(recurse=False)):
            setattr(m, name, nn.Parameter(_meta_scaled(p, n), requires_grad=p.requires_grad))
        for name, b in list(m.named_buffers(recurse=False)):
            m.register_buffer(name, _meta_scaled(b, n))
    return template


def _meta_scaled(t: Tensor, n: int) -> Tensor:
    shape = (t.shape[0] * n, *t.shape[1:]) if t.ndim else t.shape
    return torch.empty(shape, dtype=t.dtype, device="meta")
