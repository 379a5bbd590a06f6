"""How the nodes of one level are evaluated.

An executor ([`Executor`][ensemblekit.core.interfaces.Executor]) maps the nodes
of one level and their input states to output states: ``run(modules, inputs)
-> outputs``. Several nodes may receive the very same input object (the
children of one tree node); executors that batch nodes replicate it (HNE,
Fig. 2). Executors are registered components: ``ek.wrap(..., execution=)``
and ``ens.execution = ...`` take a registered name, a mapping ``{"name": ...,
**options}`` or an executor object, and a plugin adds its own through the
``register_executors`` hook.

| name | how | applies to |
| --- | --- | --- |
| ``loop`` | one node after the other (the reference) | any block |
| ``loop_nhwc`` | the loop on channels-last (NHWC-strided) 4-D inputs | any block |
| ``vmap`` | ``torch.func.vmap`` over parameters stacked on the fly | any block without data-dependent control flow |
| ``grouped`` | the nodes packed into one module, ``N``-times grouped convolutions | conv / BN / element-wise blocks |
| ``grouped_nhwc`` | ``grouped`` on channels-last inputs | the same |
| ``auto`` | times the strategies per level, then whole passes; keeps the fastest (`AutoExecutor`) | any block |

Every strategy computes the same function (equal outputs and gradients up to
float rounding). The stacked or concatenated parameters are built from the
nodes' own parameters on every call (in inference they are reused while no
node tensor changed), so gradients reach each node's parameters, and
BatchNorm running statistics updated in training mode are
written back into each node's buffers: the per-node modules, their
``state_dict`` and the loop stay the single source of truth.
"""

from ensemblekit.core.interfaces import Executor
from ensemblekit.execution.auto import CANDIDATES, AutoExecutor, LevelSignature
from ensemblekit.execution.grouped import GroupedExecutor
from ensemblekit.execution.loop import LoopExecutor
from ensemblekit.execution.vmap import VmapExecutor

__all__ = ["CANDIDATES", "AutoExecutor", "Executor", "GroupedExecutor", "LevelSignature", "LoopExecutor",
           "VmapExecutor"]
