"""How the nodes of one level are evaluated.

An executor maps modules and their input states to output states. The loop is
the reference (and, on a 2-core CPU, the fastest: see docs/benchmarks.md);
faster strategies must give the same outputs and gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ensemblekit.blocks import State, call_block


class LoopExecutor:
    """Evaluate each node on its own input, one after the other."""

    name = "loop"

    def run(self, modules: Sequence[nn.Module], inputs: Sequence[State]) -> list[State]:
        return [call_block(module, state) for module, state in zip(modules, inputs)]


EXECUTORS = {"loop": LoopExecutor}


def make_executor(name: str) -> LoopExecutor:
    """The executor called ``name``; an unknown name lists the known ones."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown execution strategy {name!r}; choose one of {', '.join(sorted(EXECUTORS))}")
    return EXECUTORS[name]()
