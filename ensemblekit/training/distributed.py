"""Data-parallel training under ``torchrun``: one process per GPU (or CPU worker).

[`ensemblekit.training.trainer.train()`][ensemblekit.training.trainer.train] uses this module by itself: launched with
``torchrun --nproc-per-node=N ...`` it finds the ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK`` variables torchrun sets, joins the process group (NCCL on
CUDA, gloo on the CPU) and trains a
`DistributedDataParallel` copy on each process.

Decisions (see ``docs/distributed.md``):

* ``train.batch_size`` is the *global* batch: each of the N processes takes
  ``batch_size / N`` items of it, and
  [`ShardedEpochSampler`][ensemblekit.training.distributed.ShardedEpochSampler] deals the items so that step
  ``s`` sees the same global batch for every N. With per-sample normalisation (or SyncBatchNorm on GPUs), N
  processes compute what one process computes.
* Forward pass and loss run inside DDP's ``forward`` ([`TrainStep`][ensemblekit.training.distributed.TrainStep]), so
  DDP sees every parameter the loss reaches, loss parameters included.
* ``find_unused_parameters`` is switched on only where a step leaves
  trainable parameters without a gradient (a learned halting selector at the
  first step of IRENE's sequential schedule, a weighted aggregator under a per-member loss):
  [`has_unused_parameters()`][ensemblekit.training.distributed.has_unused_parameters] runs one probe step to
  find out. It is not ``static_graph``, which breaks when the set of used parameters changes between steps
  (anytime training of random prefixes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from ensemblekit.core.interfaces import EnsembleOutput, LossResult
from ensemblekit.errors import InvalidValueError

__all__ = [
    "DistEnv",
    "ShardedEpochSampler",
    "TrainStep",
    "all_gather_objects",
    "all_sum",
    "barrier",
    "broadcast_buffers",
    "data_parallel",
    "detect",
    "has_unused_parameters",
    "init",
    "process_device",
    "rank_seed",
    "shutdown",
]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a launch.

    Attributes:
        rank: global index of the process, ``0..world_size-1``.
        world_size: number of processes.
        local_rank: index of the process on its machine (its GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process logs and writes files (rank 0)."""
        return self.rank == 0


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The launch this process belongs to, read from torchrun's variables.

    A process group the caller already initialised wins over the variables;
    without either, a single process.

    Raises:
        ValueError: ``RANK``, ``WORLD_SIZE`` or ``LOCAL_RANK`` is not an
            integer or out of range.
    """
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistEnv(dist.get_rank(), dist.get_world_size(), local)
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return DistEnv()
    values = {}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        text = environ.get(key, environ.get("RANK", "0"))
        try:
            values[key] = int(text)
        except ValueError:
            raise InvalidValueError(f"environment variable {key}={text!r} is not an integer "
                                    "(set by torchrun)") from None
    world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise InvalidValueError(f"inconsistent launch: RANK={rank}, LOCAL_RANK={local}, WORLD_SIZE={world}; "
                                "start the processes with torchrun")
    return DistEnv(rank, world, local)


def process_device(device: torch.device, env: DistEnv) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` on CUDA, ``device`` otherwise.

    Raises:
        ValueError: the machine has fewer GPUs than processes on it.
    """
    if not env.enabled or device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise InvalidValueError(f"process with LOCAL_RANK={env.local_rank} has no GPU: this machine has {count}; "
                                f"start at most {count} processes per node (torchrun --nproc-per-node={count})")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def init(env: DistEnv, device: torch.device, timeout: timedelta | None = None) -> bool:
    """Join the process group of ``env`` (NCCL on CUDA, gloo otherwise) unless joined already.

    Returns:
        True if this call created the group (the caller should
        [`shutdown()`][ensemblekit.training.distributed.shutdown] it).
    """
    if not env.enabled or dist.is_initialized():
        return False
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise InvalidValueError(f"WORLD_SIZE={env.world_size} but {', '.join(missing)} is not set; "
                                "launch with torchrun, which sets them")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, **kwargs)
    return True


def shutdown() -> None:
    """Leave the process group."""
    if dist.is_initialized():
        dist.destroy_process_group()


class TrainStep(nn.Module):
    """One training forward: ``(x, y) -> (EnsembleOutput, LossResult)``.

    DDP only watches ``forward``; putting the loss in it lets DDP see every
    parameter the loss reaches.
    """

    def __init__(self, ensemble: nn.Module, members: Sequence[int] | None = None):
        super().__init__()
        self.ensemble = ensemble
        self.members = None if members is None else list(members)  # evaluated members (a stage's); None: all

    def forward(self, x: Tensor, y: Tensor) -> tuple[EnsembleOutput, LossResult]:
        if self.members is None:
            output = self.ensemble.forward_output(x)
        else:
            output = self.ensemble.forward_output(x, members=self.members)
        return output, self.ensemble.loss(output, y)


