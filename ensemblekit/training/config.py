"""Run configurations: what to build, what to train on and how, from TOML or YAML.

A config file has up to three sections; every key is optional except
``model.backbone``::

    [model]
    backbone = "resnet10t"                          # a timm model name
    backbone_options = { stem_width = 16, channels = [16, 32, 64, 128] }
    # pretrained = true                             # the backbone's weights (timm's hub), or from a local file:
    # pretrained_file = "resnet10t.safetensors"     # then set init = "pretrained" (each member starts from them)
    topology = { name = "tree", depth = 3 }         # a name or { name = ..., options }
    aggregator = "mean"
    loss = { name = "hierarchical_distillation", alpha = 0.5, temperature = 2.0 }

    [data]
    name = "digits"                                 # digits | cifar10 | cifar100 | imagefolder
    # max_train_items = 500                         # a stratified subset: every class in proportion, drawn
                                                    # with train.seed (the same items on a resume)

    [train]
    epochs = 10
    optimizer = "sgd"
    lr = 0.05
    # precision = "bf16-mixed"                      # "32-true" (default), "bf16-mixed" or "16-mixed" (CUDA)
    # accumulate = 4                                # optimizer step every 4 batches of batch_size
    # ema_decay = 0.999                             # evaluate and save an EMA of the weights
    # logger = "csv"                                # metrics.csv in the run folder, or "tensorboard"

Instead of topology/aggregator/loss, ``recipe = "hne"`` (or ``"ensemblenet"``,
``"multi_exit"``, ``"irene"``)
with ``recipe_options = { depth = 3 }`` builds the ensemble as the paper did.
Unknown keys and invalid values fail with a message that names the key and
the allowed values. [`ModelConfig`][ensemblekit.training.config.ModelConfig] is also what a checkpoint stores to
rebuild its ensemble ([`build_ensemble()`][ensemblekit.training.config.build_ensemble]), so loading never runs
pickled code.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args, get_type_hints

__all__ = [
    "DATASETS",
    "LOGGERS",
    "OPTIMIZERS",
    "PRECISIONS",
    "PROGRESS",
    "RECIPE_ARGUMENTS",
    "RESUMABLE_CHANGES",
    "SCHEDULES",
    "SPLITS",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "build_ensemble",
    "check_precision",
    "load_config",
    "section_from_dict",
    "tensorboard_available",
]

if sys.version_info >= (3, 11):
    import tomllib
else:  # requires-python is >= 3.10: tomli is tomllib's backport
    import tomli as tomllib

from ensemblekit.core.initialisation import INIT_MODES
from ensemblekit.core.registry import AGGREGATORS, HALTING_POLICIES, LOSSES, RECIPES, TOPOLOGIES, Registry
from ensemblekit.core.registry import SCHEDULES as STAGE_SCHEDULES
from ensemblekit.errors import EnsembleKitError, PathNotFoundError

RECIPE_ARGUMENTS = ("backbone", "init", "halting", "example_input")
"""What [`build_ensemble()`][ensemblekit.training.config.build_ensemble] passes a recipe itself, next to
``model.recipe_options``."""
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
PROGRESS = ("tqdm", "rich", "none")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
"""``train.precision``: Lightning's names. "32-true": float32; "bf16-mixed": the forward pass and loss under
``torch.autocast`` in bfloat16 (CPU and CUDA); "16-mixed": in float16 with ``torch.amp.GradScaler`` (CUDA only)."""
LOGGERS = (None, "csv", "tensorboard")
"""``train.logger``: None (history only), "csv" (``metrics.csv`` in the run folder) or "tensorboard"."""
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "fashion-mnist")
SPLITS = ("train", "val", "trainval", "test")


class ConfigError(EnsembleKitError, ValueError):
    """A configuration key or value that is not allowed; the message names it."""


@dataclass
class ModelConfig:
    """How to build an ensemble: a timm backbone plus a recipe or components.

    Attributes:
        backbone: timm model name, randomly initialised unless ``pretrained``
            or ``pretrained_file`` says otherwise.
        num_classes: classes (filled in from the dataset when omitted; a different
            number than the dataset's is refused).
        in_chans: input channels (filled in from the dataset when omitted; a
            different number than the dataset's is refused).
        image_size: side of the square inputs (for splitting and FLOP counts).
        backbone_options: extra keywords of ``timm.create_model``.
        recipe: a registered recipe, e.g. "hne", "ensemblenet", "multi_exit" or
            "irene" (then topology, aggregator, loss come from the recipe and
            ``recipe_options``), or None.
        recipe_options: keywords of the recipe (``depth``, ``branching``,
            ``alpha``, ``branches``, ``fork``, ``width``, ``loss``, ...).
        topology: topology name or mapping ``{"name": ..., **options}``
            (without a recipe; default "tree").
        aggregator: aggregator name or mapping (without a recipe; default "mean").
        loss: loss name or mapping (without a recipe; default "independent").
        halting: halting policy name or mapping, or None.
        init: "reinit", "pretrained", "pretrained+noise", "copy" or "auto"
            (see [`ensemblekit.core.initialisation`][ensemblekit.core.initialisation]).
        num_blocks: blocks to cut the backbone into (without a recipe; default:
            what the topology needs).
        pretrained: load the backbone's pretrained weights from timm's hub
            (``timm.create_model(..., pretrained=True)``; needs a network, or
            the weights in the hub's cache).
        pretrained_file: load them from this local file instead (``.safetensors``,
            ``.pth`` or ``.bin``, a ``state_dict`` of the same architecture,
            through timm's ``pretrained_cfg_overlay=dict(file=...)``); implies
            ``pretrained``. Checked to exist before any work. As timm does, a
            classifier of another number of classes than the weights' config
            is not loaded. With either, ``init`` must keep the weights
            ("pretrained", "pretrained+noise", "copy" or "auto"), not "reinit".
            A checkpoint's model is rebuilt without reading them: its own
            weights are loaded.
    """

    backbone: str
    num_classes: int | None = None
    in_chans: int | None = None
    image_size: int = 32
    backbone_options: dict = field(default_factory=dict)
    recipe: str | None = None
    recipe_options: dict = field(default_factory=dict)
    topology: str | dict | None = None
    aggregator: str | dict | None = None
    loss: str | dict | None = None
    halting: str | dict | None = None
    init: str = "reinit"
    num_blocks: int | None = None
    pretrained: bool = False
    pretrained_file: str | None = None

    @property
    def loads_weights(self) -> bool:
        """Whether the backbone is created with pretrained weights (``pretrained`` or ``pretrained_file``)."""
        return self.pretrained or self.pretrained_file is not None

    def check_files(self) -> None:
        """Raise a ``ConfigError`` when ``pretrained_file`` is set but is not a file."""
        if self.pretrained_file is not None and not Path(self.pretrained_file).expanduser().is_file():
            where = Path(self.pretrained_file).expanduser().resolve()
            raise ConfigError(f"model.pretrained_file {self.pretrained_file!r} is not a file ({where}); give the path "
                              "of a weights file (.safetensors, .pth or .bin) of the backbone")

    def for_dataset(self, info: Any) -> ModelConfig:
        """This config with the dataset's classes, channels and image size (a ``DatasetInfo``).

        Raises:
            ConfigError: ``num_classes`` or ``in_chans`` is set to another value than the dataset's.
        """
        for key, ours, theirs in (("num_classes", self.num_classes, info.num_classes),
                                  ("in_chans", self.in_chans, info.in_chans)):
            if ours is not None and ours != theirs:
                raise ConfigError(f"model.{key} = {ours} but dataset {info.name!r} has {theirs}; "
                                  f"set it to {theirs} or leave it out (it is taken from the dataset)")
        return replace(self, num_classes=info.num_classes, in_chans=info.in_chans, image_size=info.image_size)

    def __post_init__(self) -> None:
        if self.recipe is not None:
            _choice("model.recipe", self.recipe, (*RECIPES.names(), None))
            for key in ("topology", "aggregator", "loss", "num_blocks"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"model.{key} cannot be set next to recipe {self.recipe!r}, which decides "
                                      f"it; give recipe options in model.recipe_options instead")
            _recipe_options(self.recipe, self.recipe_options)
        elif self.recipe_options:
            raise ConfigError("model.recipe_options is set but model.recipe is not; name a recipe: "
                              + ", ".join(RECIPES.names()))
        if self.num_blocks is not None:
            _at_least("model.num_blocks", self.num_blocks, 1)
        _choice("model.init", self.init, INIT_MODES)
        for key, registry in (("topology", TOPOLOGIES), ("aggregator", AGGREGATORS), ("loss", LOSSES),
                              ("halting", HALTING_POLICIES)):
            _component(f"model.{key}", getattr(self, key), registry, build=key in ("topology", "loss"))
        if self.num_classes is not None:
            _at_least("model.num_classes", self.num_classes, 1)
        if self.in_chans is not None:
            _at_least("model.in_chans", self.in_chans, 1)
        _at_least("model.image_size", self.image_size, 1)
        _backbone_options(self.backbone_options)
        if not isinstance(self.pretrained, bool):
            raise ConfigError(f"model.pretrained must be true or false, got {self.pretrained!r}")
        if self.pretrained_file is not None and not (isinstance(self.pretrained_file, str) and self.pretrained_file):
            raise ConfigError(f"model.pretrained_file must be the path of a weights file, got {self.pretrained_file!r}")
        if self.loads_weights and self.init == "reinit":
            key = "model.pretrained_file" if self.pretrained_file is not None else "model.pretrained = true"
            raise ConfigError(f"{key} loads the backbone's weights, but model.init = 'reinit' (the default) draws "
                              "every member anew and discards them: set model.init = 'pretrained' (each member "
                              "starts from the weights, its classifier drawn anew), 'pretrained+noise', 'copy' or "
                              "'auto'")


@dataclass
class DataConfig:
    """Which dataset to train and evaluate on.

    Attributes:
        name: "digits" (bundled), "cifar10", "cifar100" or "imagefolder".
        root: data folder (CIFAR, ImageFolder).
        image_size: side of the images (None: the dataset's default; for
            ImageFolder the backbone's input size, from timm's data config).
        augment: random crops (and flips) on the training split (ImageFolder:
            timm's training transform for the backbone's data config).
        train_split: split to train on ("train" or "trainval").
        eval_split: split the final report is computed on.
        num_workers: data-loading worker processes.
        eval_batch_size: batch size of evaluation.
        max_train_items: train on a subset of this many items (quick checks):
            stratified, each class in proportion to its share of the split
            (a class-sorted ImageFolder keeps every class), drawn with
            ``train.seed``, so the same seed gives the same items on every
            run and resume (see [`load_split()`][ensemblekit.training.trainer.load_split]).
        max_eval_items: evaluate on a stratified subset of this many items,
            drawn with a fixed seed: every run and seed, and ``ensemblekit
            evaluate --max-items``, score the same images.
    """

    name: str = "digits"
    root: str | None = None
    image_size: int | None = None
    augment: bool = True
    train_split: str = "train"
    eval_split: str = "test"
    num_workers: int = 0
    eval_batch_size: int = 256
    max_train_items: int | None = None
    max_eval_items: int | None = None

    def __post_init__(self) -> None:
        _choice("data.name", self.name, DATASETS)
        _choice("data.train_split", self.train_split, SPLITS)
        _choice("data.eval_split", self.eval_split, SPLITS)
        if self.image_size is not None:
            _at_least("data.image_size", self.image_size, 1)
        _at_least("data.num_workers", self.num_workers, 0)
        _at_least("data.eval_batch_size", self.eval_batch_size, 1)
        for key in ("max_train_items", "max_eval_items"):
            if getattr(self, key) is not None:
                _at_least(f"data.{key}", getattr(self, key), 1)


@dataclass
class TrainConfig:
    """Optimisation settings of [`ensemblekit.training.trainer.train()`][ensemblekit.training.trainer.train].

    Attributes:
        epochs: passes over the training split.
        batch_size: the global training batch size; under torchrun each of
            the N processes takes ``batch_size / N`` of it.
        optimizer: "sgd" (with momentum) or "adamw".
        lr: peak learning rate.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        weight_decay: L2 weight decay.
        schedule: "cosine" (to 0 over the run), "step" (times ``gamma`` every
            ``step_epochs`` epochs) or "constant"; stepped every batch.
        step_epochs: epochs between decays of the step schedule.
        gamma: decay factor of the step schedule.
        grad_clip: clip the gradient norm to this (None: no clipping).
        seed: seed of initialisation, shuffling and augmentation.
        device: "auto" (cuda, then mps, then cpu) or a torch device string.
        progress: progress bar: "tqdm", "rich" or "none".
        checkpoint_every: also save every this many steps (0: at epoch ends only).
        sync_batchnorm: under torchrun on GPUs, compute BatchNorm statistics
            over the global batch instead of each process's share (see
            ``docs/distributed.md``).
        keep_checkpoints: how many recent checkpoints to keep.
        stages: the training schedule, the stages the trainer runs (see
            [`ensemblekit.core.stages`][ensemblekit.core.stages]): a registered name ("joint",
            "sequential", "irene", "two_phase", or a plugin's) or
            ``{name = ..., **options}``; None: the loss's own (IRENE's loss
            says "sequential"), else "joint".
        precision: "32-true" (default: float32), "bf16-mixed" (forward pass
            and loss under ``torch.autocast`` in bfloat16, on the CPU or a
            GPU that has it) or "16-mixed" (float16 autocast with
            ``torch.amp.GradScaler``; CUDA only, refused on other devices).
            Lightning's names; weights, optimizer state and evaluation stay float32.
        accumulate: gradient accumulation: the optimizer steps once every
            ``accumulate`` batches of ``batch_size``, each batch's loss
            weighted by its share of the step (``1 / accumulate``), so a step
            sees ``accumulate * batch_size`` items. Steps, the learning-rate
            schedule, ``checkpoint_every`` and ``log_every`` count optimizer
            steps; an epoch is cut to whole steps, and checkpoints are written
            between steps only, so a resume is exact.
        ema_decay: keep an exponential moving average of the weights and
            buffers (``torch.optim.swa_utils.AveragedModel`` with
            ``get_ema_multi_avg_fn(ema_decay)``, updated after every optimizer
            step, the first update a copy), in (0, 1), e.g. 0.999; None: off.
            When on, checkpoints' ``model.safetensors`` holds the EMA weights
            (so loading and evaluating a run use them), the training weights
            are kept in ``trainer.safetensors`` for an exact resume, and
            ``train()`` returns with the EMA weights in the model. A stage
            whose preparation adds or renames parameters (IMTA's ISC exits)
            starts their average from their values then.
        logger: None (default), "csv" (``metrics.csv`` in the run folder: a
            row per epoch, and per ``log_every`` steps) or "tensorboard"
            (``tensorboard/`` in the run folder, through
            ``torch.utils.tensorboard``; needs the ``tensorboard`` package,
            which ensemblekit does not install). Written by rank 0; a resumed
            run drops the rows written after its checkpoint.
        log_every: with a logger, also write a row every this many optimizer
            steps (that step's loss, accuracy and learning rate); 0: per epoch only.
    """

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_epochs: int = 30
    gamma: float = 0.1
    grad_clip: float | None = None
    seed: int = 0
    device: str = "auto"
    progress: str = "tqdm"
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    sync_batchnorm: bool = False
    stages: str | dict | None = None
    precision: str = "32-true"
    accumulate: int = 1
    ema_decay: float | None = None
    logger: str | None = None
    log_every: int = 0

    def __post_init__(self) -> None:
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _choice("train.schedule", self.schedule, SCHEDULES)
        _choice("train.progress", self.progress, PROGRESS)
        _at_least("train.epochs", self.epochs, 1)
        _at_least("train.batch_size", self.batch_size, 1)
        _at_least("train.step_epochs", self.step_epochs, 1)
        _at_least("train.checkpoint_every", self.checkpoint_every, 0)
        _at_least("train.keep_checkpoints", self.keep_checkpoints, 1)
        for key in ("lr", "momentum", "gamma", "weight_decay", "grad_clip"):
            value = getattr(self, key)
            if value is None and key == "grad_clip":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"train.{key} must be a number, got {value!r}")
        if not 0 < self.lr < float("inf"):
            raise ConfigError(f"train.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"train.gamma must be in (0, 1], got {self.gamma}")
        if not 0 <= self.weight_decay < float("inf"):
            raise ConfigError(f"train.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"train.grad_clip must be > 0 or omitted, got {self.grad_clip}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"train.seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError, TypeError) as err:
                raise ConfigError(f"train.device {self.device!r} is not a device: use 'auto', 'cpu', 'cuda', "
                                  "'cuda:1' or 'mps'") from err
        if self.stages is not None:
            try:
                STAGE_SCHEDULES.check(self.stages, context=("ensemble", "settings"))
            except (KeyError, TypeError, ValueError) as err:
                raise ConfigError(f"train.stages: {err}") from None
        _choice("train.precision", self.precision, PRECISIONS)
        if self.device != "auto":
            check_precision(self.precision, self.device)
        _at_least("train.accumulate", self.accumulate, 1)
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be a number in (0, 1), e.g. 0.999, or omitted (no EMA); "
                              f"got {self.ema_decay}")
        _choice("train.logger", self.logger, LOGGERS)
        _at_least("train.log_every", self.log_every, 0)
        if self.log_every and self.logger is None:
            raise ConfigError(f"train.log_every = {self.log_every} but train.logger is not set; set "
                              "train.logger = 'csv' or 'tensorboard', or leave log_every out")
        if self.logger == "tensorboard" and not tensorboard_available():
            raise ConfigError("train.logger = 'tensorboard' needs the tensorboard package, which is not installed "
                              "(ensemblekit does not depend on it): pip install tensorboard, or use "
                              "train.logger = 'csv'")


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be used (the ``tensorboard`` package is importable)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def check_precision(precision: str, device: Any) -> None:
    """Refuse a ``train.precision`` that ``device`` (a torch device or its name) cannot run.

    Raises:
        ConfigError: "16-mixed" off CUDA (float16 autocast needs gradient scaling, which ensemblekit does on
            CUDA only), or "bf16-mixed" on a GPU without bfloat16.
    """
    import torch

    kind = torch.device(device).type
    if precision == "16-mixed" and kind != "cuda":
        raise ConfigError(f"train.precision = '16-mixed' (float16 autocast with gradient scaling) needs a CUDA "
                          f"device; this run is on {kind!r}: use 'bf16-mixed' (bfloat16 autocast, which the CPU "
                          "has) or '32-true'")
    if precision == "bf16-mixed" and kind == "cuda" and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision = 'bf16-mixed' but this GPU has no bfloat16: use '16-mixed' or '32-true'")


# Settings that may change when a run is resumed without changing its results.
RESUMABLE_CHANGES = frozenset({"device", "progress", "checkpoint_every", "keep_checkpoints", "logger", "log_every"})


@dataclass
class RunConfig:
    """A whole run: model, data and training (the three sections of a config file)."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> RunConfig:
        """Validate a mapping with sections ``model``, ``data``, ``train``."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
        _check_keys(data, ("model", "data", "train"), "", source)
        if "model" not in data:
            raise ConfigError(f"{source}: missing section [model] (with at least backbone = \"<timm model name>\")")
        return cls(
            model=section_from_dict(ModelConfig, data["model"], "model", source),
            data=section_from_dict(DataConfig, data.get("data", {}), "data", source),
            train=section_from_dict(TrainConfig, data.get("train", {}), "train", source),
        )


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML (``.toml``) or YAML (``.yaml``/``.yml``) run config.

    Files the config names (``model.pretrained_file``) are checked to exist.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: a syntax error, unknown key or invalid value, or a
            missing file (the message names the file and the key).
    """
    path = Path(path)
    if not path.is_file():
        raise PathNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from err
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from err
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=_unique_key_loader())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
        data = {} if data is None else data
    else:
        raise ConfigError(f"{path}: unknown config format {suffix!r}; use .toml, .yaml or .yml")
    config = RunConfig.from_dict(data, source=str(path))
    try:
        config.model.check_files()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return config


def _unique_key_loader() -> type:
    """A YAML safe loader that refuses a key given twice in one mapping (TOML refuses it too)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                        key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def section_from_dict(cls: type, data: Any, section: str, source: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: [{section}] must be a mapping, got {type(data).__name__}")
    names = [f.name for f in fields(cls)]
    _check_keys(data, names, section, source)
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{source}: [{section}] needs {', '.join(missing)}")
    hints = get_type_hints(cls)
    values = {k: _check_type(f"{section}.{k}", v, hints[k], source) for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def build_ensemble(config: ModelConfig, pretrained_weights: bool = True):
    """Create the timm backbone and wrap it as ``config`` says; returns an Ensemble.

    The ensemble remembers ``config`` (as ``ensemble.build_config``) so that
    [`ensemblekit.training.checkpoint.save()`][ensemblekit.training.checkpoint.save] can store it next to the weights.

    Args:
        config: what to build.
        pretrained_weights: load the weights ``config.pretrained`` or
            ``config.pretrained_file`` name (off when a checkpoint's own weights
            are loaded next: then neither the file nor a network is needed).
    """
    import torch

    from ensemblekit.backbones import UnknownBackboneError, create_backbone
    from ensemblekit.build import wrap

    if config.num_classes is None:
        raise ConfigError("model.num_classes is not set (it is normally taken from the dataset)")
    weights: dict[str, Any] = {}
    if pretrained_weights and config.loads_weights:
        config.check_files()
        weights["pretrained"] = True
        if config.pretrained_file is not None:
            weights["pretrained_cfg_overlay"] = {"file": str(Path(config.pretrained_file).expanduser())}
    try:
        backbone = create_backbone(config.backbone, num_classes=config.num_classes, in_chans=config.in_chans or 3,
                                   **config.backbone_options, **weights)
    except UnknownBackboneError as err:
        raise ConfigError(f"model.backbone: {err}") from err
    except Exception as err:  # whatever timm raises for these options is a config error
        if weights:
            where = (f"model.pretrained_file {config.pretrained_file!r}" if config.pretrained_file is not None else
                     "timm's hub (model.pretrained = true; without a network, download the weights elsewhere and "
                     "set model.pretrained_file to the file)")
            raise ConfigError(f"timm model {config.backbone!r} (backbone_options {config.backbone_options}) with "
                              f"pretrained weights from {where}: {type(err).__name__}: {_first_lines(err)}") from err
        raise ConfigError(f"model.backbone_options {config.backbone_options} are not accepted by "
                          f"timm model {config.backbone!r}: {type(err).__name__}: {err}") from err
    example = torch.zeros(1, config.in_chans or 3, config.image_size, config.image_size)
    try:
        if config.recipe is not None:
            ensemble = RECIPES.create(config.recipe, backbone=backbone, init=config.init, halting=config.halting,
                                      example_input=example, **config.recipe_options)
        else:
            ensemble = wrap(backbone, config.topology or "tree", aggregator=config.aggregator or "mean",
                            loss=config.loss or "independent", halting=config.halting, init=config.init,
                            num_blocks=config.num_blocks, example_input=example)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"[model] cannot be built as configured ({_summary(config)}): {err}") from err
    if ensemble.input_size is None:
        ensemble.example_size = (config.image_size, config.image_size)
    ensemble.build_config = config
    return ensemble


# ------------------------------------------------------------------ checks
def _first_lines(err: Exception, keep: int = 3) -> str:
    """The first ``keep`` lines of an error's message on one line (a state_dict mismatch lists every tensor)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    more = f" ... ({len(lines) - keep} more)" if len(lines) > keep else ""
    return " ".join(lines[:keep]) + more


_OWN_KEYS = {"num_classes": "model.num_classes", "in_chans": "model.in_chans", "pretrained": "model.pretrained"}


def _backbone_options(options: dict) -> None:
    """Refuse backbone options that the model section sets itself (they would be given twice)."""
    for key, own in _OWN_KEYS.items():
        if key in options:
            raise ConfigError(f"model.backbone_options cannot set {key}: set {own} instead")
    overlay = options.get("pretrained_cfg_overlay")
    if isinstance(overlay, dict) and "file" in overlay:
        raise ConfigError("model.backbone_options.pretrained_cfg_overlay cannot name a weights file: set "
                          "model.pretrained_file instead")


def _summary(config: ModelConfig) -> str:
    if config.recipe is not None:
        return f"recipe={config.recipe!r}, recipe_options={config.recipe_options}"
    keys = ("topology", "aggregator", "loss", "halting", "num_blocks")
    return ", ".join(f"{k}={getattr(config, k)!r}" for k in keys if getattr(config, k) is not None) or "defaults"


def _recipe_options(recipe: str, options: dict) -> None:
    """Check ``options`` with the registry's checks of recipe ``recipe`` (named unknown or wrongly typed keys)."""
    taken = sorted(set(options) & set(RECIPE_ARGUMENTS))
    if taken:
        raise ConfigError(f"model.recipe_options cannot set {', '.join(taken)}: the config passes the backbone "
                          "and model.init, model.halting, model.image_size itself")
    try:
        RECIPES.check(recipe, context=RECIPE_ARGUMENTS, **options)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"model.recipe_options: {err}") from None


def _check_keys(data: dict, allowed: Any, section: str, source: str) -> None:
    allowed = list(allowed)
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"[{section}]" if section else "top level"
            raise ConfigError(f"{source}: unknown key {key!r} in {where}{hint}; allowed keys: {', '.join(allowed)}")


def _check_type(key: str, value: Any, hint: Any, source: str) -> Any:
    """``value`` if it fits the annotation ``hint`` (ints are accepted as floats)."""
    options = get_args(hint) or (hint,)
    for option in options:
        if option is type(None) and value is None:
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool, dict) and isinstance(value, option):
            return value
    names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise ConfigError(f"{source}: {key} must be {names}, got {value!r} ({type(value).__name__})")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        shown = ", ".join("none" if a is None else repr(a) for a in allowed)
        raise ConfigError(f"{key} must be one of {shown}; got {value!r}")


def _at_least(key: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _component(key: str, spec: Any, registry: Registry, build: bool) -> None:
    """Check a component spec with the registry's checks (the errors list the known names and options).

    ``build``: also build it, to check the option values (cheap for topologies and losses; the
    others are given ``num_members`` when the ensemble is built).
    """
    if spec is None:
        return
    try:
        if build:
            registry.create(spec)
        else:
            registry.check(spec, context=("num_members",))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None
