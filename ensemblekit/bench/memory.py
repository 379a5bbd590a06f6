"""Peak memory of a tree ensemble and of as many independent networks (``ensemblekit bench``, section 8).

What is measured for each model: its parameters and buffers, and the peak
memory above what was resident before a call (activations, gradients,
workspace) for one inference call and for one training step (forward, loss,
backward, fused SGD update; the second step, so the momentum buffers already
exist).

* CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``).
* CPU (Linux): the process's peak resident memory (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before each call), in a child process whose
  allocator returns every block of 128 KiB or more to the system when it is
  freed (``MALLOC_MMAP_THRESHOLD_``), so resident memory follows live memory.
  The bench's own allocator settings keep freed memory resident, which would
  hide the peak.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ensemblekit.core.timing import synchronize

__all__ = ["CHILD_ENV", "child", "measure", "unsupported"]

CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
"""Allocator setting of the measuring child: large blocks are unmapped when freed."""


def unsupported(device: torch.device) -> str | None:
    """Why peak memory cannot be measured on ``device`` here (``None`` when it can)."""
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"no peak-memory measurement for {device.type} devices"
    if not os.path.exists("/proc/self/clear_refs"):
        return "CPU peak memory needs Linux's /proc/self/clear_refs"
    return None


def measure(settings: Any, device: torch.device) -> dict[str, dict[str, int]]:
    """Bytes per model (``"tree"``, ``"nets"``) and kind (``"weights"``, ``"eval"``, ``"train"``)."""
    if device.type == "cuda":
        return _measure_models(settings, device)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(CHILD_ENV, ENSEMBLEKIT_BENCH_THREADS=str(torch.get_num_threads()))
    result = subprocess.run([sys.executable, "-c", "from ensemblekit.bench.memory import child; child()"],
                            input=pickle.dumps(settings), capture_output=True, env=env, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"the memory measurement failed:\n{result.stderr.decode(errors='replace')[-2000:]}")
    return json.loads(result.stdout.decode().strip().splitlines()[-1])


def child() -> None:
    """Entry point of the measuring process: settings (pickled) on stdin, JSON on stdout."""
    settings = pickle.loads(sys.stdin.buffer.read())
    torch.set_num_threads(int(os.environ.get("ENSEMBLEKIT_BENCH_THREADS", torch.get_num_threads())))
    print(json.dumps(_measure_models(settings, torch.device("cpu"))))


def _measure_models(settings: Any, device: torch.device) -> dict[str, dict[str, int]]:
    import ensemblekit as ek
    from ensemblekit.backbones import create_backbone

    s = settings
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(s.batch_size, 3, s.image_size, s.image_size, generator=generator).to(device)
    y = torch.randint(0, s.num_classes, (s.batch_size,), generator=generator).to(device)

    def model() -> nn.Module:
        return create_backbone(s.model, num_classes=s.num_classes, **s.model_args).to(device)

    out = {}
    # The calls take the module as an argument: it is deleted before the next one is built, so nothing may refer to it.
    tree = ek.wrap(model(), "tree", depth=s.depth, example_input=x[:1]).to(device)
    out["tree"] = _measure(tree, lambda m: m(x), lambda m: m.loss(m.forward_members(x), y).total, device)
    del tree
    nets = nn.ModuleList(model() for _ in range(2 ** s.depth))
    out["nets"] = _measure(nets, lambda m: [n(x) for n in m],
                           lambda m: sum(F.cross_entropy(n(x), y) for n in m), device)
    return out


def _measure(module: nn.Module, infer: Callable[[Any], Any], loss: Callable[[Any], torch.Tensor],
             device: torch.device) -> dict[str, int]:
    """Weights, and peak bytes of ``infer(module)`` (eval) and of an SGD step on ``loss(module)`` (train)."""
    weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    module.eval()
    with torch.no_grad():
        infer(module)  # one-time allocations (kernels, caches) are not the model's
        eval_peak = _peak(lambda: infer(module), device)
    module.train()
    params = list(module.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=device.type in ("cpu", "cuda") or None)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss(module).backward()
        optimizer.step()

    step()  # creates the momentum buffers
    return {"weights": weights, "eval": eval_peak, "train": _peak(step, device)}


def _peak(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes above what is resident before ``fn()``."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size to the current one
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1)) * 1024