def has_unused_parameters(step: nn.Module, x: Tensor, y: Tensor, env: DistEnv) -> bool:
    """Whether one step on ``(x, y)`` leaves a trainable parameter without a gradient, on any process.

    The probe changes nothing: buffers (BatchNorm statistics) and random
    states are restored and no ``.grad`` is written.
    """
    params = [p for p in step.parameters() if p.requires_grad]
    buffers = [(b, b.detach().clone()) for b in step.buffers()]
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        _, result = step(x, y)
        grads = torch.autograd.grad(result.total, params, allow_unused=True)
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)
    flag = torch.tensor([float(any(g is None for g in grads))], device=x.device)
    if env.enabled:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def data_parallel(
    ensemble: nn.Module,
    env: DistEnv,
    device: torch.device,
    *,
    sync_batchnorm: bool = False,
    find_unused_parameters: bool | None = None,
    probe: tuple[Tensor, Tensor] | None = None,
    members: Sequence[int] | None = None,
) -> nn.Module:
    """The [`TrainStep`][ensemblekit.training.distributed.TrainStep] of ``ensemble``, wrapped in DDP when there
    are several processes.

    Args:
        ensemble: the ensemble, already on ``device``; its weights are
            broadcast from rank 0.
        env: the launch (a single process gets the bare step).
        device: this process's device.
        sync_batchnorm: turn every BatchNorm (timm's BatchNormAct too) into
            its synchronised form, so statistics cover the global batch (CUDA only).
        find_unused_parameters: DDP's option; None decides with
            [`has_unused_parameters()`][ensemblekit.training.distributed.has_unused_parameters] on ``probe`` (a
            local batch).
        members: the members the forward pass evaluates (a training stage's); None: all.

    Raises:
        ValueError: ``sync_batchnorm`` on a CPU, or None for
            ``find_unused_parameters`` without a ``probe``.
    """
    if sync_batchnorm and env.enabled:
        if device.type != "cuda":
            raise InvalidValueError("sync_batchnorm needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel); "
                                    "train with device='cuda' or turn sync_batchnorm off")
        from ensemblekit.backbones.sync_batchnorm import convert_sync_batchnorm

        for name, child in list(ensemble.named_children()):
            ensemble.add_module(name, convert_sync_batchnorm(child))
    step = TrainStep(ensemble, members)
    if not env.enabled:
        return step
    _check_same_parameters(step, env)
    if find_unused_parameters is None:
        if probe is None:
            raise InvalidValueError("find_unused_parameters=None needs a probe batch (x, y) to decide")
        find_unused_parameters = has_unused_parameters(step, *probe, env)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def _check_same_parameters(step: nn.Module, env: DistEnv) -> None:
    """Every process must list the same parameters in the same order (DDP pairs them by position)."""
    names = [(name, tuple(p.shape)) for name, p in step.named_parameters() if p.requires_grad]
    for rank, other in enumerate(all_gather_objects(names, env)):
        if other != names:
            i = next((i for i, (a, b) in enumerate(zip(names, other)) if a != b), min(len(names), len(other)))
            ours, theirs = names[i] if i < len(names) else None, other[i] if i < len(other) else None
            raise InvalidValueError(
                f"processes {env.rank} and {rank} hold different parameters: entry {i} is {ours} here and "
                f"{theirs} there; build the model identically on every process (a module order that "
                "depends on Python's hash seed also does this: set PYTHONHASHSEED=0 for the launch)"
            )


def all_sum(values: Tensor, env: DistEnv) -> Tensor:
    """``values`` summed over all processes (itself in a single process)."""
    if env.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(module: nn.Module, env: DistEnv) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics drift apart on per-process batches)."""
    if env.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier(env: DistEnv) -> None:
    """Wait until every process gets here."""
    if env.enabled:
        dist.barrier()


def all_gather_objects(value: Any, env: DistEnv) -> list[Any]:
    """Every process's ``value`` (small, picklable), in rank order; ``[value]`` in a single process."""
    if not env.enabled:
        return [value]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random draws (augmentation, dropout); rank 0 keeps ``seed``."""
    return seed + 7_919 * rank


class ShardedEpochSampler(DistributedSampler):
    """A `DistributedSampler` whose global order depends only on ``(seed, epoch)``.

    Global batch ``s`` of an epoch is items ``s*B .. (s+1)*B - 1`` of one
    seeded permutation, dealt round-robin to the processes, so it holds the
    same items for every number of processes. Every process gets the same
    number of items: with ``drop_last`` the epoch is cut to whole global
    batches, otherwise to a multiple of the number of processes.

    Args:
        dataset: the training set.
        batch_size: the global batch size ``B``.
        env: the launch.
        seed: the run's seed.
        drop_last: cut each epoch to whole global batches.
    """

    def __init__(self, dataset: Dataset, batch_size: int, env: DistEnv, seed: int = 0, drop_last: bool = True):
        super().__init__(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed,
                         drop_last=drop_last)
        self.batch_size = batch_size
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use the order of ``epoch``, skipping its first ``start`` items (a resumed epoch)."""
        self.epoch, self.start = epoch, start

    def _end(self) -> int:
        n = len(self.dataset)
        unit = self.batch_size if self.drop_last else self.num_replicas
        return self.start + (n - self.start) // unit * unit

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g)
        yield from order[self.start:self._end()][self.rank::self.num_replicas].tolist()

    def __len__(self) -> int:
        return (self._end() - self.start) // self.num_replicas
