"""``loop`` and ``loop_nhwc``: one node after the other (the reference every strategy matches)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ensemblekit.core.blocks import State, call_block
from ensemblekit.core.interfaces import Executor
from ensemblekit.execution.common import as_channels_last

__all__ = ["LoopExecutor"]


class LoopExecutor(Executor):
    """Evaluate each node on its own input, one after the other.

    Args:
        channels_last: give every 4-D floating-point input tensor channels-last
            strides first (oneDNN convolutions on CPU are much faster so).
    """

    def __init__(self, channels_last: bool = False):
        self.channels_last = channels_last

    @property
    def name(self) -> str:  # type: ignore[override]
        return "loop_nhwc" if self.channels_last else "loop"

    def run(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> list[State]:
        if self.channels_last:
            converted: dict[int, State] = {}
            inputs = [converted.setdefault(id(s), as_channels_last(s)) for s in inputs]
        return [call_block(module, state) for module, state in zip(modules, inputs)]
