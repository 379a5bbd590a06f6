"""A ready training loop for the CLI and the examples (your own loop needs none of it).

[`train()`][ensemblekit.training.trainer.train] runs SGD or AdamW with a cosine or step schedule, shows live
loss and accuracy, and writes checkpoints (see [`ensemblekit.training.checkpoint`][ensemblekit.training.checkpoint])
into ``out_dir/checkpoints/``: at every epoch end and every
``checkpoint_every`` steps. ``resume=True`` continues from the newest one
exactly where it stopped: weights, optimizer, schedule, step and every RNG
state are restored and the shuffling order of an epoch depends only on the
seed and the epoch, so the result equals an uninterrupted run (mid-epoch
resumes are exact with ``num_workers=0``; with workers, resume from an epoch
end). A NaN or infinite loss stops the run before the step is applied and
names the step and batch; nothing is written after the last good checkpoint.

Training runs in stages ([`ensemblekit.core.stages`][ensemblekit.core.stages]): a schedule, named
by ``TrainConfig.stages`` or taken from the loss (IRENE's loss asks for its
sequential Algorithm 1), is a list of stages, each saying what trains,
which members are evaluated, which loss and optimizer are used and for how
many epochs; plain training is one stage ("joint"). One loop runs them all;
steps and epochs count over the whole schedule and checkpoints hold the
stage, so a resume in the middle of a schedule is exact as well.

Options of ``TrainConfig`` in the manner of Lightning and accelerate, all
off by default: ``precision`` ("bf16-mixed", "16-mixed": the forward pass
and loss under ``torch.autocast``, float16 with a ``GradScaler``),
``accumulate`` (one optimizer step every k batches; steps, schedule and
checkpoints count optimizer steps, and checkpoints fall between them, so a
resume stays exact), ``ema_decay`` (an EMA of the weights, with torch's
``AveragedModel``: what checkpoints hold as the model and what ``train()``
leaves in it, so evaluation uses it; the training weights are checkpointed
too) and ``logger`` ("csv" or "tensorboard" rows per epoch and every
``log_every`` steps, see [`ensemblekit.training.metrics_log`][ensemblekit.training.metrics_log]).

Launched with ``torchrun --nproc-per-node=N``, [`train()`][ensemblekit.training.trainer.train] trains with
DistributedDataParallel (see [`ensemblekit.training.distributed`][ensemblekit.training.distributed]): each process
takes ``batch_size / N`` items of every global batch, only rank 0 shows
progress and writes files, and checkpoints hold every process's RNG state.

Examples:
    >>> cfg = RunConfig(ModelConfig("resnet10t"), train=TrainConfig(epochs=2))  # doctest: +SKIP
    >>> result = run(cfg, "runs/first")                                         # doctest: +SKIP
    >>> print(result.report.table())                                            # doctest: +SKIP
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset, Subset

from ensemblekit.core.registry import SCHEDULES
from ensemblekit.core.stages import Stage, default_schedule, frozen_except
from ensemblekit.errors import EnsembleKitError, InvalidTypeError, InvalidValueError, PathExistsError, PathNotFoundError
from ensemblekit.evaluation.reports import Report, anytime_report, collect_members, plot_accuracy_vs_flops
from ensemblekit.training import checkpoint as ckpt
from ensemblekit.training import distributed
from ensemblekit.training.config import (
    PROGRESS,
    RESUMABLE_CHANGES,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    build_ensemble,
    check_precision,
)
from ensemblekit.training.data import (
    SPLIT_SEED,
    SUBSET_RULE,
    SeededItems,
    dataset_labels,
    load_dataset,
    make_loader,
    stratified_subset,
)
from ensemblekit.training.metrics_log import MetricsLogger, make_logger

__all__ = [
    "CHECKPOINTS",
    "DeviceError",
    "NonFiniteLossError",
    "RunResult",
    "TrainResult",
    "data_settings",
    "evaluate",
    "load_split",
    "make_optimizer",
    "make_scheduler",
    "optimizer_step",
    "resolve_stages",
    "run",
    "run_many",
    "seed_everything",
    "select_device",
    "slug",
    "train",
    "training_step",
    "write_plot",
    "write_report",
]

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class DeviceError(EnsembleKitError, ValueError):
    """A device name that torch does not know, or a device this machine does not have."""


class NonFiniteLossError(EnsembleKitError, ValueError):
    """The loss became NaN or infinite; the message names the step, the batch and the last good checkpoint."""


@dataclass
class TrainResult:
    """What [`train()`][ensemblekit.training.trainer.train] did.

    Attributes:
        steps: optimizer steps done in total (over all resumed parts).
        history: one entry per finished epoch: the epoch (counted over the
            whole schedule), its stage's name and the epoch within it, mean
            loss and parts, accuracy of the (stage's) ensemble on the training
            batches, learning rate (of the first optimizer), seconds.
        checkpoint: the newest checkpoint folder (None without ``out_dir``).
        seconds: wall-clock time of this call.
        ema_decay: the decay of the exponential moving average of the weights
            that the model now holds (``train.ema_decay``); None: the model
            holds the trained weights.
    """

    steps: int
    history: list[dict[str, float]]
    checkpoint: Path | None
    seconds: float
    ema_decay: float | None = None


@dataclass
class RunResult:
    """What [`run()`][ensemblekit.training.trainer.run] produced: the trained ensemble, its training and its
    evaluation."""

    model: nn.Module
    train: TrainResult
    report: Report
    files: dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------ setup
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA if available, then Apple MPS, else the CPU; otherwise ``torch.device(name)``.

    Raises:
        DeviceError: ``name`` is not a device (``"banana"``), or one this machine lacks (``"cuda"`` without CUDA,
            ``"cuda:3"`` with two GPUs, ``"mps"`` off Apple silicon).
    """
    if name != "auto":
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError, TypeError):
            raise DeviceError(f"{name!r} is not a device; use auto, cpu, cuda, cuda:N (N-th GPU) or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} was asked for but CUDA is not available; use device='auto' or 'cpu'")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} was asked for but torch sees {torch.cuda.device_count()} CUDA "
                              "device(s)")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                         and torch.backends.mps.is_available()):
            raise DeviceError(f"device {name!r} was asked for but Apple MPS is not available; use 'auto' or 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def make_optimizer(params: Any, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (HNE: lr 0.1, momentum 0.9, weight decay 5e-4) or AdamW.

    The fused implementation is used where torch has one (floating-point
    parameters on the CPU or CUDA): one kernel per step instead of one per
    tensor, the same update rule.
    """
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors) or None
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                               weight_decay=config.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int,
                   epochs: int | None = None):
    """A per-step schedule: cosine to 0 over the run (or ``epochs``: a stage's), step decay, or none for "constant"."""
    total = (config.epochs if epochs is None else epochs) * steps_per_epoch
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_epochs * steps_per_epoch,
                                               gamma=config.gamma)
    return None


# ------------------------------------------------------------------ state
class _Meter:
    """Running sums of one epoch (saved in mid-epoch checkpoints)."""

    def __init__(self, sums: dict[str, float] | None = None):
        self.sums = dict(sums or {})

    def add(self, loss: float, parts: dict[str, float], correct: int, count: int) -> None:
        s = self.sums
        s["batches"] = s.get("batches", 0) + 1
        s["loss"] = s.get("loss", 0.0) + loss
        for k, v in parts.items():
            s[f"part.{k}"] = s.get(f"part.{k}", 0.0) + float(v)
        s["correct"] = s.get("correct", 0) + correct
        s["count"] = s.get("count", 0) + count

    def loss(self) -> float:
        return self.sums.get("loss", 0.0) / max(1, self.sums.get("batches", 0))

    def accuracy(self) -> float:
        return self.sums.get("correct", 0) / max(1, self.sums.get("count", 0))

    def summary(self) -> dict[str, float]:
        n = max(1, self.sums.get("batches", 0))
        out = {"loss": self.loss(), "accuracy": self.accuracy()}
        out.update({k: v / n for k, v in self.sums.items() if k.startswith("part.")})
        return out


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(state), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_state(optimizer: torch.optim.Optimizer,
                     prefix: str = "optimizer") -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for pid, entry in sd["state"].items():
        plain[str(pid)] = {k: v for k, v in entry.items() if not isinstance(v, Tensor)}
        tensors.update({f"{prefix}.{pid}.{k}": v for k, v in entry.items() if isinstance(v, Tensor)})
    return tensors, {"state": plain, "param_groups": sd["param_groups"]}


def _set_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], plain: dict[str, Any],
                         prefix: str = "optimizer") -> None:
    state: dict[int, dict[str, Any]] = {int(pid): dict(entry) for pid, entry in plain["state"].items()}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def _step_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


# ------------------------------------------------------------------ training
def training_step(compute_loss: Callable[[], Tensor], optimizers: Sequence[torch.optim.Optimizer],
                  schedulers: Sequence[Any] = (), *, grad_clip: float | None = None,
                  parameters: Iterable[nn.Parameter] | None = None,
                  scaler: torch.amp.GradScaler | None = None) -> Tensor:
    """One optimisation step: clear the gradients, ``loss = compute_loss()``, backward, update.

    Then the gradient norm of ``parameters`` (default: the optimizers') is
    clipped to ``grad_clip`` when it is set, every optimizer steps, and every
    learning-rate scheduler (``None`` entries are skipped). With a ``scaler``
    (float16 training) the loss is scaled before the backward pass and the
    gradients unscaled before clipping; the scaler skips a step whose
    gradients overflowed. [`train()`][ensemblekit.training.trainer.train] does the same over the batches of
    one optimizer step (``train.accumulate``); the benchmark times this as its training step.

    Returns:
        The loss ``compute_loss()`` returned.
    """
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss = compute_loss()
    (loss if scaler is None else scaler.scale(loss)).backward()
    optimizer_step(optimizers, schedulers, grad_clip=grad_clip, parameters=parameters, scaler=scaler)
    return loss


def optimizer_step(optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any] = (), *,
                   grad_clip: float | None = None, parameters: Iterable[nn.Parameter] | None = None,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """The update of [`training_step()`][ensemblekit.training.trainer.training_step] once the gradients are in:
    unscale (with a ``scaler``), clip, step every optimizer, then every scheduler."""
    if grad_clip is not None:
        if scaler is not None:
            for optimizer in optimizers:
                scaler.unscale_(optimizer)
        if parameters is None:
            parameters = [p for o in optimizers for group in o.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(parameters, grad_clip)
    for optimizer in optimizers:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
    if scaler is not None:
        scaler.update()
    for scheduler in schedulers:
        if scheduler is not None:
            scheduler.step()


def resolve_stages(model: nn.Module, config: TrainConfig) -> list[Stage]:
    """The stages ``model`` trains in: the schedule ``config.stages`` names, else the model's loss's own.

    See [`ensemblekit.core.stages`][ensemblekit.core.stages]; schedules are looked up in
    `SCHEDULES` and called with
    ``ensemble=model, settings=config`` and the options of ``config.stages``.
    """
    spec = config.stages if config.stages is not None else default_schedule(model)
    stages = SCHEDULES.create(spec, context={"ensemble": model, "settings": config})
    return _check_stages(stages, f"schedule {spec!r}")


def _check_stages(stages: Any, source: str) -> list[Stage]:
    stages = list(stages)
    if not stages or not all(isinstance(s, Stage) for s in stages):
        raise InvalidTypeError(f"{source} must give a non-empty list of ensemblekit.core.stages.Stage objects, got "
                               f"{stages!r}")
    return stages


def train(
    model: nn.Module,
    train_set: Dataset,
    config: TrainConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    num_workers: int = 0,
    extra: dict[str, Any] | None = None,
    stages: Sequence[Stage] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` (an [`Ensemble`][ensemblekit.core.ensemble.Ensemble] with a loss) on ``train_set``, stage
    by stage.

    Args:
        model: the ensemble; with ``out_dir`` it needs a ``build_config``
            (built by [`build_ensemble()`][ensemblekit.training.config.build_ensemble]).
        train_set: yields ``(image, label)``.
        config: optimisation settings; ``config.stages`` names the schedule.
        out_dir: run folder for checkpoints (None: keep nothing on disk).
        resume: continue from the newest checkpoint in ``out_dir``.
        num_workers: data-loading worker processes.
        extra: JSON-able settings stored in every checkpoint and required to
            be unchanged on resume (e.g. the data config).
        stages: the stages to run, instead of the schedule of
            [`resolve_stages()`][ensemblekit.training.trainer.resolve_stages] (e.g. a part of one); a resume needs the
            same stage names.
        on_epoch: called (on rank 0) with every epoch's history entry.

    The stages run one after the other in one loop (see
    [`ensemblekit.core.stages`][ensemblekit.core.stages]): each may prepare the ensemble, swap its
    loss, freeze all but its trainable parameters and evaluate only some
    members, with optimizers created when it starts. Steps and epochs are
    counted over the whole schedule, and checkpoints hold the stage index.

    With ``config.ema_decay`` the model is left holding the EMA of its
    weights (``TrainResult.ema_decay`` says so), as the checkpoints' model
    files do; with ``config.logger`` the metrics go into ``out_dir``.

    Under torchrun the model is trained with DDP on every process (see
    [`ensemblekit.training.distributed`][ensemblekit.training.distributed]); the process group is created here when
    the caller has not created one, and destroyed on return.

    Raises:
        ConfigError: ``config.precision`` is not available on the device, or
            ``config.logger`` is set without ``out_dir``.
        FileExistsError: ``out_dir`` already holds checkpoints and ``resume`` is off.
        CheckpointError: the checkpoint to resume is damaged or of another model, settings or schedule.
        NonFiniteLossError: the loss became NaN or infinite.
    """
    config = config or TrainConfig()
    env = distributed.detect()
    device = distributed.process_device(select_device(config.device), env)
    check_precision(config.precision, device)
    if config.logger is not None and out_dir is None:
        raise ConfigError(f"train.logger = {config.logger!r} writes into the run folder: pass out_dir, or leave "
                          "train.logger unset")
    created = distributed.init(env, device)
    try:
        return _train(model, train_set, config, env, device, out_dir=out_dir, resume=resume,
                      num_workers=num_workers, extra=extra, stages=stages, on_epoch=on_epoch)
    finally:
        if created:
            distributed.shutdown()


def _train(model: nn.Module, train_set: Dataset, config: TrainConfig, env: distributed.DistEnv,
           device: torch.device, *, out_dir: str | Path | None, resume: bool, num_workers: int,
           extra: dict[str, Any] | None, stages: Sequence[Stage] | None = None,
           on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    extra = dict(extra or {})
    start_time = time.perf_counter()
    folder = None if out_dir is None else Path(out_dir) / CHECKPOINTS
    if folder is not None and getattr(model, "build_config", None) is None:
        raise InvalidValueError("to write checkpoints the model needs a build_config: build it with "
                                "ensemblekit.training.config.build_ensemble, or pass out_dir=None")
    if folder is not None:  # what killed saves left; a checkpoint a crash between renames hid is put back
        ckpt.clean_up(folder)
    existing = _step_dirs(folder) if folder is not None else []
    if resume and folder is None:
        raise InvalidValueError("resume=True needs the out_dir of the run to resume")
    if existing and not resume:
        raise PathExistsError(f"{out_dir} already holds checkpoints of a run ({existing[-1].name}); "
                              "resume it (--resume / resume=True) or choose another output folder")

    model.to(device)
    n = len(train_set)
    if n == 0:
        raise InvalidValueError("the training set is empty")
    if config.batch_size % env.world_size or n < env.world_size:
        raise ConfigError(f"train.batch_size={config.batch_size} is the global batch of {env.world_size} processes: "
                          f"it must be a multiple of {env.world_size}, and the training set ({n} items) at least "
                          f"{env.world_size} items")
    per_process = min(config.batch_size, n) // env.world_size
    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if per_process < 2 and batchnorm:
        raise ConfigError(f"batches of {per_process} sample per process (train.batch_size={config.batch_size}, "
                          f"{n} training items, {env.world_size} processes): BatchNorm needs at least 2 samples "
                          "per batch in training")
    step_batch = config.batch_size * config.accumulate  # the global items of one optimizer step
    drop_last = n > step_batch
    steps_per_epoch = n // step_batch if drop_last else 1  # optimizer steps
    if not drop_last and batchnorm and (n // env.world_size) % per_process == 1:
        raise ConfigError(f"the {n} training items make one optimizer step of batches of {config.batch_size} "
                          f"(train.accumulate={config.accumulate}) whose last batch has 1 sample per process: "
                          "BatchNorm needs at least 2 samples per batch in training; change train.batch_size")
    stages = resolve_stages(model, config) if stages is None else _check_stages(stages, "stages")
    names = [s.name for s in stages]
    bounds = [0]  # step at which each stage starts, then the total
    for s in stages:
        bounds.append(bounds[-1] + s.epochs * steps_per_epoch)
    total_steps, total_epochs = bounds[-1], bounds[-1] // steps_per_epoch
    step, history, meter = 0, [], _Meter()
    last_good: Path | None = None
    settings = {"train": asdict(config), **extra}
    restore: tuple[Path, dict[str, Any]] | None = None  # the checkpoint to load when its stage is reached
    restore_stage = -1

    if resume:
        if not existing:
            raise PathNotFoundError(f"nothing to resume: {folder} holds no checkpoints")
        # a run killed between writing its first checkpoint and its "latest" pointer has no pointer yet
        last_good = ckpt.resolve(folder) if (folder / ckpt.LATEST).is_file() else existing[-1]
        restore = _check_resumable(last_good, model, settings)
        state = restore[1]["trainer"]
        step, history, meter = state["step"], state["history"], _Meter(state["epoch_sums"])
        theirs = state.get("stages", names if len(names) == 1 else ["(one stage)"])  # one, before stages
        if theirs != names:
            raise ckpt.CheckpointError(f"cannot resume from {last_good}: it was written by a run with the stages "
                                       f"{theirs}; this run's are {names}")
        if step > total_steps:
            raise ckpt.CheckpointError(f"{last_good} is at step {step}, past the {total_epochs} epochs of this run")
        restore_stage = _stage_at(step, bounds)
        if state.get("stage", 0) != restore_stage:
            raise ckpt.CheckpointError(
                f"cannot resume from {last_good}: it was written in stage {state['stage']} ({names[state['stage']]}) "
                f"but its step {step} falls in stage {restore_stage} of this run; were the epochs per stage changed?")
        found = distributed.all_gather_objects(str(last_good), env)
        if len(set(found)) > 1:
            raise ckpt.CheckpointError(f"the processes found different checkpoints to resume ({', '.join(found)}); "
                                       "out_dir must be on a file system that every process sees")
    elif env.enabled:
        seed_everything(distributed.rank_seed(config.seed, env.rank))  # each process draws its own augmentations

    optimizers: list[torch.optim.Optimizer] = []
    schedulers: list[Any] = []
    index = 0
    autocast = _autocast(config.precision, device)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "16-mixed" else None
    ema: AveragedModel | None = None
    logger: MetricsLogger | None = None
    if env.is_main and out_dir is not None:
        logger = make_logger(config.logger, out_dir, resume_step=step if resume else None)

    def save() -> Path:
        target = folder / f"step-{step:07d}"
        rng = distributed.all_gather_objects(_rng_state(), env)  # every process's, so each resumes its own
        if env.is_main:
            opt_tensors: dict[str, Tensor] = {}
            opt_plain = []
            for i, optimizer in enumerate(optimizers):
                tensors, plain = _optimizer_state(optimizer, _optimizer_prefix(i))
                opt_tensors.update(tensors)
                opt_plain.append(plain)
            rng_tensors = {(f"rank{r}.{k}" if r else k): v for r, (t, _) in enumerate(rng) for k, v in t.items()}
            state = {"step": step, "steps_per_epoch": steps_per_epoch, "stage": index, "stages": names,
                     "history": history, "epoch_sums": meter.sums, "optimizers": opt_plain,
                     "schedulers": [None if s is None else s.state_dict() for s in schedulers],
                     "rng": rng[0][1], "rng_ranks": [plain for _, plain in rng[1:]]}
            weights, live = None, {}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if ema is not None:  # the model file holds the EMA weights, the trainer file the trained ones
                state["ema"] = {"decay": config.ema_decay, "n_averaged": int(ema.n_averaged)}
                weights = ema.module.state_dict()
                live = {_LIVE + k: v for k, v in model.state_dict().items()}
            ckpt.write_checkpoint(target, model, model.build_config, trainer_state=state, extra=settings,
                                  trainer_tensors={**opt_tensors, **rng_tensors, **live}, overwrite=True,
                                  weights=weights)
            ckpt.atomic_write(folder / ckpt.LATEST, target.name + "\n")
            for old in _step_dirs(folder)[:-config.keep_checkpoints]:
                shutil.rmtree(old)
        distributed.barrier(env)  # no process goes on (or resumes) before the checkpoint is complete
        return target

    sampler = distributed.ShardedEpochSampler(train_set, step_batch, env, seed=config.seed, drop_last=drop_last)
    progress = config.progress if env.is_main else "none"
    # BatchNorm is converted to its synchronised form once, by the first DDP wrapper (converting twice would
    # replace timm's fused BatchNorm + activation layers); layers a later stage's preparation adds stay per process
    wrapped = False
    try:
        for index, stage in enumerate(stages):
            _start_stage(stage, model, device)
            ema = _ema_for(model, ema, config.ema_decay)
            buffers = list(model.buffers())  # restored when a step fails on a non-finite loss
            before_step = [b.clone() for b in buffers]
            if step >= bounds[index + 1]:  # done before the checkpoint resumed: only its preparation is replayed
                if index == restore_stage and restore is not None:  # the checkpoint ends this stage
                    _load_state(*restore, model, [], [], env, config.seed, ema=ema, scaler=scaler)
                    restore = None
                continue
            with frozen_except(model, stage.trainable) as freeze:
                params = freeze.parameters
                if not params:
                    raise InvalidValueError(f"stage {stage.name!r} has no parameter to train")
                _mark_halting_trained(model, params)
                optimizers, schedulers = _stage_optimizers(stage, params, config, steps_per_epoch)
                if restore is not None:  # resumed in the middle of this stage
                    _load_state(*restore, model, optimizers, schedulers, env, config.seed, ema=ema, scaler=scaler)
                    restore = None
                step_fn = None
                while step < bounds[index + 1]:
                    epoch, skip = divmod(step, steps_per_epoch)
                    freeze.train()
                    sampler.set_epoch(epoch, start=skip * step_batch)
                    items = SeededItems(train_set, config.seed, epoch)  # augmentations independent of the workers
                    loader = make_loader(items, config.batch_size // env.world_size, shuffle=False,
                                         num_workers=num_workers, seed=distributed.rank_seed(config.seed, env.rank),
                                         sampler=sampler, drop_last=drop_last)
                    # an optimizer step takes `accumulate` batches, or the whole epoch when it is one short step
                    per_step = config.accumulate if drop_last else len(loader)
                    step_items = step_batch // env.world_size if drop_last else len(sampler)  # this process's
                    batches = iter(loader)
                    epoch_start = time.perf_counter()
                    desc = f"epoch {epoch + 1}/{total_epochs}" + (f" ({stage.name})" if len(stages) > 1 else "")
                    with _progress(progress, steps_per_epoch, skip, desc) as bar:
                        for batch in range(skip, steps_per_epoch):
                            if buffers:
                                torch._foreach_copy_(before_step, buffers)
                            for optimizer in optimizers:
                                optimizer.zero_grad(set_to_none=True)
                            sums = _StepSums()
                            lr = optimizers[0].param_groups[0]["lr"]
                            try:
                                for micro, (x, y) in zip(range(per_step), batches):
                                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                                    if step_fn is None:
                                        step_fn = distributed.data_parallel(
                                            model, env, device, sync_batchnorm=config.sync_batchnorm and not wrapped,
                                            probe=(x, y), members=stage.members)
                                        wrapped = True
                                        ema = _ema_for(model, ema, config.ema_decay)  # a SyncBatchNorm model
                                    where = {"step": step + 1, "epoch": epoch + 1, "batch": batch + 1,
                                             "steps_per_epoch": steps_per_epoch, "last_good": last_good,
                                             "micro": micro + 1, "per_step": per_step}
                                    seen: dict[str, Any] = {}
                                    # the gradients are all-reduced once per step, with its last batch
                                    sync = (step_fn.no_sync() if isinstance(step_fn, DistributedDataParallel)
                                            and micro < per_step - 1 else nullcontext())
                                    with sync:
                                        with autocast():
                                            loss = _forward(step_fn, x, y, env, where, seen)
                                        weight = len(y) / step_items  # 1 / accumulate: this batch's share
                                        if weight != 1:
                                            loss = loss * weight
                                        (loss if scaler is None else scaler.scale(loss)).backward()
                                    sums.add(seen, weight, len(y) * env.world_size, env)
                            except NonFiniteLossError:  # the forward pass put NaN in BatchNorm's statistics: undo it
                                if buffers:
                                    torch._foreach_copy_(buffers, before_step)
                                raise
                            optimizer_step(optimizers, schedulers, grad_clip=config.grad_clip,
                                           parameters=model.parameters(), scaler=scaler)
                            if ema is not None:
                                ema.update_parameters(model)
                            step += 1
                            meter.add(sums.loss, sums.parts, sums.correct, sums.count)
                            bar.update(meter.loss(), meter.accuracy())
                            if logger is not None and config.log_every and step % config.log_every == 0:
                                logger.log({"scope": "step", "step": step, "epoch": epoch + 1, "stage": stage.name,
                                            "loss": sums.loss, "accuracy": sums.correct / max(1, sums.count),
                                            **{f"part.{k}": v for k, v in sums.parts.items()}, "lr": lr})
                            end_of_epoch = step % steps_per_epoch == 0
                            if end_of_epoch:
                                entry = {"epoch": epoch + 1, "stage": stage.name,
                                         "stage_epoch": epoch + 1 - bounds[index] // steps_per_epoch,
                                         **meter.summary(), "lr": optimizers[0].param_groups[0]["lr"],
                                         "seconds": time.perf_counter() - epoch_start}
                                history.append(entry)
                                meter = _Meter()
                                if logger is not None:
                                    logger.log({"scope": "epoch", "step": step, **entry})
                                if on_epoch is not None and env.is_main:
                                    on_epoch(dict(entry))
                            if folder is not None and (end_of_epoch or (config.checkpoint_every
                                                                        and step % config.checkpoint_every == 0)):
                                last_good = save()
                del step_fn
                if env.enabled:
                    gc.collect()  # the stage's DDP wrapper goes with its gradient hooks before the next one is made
    finally:
        if logger is not None:
            logger.close()
    if ema is not None:  # what the checkpoints hold as the model, and what is evaluated
        model.load_state_dict(ema.module.state_dict())
    distributed.broadcast_buffers(model, env)  # every process ends with rank 0's BatchNorm statistics, as saved
    return TrainResult(step, history, last_good, time.perf_counter() - start_time, config.ema_decay)


_LIVE = "live."
"""Prefix of the trained weights in ``trainer.safetensors`` when the model file holds their EMA."""


class _StepSums:
    """Loss, loss parts and accuracy of one optimizer step, summed over its batches (each weighted by its share)."""

    def __init__(self) -> None:
        self.loss, self.correct, self.count = 0.0, 0, 0
        self.parts: dict[str, float] = {}

    def add(self, seen: dict[str, Any], weight: float, count: int, env: distributed.DistEnv) -> None:
        totals = seen["totals"]
        self.loss += weight * seen["mean_loss"]
        for k, v in zip(seen["parts"], totals[3:]):
            self.parts[k] = self.parts.get(k, 0.0) + weight * float(v) / env.world_size
        self.correct += int(totals[1])
        self.count += count


def _autocast(precision: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of the autocast context of ``train.precision`` (a context that does nothing for "32-true")."""
    if precision == "32-true":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def _layout(module: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Names, shapes and types of the parameters, then the buffers, in the order ``AveragedModel`` pairs them."""
    return [(name, tuple(t.shape), t.dtype) for named in (module.named_parameters(), module.named_buffers())
            for name, t in named]


def _ema_for(model: nn.Module, ema: AveragedModel | None, decay: float | None) -> AveragedModel | None:
    """The EMA of ``model``'s weights and buffers (torch's ``AveragedModel`` with ``get_ema_multi_avg_fn``).

    Made at the first stage; remade when a stage's preparation changed the
    model's parameters or buffers (``AveragedModel`` pairs them by
    position): the averages of the tensors that are still there, and the
    count of updates, carry over; a new tensor starts from its current value.
    """
    if decay is None:
        return None
    if ema is not None and _layout(ema.module) == _layout(model):
        return ema
    fresh = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    if ema is not None:
        old = ema.module.state_dict()
        with torch.no_grad():
            for key, value in fresh.module.state_dict().items():
                if key in old and old[key].shape == value.shape:
                    value.copy_(old[key])
            fresh.n_averaged.copy_(ema.n_averaged)
    return fresh


def _forward(step_fn: Callable[..., Any], x: Tensor, y: Tensor, env: distributed.DistEnv, where: dict[str, Any],
             seen: dict[str, Any]) -> Tensor:
    """Forward pass and loss of one batch (the ``compute_loss`` of
    [`training_step()`][ensemblekit.training.trainer.training_step]).

    The loss, accuracy and loss parts summed over the processes go into
    ``seen``; a NaN or infinite loss raises
    [`NonFiniteLossError`][ensemblekit.training.trainer.NonFiniteLossError] here, before the backward pass.
    """
    output, result = step_fn(x, y)
    loss = result.total
    with torch.no_grad():  # one reduction over the processes: loss, accuracy, bad inputs, loss parts
        correct = (output.ensemble().argmax(-1) == y).sum()
        local = [loss, correct, ~torch.isfinite(x).all(), *result.parts.values()]
        totals = distributed.all_sum(torch.stack([v.detach().double().reshape(()) for v in local]), env)
    mean_loss = float(totals[0]) / env.world_size
    if not math.isfinite(mean_loss):
        last_good = where["last_good"]
        kept = (f"the last good checkpoint is {last_good} (nothing was written after it)"
                if last_good else "no checkpoint had been written yet")
        cause = ("the batch holds NaN or infinite inputs" if totals[2] > 0 else
                 "the inputs are finite, so training diverged (lower train.lr or set train.grad_clip)")
        micro = f", batch part {where['micro']} of {where['per_step']}" if where.get("per_step", 1) > 1 else ""
        raise NonFiniteLossError(
            f"training stopped: the loss is {mean_loss} at step {where['step']} (epoch {where['epoch']}, "
            f"batch {where['batch']} of {where['steps_per_epoch']}{micro}); {cause}; {kept}")
    seen.update(totals=totals, mean_loss=mean_loss, parts=list(result.parts))
    return loss


def _start_stage(stage: Stage, model: nn.Module, device: torch.device) -> None:
    """What happens to the model when ``stage`` starts: its preparation, its loss, then the device."""
    if stage.prepare is not None:
        stage.prepare(model)
    if stage.loss is not None:
        model.loss_strategy = stage.loss
    model.to(device)  # modules a preparation added


def _mark_halting_trained(model: nn.Module, params: list[nn.Parameter]) -> None:
    """A halting policy whose parameters a stage trains counts as trained from then on (its checkpoints say so)."""
    policy = getattr(model, "halting", None)
    if policy is not None and not {id(p) for p in policy.parameters()}.isdisjoint(id(p) for p in params):
        policy.mark_trained()


def _stage_optimizers(stage: Stage, params: list[nn.Parameter], config: TrainConfig,
                      steps_per_epoch: int) -> tuple[list[torch.optim.Optimizer], list[Any]]:
    """The optimizers and learning-rate schedulers of ``stage`` (the trainer's own where it names none)."""
    if stage.optimizer is None:
        optimizers = [make_optimizer(params, config)]
    else:
        made = stage.optimizer(params)
        optimizers = [made] if isinstance(made, torch.optim.Optimizer) else list(made)
        if not optimizers:
            raise InvalidValueError(f"stage {stage.name!r}: its optimizer factory made no optimizer")
    if stage.lr_schedule is not None:
        schedulers = [stage.lr_schedule(o, steps_per_epoch) for o in optimizers]
    elif stage.optimizer is None:
        schedulers = [make_scheduler(optimizers[0], config, steps_per_epoch, epochs=stage.epochs)]
    else:
        schedulers = [None] * len(optimizers)
    return optimizers, schedulers


def _stage_at(step: int, bounds: list[int]) -> int:
    """The stage in which the ``step``-th optimizer step was taken (0 before any)."""
    for i in range(len(bounds) - 1):
        if bounds[i] < step <= bounds[i + 1]:
            return i
    return 0


def _optimizer_prefix(i: int) -> str:
    return "optimizer" if i == 0 else f"optimizer{i}"


def _check_resumable(directory: Path, model: nn.Module, settings: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The checkpoint's folder and manifest, after checking that it is of this model and these settings."""
    directory, manifest = ckpt.read_manifest(directory)
    manifest_path = directory / ckpt.MANIFEST
    ours = asdict(model.build_config)
    defaults = {f.name: f.default for f in fields(ModelConfig)}  # a setting added since the checkpoint: its default
    theirs_model = {k: manifest["model"].get(k, defaults.get(k)) for k in ours}
    diff = [f"model.{k}: checkpoint {theirs_model[k]!r}, this run {v!r}"
            for k, v in ours.items() if theirs_model[k] != v]
    train_defaults = {f.name: f.default for f in fields(TrainConfig)}  # a setting added since: its default
    for section, values in settings.items():
        theirs = manifest.get(section, {})
        if section == "train":
            theirs = {**{k: v for k, v in train_defaults.items() if k not in theirs}, **theirs}
        diff += [f"{section}.{k}: checkpoint {theirs.get(k)!r}, this run {v!r}" for k, v in values.items()
                 if theirs.get(k) != v and not (section == "train" and k in RESUMABLE_CHANGES)]
    if diff:
        raise ckpt.CheckpointError(f"cannot resume from {manifest_path}: it was written by a run with other "
                                   "settings (" + "; ".join(diff) + ")")
    if "trainer" not in manifest or ckpt.TRAINER_FILE not in manifest["files"]:
        raise ckpt.CheckpointError(f"{manifest_path} is a model-only checkpoint; it has no training state to resume")
    return directory, manifest


def _load_state(directory: Path, manifest: dict[str, Any], model: nn.Module, optimizers: list[torch.optim.Optimizer],
                schedulers: list[Any], env: distributed.DistEnv, seed: int, *, ema: AveragedModel | None = None,
                scaler: torch.amp.GradScaler | None = None) -> None:
    """Load weights (and their EMA), the optimizers' and schedulers' states (when given), the gradient scaler's
    and this process's RNG state."""
    ckpt.load_weights(model, directory)
    state = manifest["trainer"]
    tensors = ckpt.read_tensors(directory, ckpt.TRAINER_FILE)
    if ema is not None:  # the model file held the EMA weights; the trained ones are in the trainer file
        live = {k[len(_LIVE):]: v for k, v in tensors.items() if k.startswith(_LIVE)}
        if not live or "ema" not in state:
            raise ckpt.CheckpointError(f"{directory} holds no EMA state (written without train.ema_decay)")
        ema.module.load_state_dict(model.state_dict())
        model.load_state_dict(live)
        ema.n_averaged.fill_(state["ema"]["n_averaged"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if optimizers:
        plains = state["optimizers"] if "optimizers" in state else [state["optimizer"]]  # one, before stages
        saved = state["schedulers"] if "schedulers" in state else [state.get("scheduler")]
        if len(plains) != len(optimizers):
            raise ckpt.CheckpointError(f"{directory} holds {len(plains)} optimizer states; this stage has "
                                       f"{len(optimizers)} optimizers")
        for i, (optimizer, plain) in enumerate(zip(optimizers, plains)):
            _set_optimizer_state(optimizer, tensors, plain, _optimizer_prefix(i))
        for scheduler, scheduler_state in zip(schedulers, saved):
            if scheduler is not None:
                _set_scheduler_state(scheduler, scheduler_state)
    ranks = state.get("rng_ranks", [])
    if env.rank == 0:
        _set_rng_state(tensors, state["rng"])
    elif env.rank <= len(ranks):
        prefix = f"rank{env.rank}."
        _set_rng_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, ranks[env.rank - 1])
    else:  # the checkpoint's run had fewer processes: this one starts a fresh stream
        seed_everything(distributed.rank_seed(seed, env.rank) + state["step"])


def _set_scheduler_state(scheduler: Any, saved: dict[str, Any]) -> None:
    """Load a scheduler state read back from JSON.

    JSON turns integer dict keys into strings (``MultiStepLR``'s milestone
    ``Counter``): such entries are set by the scheduler's constructor, so
    the freshly made scheduler's own are kept.
    """
    fresh = scheduler.state_dict()
    state = {k: (fresh[k] if isinstance(fresh.get(k), dict) and any(not isinstance(key, str) for key in fresh[k])
                 else v) for k, v in saved.items()}
    scheduler.load_state_dict(state)


class _progress:
    """A progress bar (tqdm, rich or none) with the running loss and accuracy."""

    def __init__(self, kind: str, total: int, initial: int, desc: str):
        self.kind, self.total, self.initial, self.desc = kind, total, initial, desc

    def __enter__(self) -> _progress:
        if self.kind == "tqdm":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, desc=self.desc, file=sys.stderr,
                            dynamic_ncols=True)
        elif self.kind == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                                console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task(self.desc, total=self.total, completed=self.initial, stats="")
        return self

    def update(self, loss: float | None = None, accuracy: float | None = None) -> None:
        """One more step; the running loss and accuracy shown when given."""
        if self.kind == "tqdm":
            if loss is not None and accuracy is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{100 * accuracy:.1f}%", refresh=False)
            self.bar.update(1)
        elif self.kind == "rich":
            stats = "" if loss is None or accuracy is None else f"loss {loss:.4f}  acc {100 * accuracy:.1f}%"
            self.bar.update(self.task, advance=1, stats=stats)

    def __exit__(self, *exc: Any) -> None:
        if self.kind == "tqdm":
            self.bar.close()
        elif self.kind == "rich":
            self.bar.stop()


# ------------------------------------------------------------------ evaluation
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, device: str | torch.device = "auto",
             num_workers: int = 0, progress: str = "none") -> Report:
    """Anytime report of ``model`` on ``dataset``: every prefix's accuracy, diversity, ECE, FLOPs, params.

    ``progress``: a bar of the batches evaluated on stderr, ``"tqdm"``, ``"rich"`` or ``"none"`` (as in training).
    """
    if progress not in PROGRESS:
        raise InvalidValueError(f"progress must be one of {', '.join(PROGRESS)}, got {progress!r}")
    device = select_device(device) if isinstance(device, str) else device
    model.to(device).eval()
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers)
    with _progress(progress, len(loader), 0, "evaluate") as bar:
        members, labels = collect_members(model.forward_members, _counted(loader, bar), device)
    costs = model.cost_table(input_size=tuple(dataset[0][0].shape))  # FLOPs per image of this dataset
    return anytime_report(members, labels, model.aggregator, costs=costs)


def _counted(loader: Iterable[Any], bar: _progress) -> Iterator[Any]:
    """The batches of ``loader``, the bar advanced after each is used."""
    for batch in loader:
        yield batch
        bar.update()


def load_split(data: DataConfig, split: str, augment: bool = False, limit: int | None = None,
               data_config: dict[str, Any] | None = None, seed: int | None = None):
    """``(dataset, info)`` of one split as ``data`` describes it, cut to a stratified subset of ``limit`` items.

    The subset ([`stratified_subset()`][ensemblekit.training.data.stratified_subset]) takes every class in
    proportion to its share of the split, drawn with ``seed``: a run's training
    subset uses the run's seed (``train.seed``), so a resumed run trains on the
    same items; ``None`` is the fixed [`SPLIT_SEED`][ensemblekit.training.data.SPLIT_SEED], which evaluation
    subsets use so that every run, every seed of a table and ``ensemblekit
    evaluate --max-items`` score the same images.

    ``data_config``: timm's data config of the backbone, for ImageFolder
    transforms (see ``ensemblekit.training.data.load_dataset``).
    """
    dataset, info = load_dataset(data.name, split, root=data.root, augment=augment, image_size=data.image_size,
                                 data_config=data_config)
    if limit is not None and limit < len(dataset):
        keep = stratified_subset(dataset_labels(dataset), limit, SPLIT_SEED if seed is None else seed)
        dataset = Subset(dataset, keep.tolist())
    return dataset, info


def data_settings(data: DataConfig) -> dict[str, Any]:
    """The data section as a run's checkpoints record it (and a resume must find it unchanged): its fields, and
    ``subset``, the rule that cut the splits, when ``max_train_items`` or ``max_eval_items`` cut them."""
    settings = asdict(data)
    if data.max_train_items is not None or data.max_eval_items is not None:
        settings["subset"] = SUBSET_RULE
    return settings


class OutputFolderError(EnsembleKitError, OSError):
    """The output folder of a run cannot be written."""


def check_output_folder(path: Path) -> None:
    """Prove, before any work, that ``path`` is or can be made a writable folder (nothing is left behind).

    The folder itself, or its nearest existing parent, gets a file written and removed.

    Raises:
        OutputFolderError: ``path`` or a parent is a file, or cannot be written (permissions, read-only file system).
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, a file"
        raise OutputFolderError(f"output folder {path} {where}; choose a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputFolderError(f"cannot write to output folder {path}: {err.strerror or err}") from err


def run(config: RunConfig, out_dir: str | Path, *, resume: bool = False,
        log: Callable[[str], None] = print) -> RunResult:
    """Build, train and evaluate as ``config`` says; write checkpoints, a report and a plot to ``out_dir``.

    Files: ``checkpoints/``, ``report.json``, ``report.txt`` and
    ``accuracy_vs_flops.png``; they are written only when the run succeeds,
    and under torchrun only by rank 0 (every process evaluates). With
    ``train.logger``, ``metrics.csv`` or ``tensorboard/`` as training goes.
    With ``train.ema_decay`` the EMA weights are evaluated (logged, and
    named in the report's title).
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir)
    check_precision(config.train.precision, select_device(config.train.device))
    config.model.check_files()  # before any work
    data = config.data
    images = backbone_data_config(config.model) if data.name == "imagefolder" else None
    train_set, info = load_split(data, data.train_split, augment=data.augment, limit=data.max_train_items,
                                 data_config=images, seed=config.train.seed)
    eval_set, _ = load_split(data, data.eval_split, limit=data.max_eval_items, data_config=images)
    model_config = config.model.for_dataset(info)
    seed_everything(config.train.seed)
    model = build_ensemble(model_config)
    extra = {"data": data_settings(config.data)}
    result = train(model, train_set, config.train, out_dir=out_dir, resume=resume,
                   num_workers=config.data.num_workers, extra=extra)
    if result.ema_decay is not None and distributed.detect().is_main:
        log(f"evaluating the EMA of the weights (train.ema_decay = {result.ema_decay}); the checkpoints' model "
            "files hold it too")
    report = evaluate(model, eval_set, config.data.eval_batch_size, config.train.device, config.data.num_workers)
    weights = "" if result.ema_decay is None else f", EMA weights (decay {result.ema_decay})"
    title = (f"{model_config.backbone} on {info.name} ({data.eval_split}): {report.num_samples} samples, "
             f"{report.num_members} members{weights}")
    origin = provenance(data, data.eval_split, info.source, len(eval_set), result.checkpoint,
                        select_device(config.train.device), max_items=data.max_eval_items)
    files = write_report(report, out_dir, title, log=log, provenance=origin) if distributed.detect().is_main else {}
    return RunResult(model, result, report, {"checkpoint": result.checkpoint, **files})


def backbone_data_config(model: ModelConfig) -> dict[str, Any]:
    """timm's data config of the backbone ``model`` names (its architecture's, at its ``img_size`` if given).

    ImageFolder images are transformed as it says (input size, mean, std,
    crop, interpolation), unless the data section sets ``image_size``.
    """
    from ensemblekit.backbones.transforms import data_config

    size = model.backbone_options.get("img_size")
    try:
        return data_config(model.backbone, image_size=size if isinstance(size, (int, list, tuple)) else None)
    except ValueError as err:
        raise ConfigError(f"model.backbone: {err}") from err


def provenance(data: DataConfig, split: str, source: str, num_samples: int, checkpoint: str | Path | None,
               device: str | torch.device, max_items: int | None = None) -> dict[str, Any]:
    """Where a report's numbers come from, as ``report.json`` records them under ``"provenance"``.

    The versions of ensemblekit, torch, timm and Python; the dataset (name,
    split, root, the files read, samples evaluated, the limit on them); the
    checkpoint evaluated; the device (with the GPU's name).
    """
    import importlib.metadata
    import platform

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else None
    return {
        "versions": {"ensemblekit": version("ensemblekit"), "torch": torch.__version__, "timm": version("timm"),
                     "python": platform.python_version(), "cuda": torch.version.cuda},
        "dataset": {"name": data.name, "split": split, "root": None if data.root is None else str(data.root),
                    "source": source or None, "num_samples": num_samples, "max_items": max_items,
                    "subset": None if max_items is None else f"{SUBSET_RULE}, seed {SPLIT_SEED}",
                    "image_size": data.image_size},
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        "device": {"type": device.type, "index": device.index, "name": name},
    }


def write_report(report: Report, out_dir: Path, title: str, name: str = "model",
                 log: Callable[[str], None] = print, provenance: dict[str, Any] | None = None) -> dict[str, Path]:
    """Print the report's table and write ``report.json``, ``report.txt`` and the plot into ``out_dir``.

    ``provenance`` (what the ``provenance`` function returns) is written into ``report.json`` under that key.
    """
    table = report.table(title)
    log(table)
    files = {"report_json": out_dir / "report.json", "report_txt": out_dir / "report.txt",
             "plot": out_dir / "accuracy_vs_flops.png"}
    record = report.to_dict() if provenance is None else {**report.to_dict(), "provenance": provenance}
    ckpt.atomic_write(files["report_json"], json.dumps(record, indent=2) + "\n")
    ckpt.atomic_write(files["report_txt"], table)
    write_plot({name: report}, files["plot"], title)
    return files


def write_plot(reports: dict[str, Report], path: Path, title: str) -> Path:
    """[`plot_accuracy_vs_flops()`][ensemblekit.evaluation.reports.plot_accuracy_vs_flops] written atomically
    (temp file, then rename)."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        plot_accuracy_vs_flops(reports, tmp, title=title)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def run_many(configs: dict[str, RunConfig], out_dir: str | Path, *, resume: bool = False,
             log: Callable[[str], None] = print, title: str | None = None) -> dict[str, RunResult]:
    """[`run()`][ensemblekit.training.trainer.run] each labelled config into ``out_dir/<label>``, then plot
    every curve into one figure.

    Returns:
        label -> [`RunResult`][ensemblekit.training.trainer.RunResult]; the figure is ``out_dir/accuracy_vs_flops.png``.
    """
    out_dir = Path(out_dir)
    results = {}
    for label, config in configs.items():
        log(f"== {label}")
        results[label] = run(config, out_dir / slug(label), resume=resume, log=log)
    write_plot({label: r.report for label, r in results.items()}, out_dir / "accuracy_vs_flops.png",
               title or "accuracy vs FLOPs")
    return results


def slug(label: str) -> str:
    """A folder name for a label: ``"L_I+L_HD"`` -> ``"l_i+l_hd"``."""
    return re.sub(r"[^a-z0-9_+.-]+", "-", label.lower()).strip("-") or "run"
