"""Checkpoints: a folder of safetensors weights and a JSON manifest, written atomically.

A checkpoint folder holds

* ``config.json``: the format version, the *build record* that rebuilds the
  ensemble (``"ensemble"``, see below), the
  :class:`~ensemblekit.training.config.ModelConfig` it was built from when
  there is one (``"model"``: what the CLI and the trainer build), the size
  and SHA-256 of every other file, and (for training checkpoints) the
  JSON-able training state;
* ``model.safetensors``: the ensemble's ``state_dict``, halting state
  included (a calibrated :class:`~ensemblekit.components.halting.Budgeted`
  policy's thresholds, a learned selector's weights);
* ``trainer.safetensors`` (training checkpoints only): optimizer tensors and
  RNG states.

The build record says how the ensemble was built: the
:func:`~ensemblekit.wrap` call (the backbone's timm spec, ``num_classes``,
``num_blocks``, the example input's shape), the recipe and its options, or
the ``ModelConfig``; then the preparations applied since (IMTA's ISC heads
and gradient equilibrium, ``reset_classifier``, in order) and the components as they are now
(topology, aggregator, loss, halting policy, executor), each as a registry
spec ``{"name": ..., **options}`` (see :func:`~ensemblekit.build.component_spec`).
:func:`load` replays it, then loads the weights. What JSON cannot describe (a
hand-made ``nn.Sequential`` backbone, a custom exit head, a component object
whose options cannot be read back) makes :func:`save` fail before anything
is written, saying what to do.

Loading reads JSON and safetensors only, so it never runs pickled code.
A folder is written under a temporary name (every file fsynced) and renamed
into place in one step, so a crash leaves either the old checkpoint or the
new one, never a mix. Any damage (a missing, truncated or altered file) is
caught by the sizes and checksums and reported with the file's name.

Examples:
    >>> ens = ek.wrap(timm.create_model("resnet10t", num_classes=10), "tree", depth=2)  # doctest: +SKIP
    >>> ek.save(ens, "model.ek")                                                       # doctest: +SKIP
    >>> same = ek.load("model.ek")                                                     # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ensemblekit.build import (
    BuildSpecError,
    built_components,
    component_spec,
    components,
    from_json,
    registry_of,
    wrap,
)
from ensemblekit.core.ensemble import Ensemble
from ensemblekit.core.registry import RECIPES, accepts
from ensemblekit.errors import EnsembleKitError
from ensemblekit.methods.imta.gradient_equilibrium import apply_gradient_equilibrium, has_gradient_equilibrium
from ensemblekit.methods.imta.isc import add_isc
from ensemblekit.training.config import ModelConfig, section_from_dict

__all__ = [
    "FORMAT",
    "LATEST",
    "MANIFEST",
    "MODEL_FILE",
    "PREPARATIONS",
    "TRAINER_FILE",
    "VERSION",
    "CheckpointError",
    "atomic_write",
    "backbone_name",
    "ensemble_record",
    "fsync_write",
    "load",
    "load_weights",
    "model_config",
    "read_manifest",
    "read_tensors",
    "rebuild",
    "resolve",
    "save",
    "write_checkpoint",
]

FORMAT = "ensemblekit-checkpoint"
VERSION = 2
"""2: the manifest's "ensemble" build record rebuilds any ensemble; 1 (still read): a ModelConfig only."""
PREPARATIONS: dict[str, Callable[..., Any]] = {
    "isc": add_isc,
    "gradient_equilibrium": apply_gradient_equilibrium,
    "reset_classifier": lambda model, num_classes: model.reset_classifier(num_classes),
}
"""What a build record's preparations name, replayed in order after the build."""
MANIFEST = "config.json"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.safetensors"
LATEST = "latest"


class CheckpointError(EnsembleKitError, ValueError):
    """A checkpoint that cannot be used: damaged, or made for another model. The message names the file."""


# ------------------------------------------------------------------ writing
def fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Replace ``path`` by ``data`` atomically: temp file, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fsync_write(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cpu_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def write_checkpoint(
    directory: str | Path,
    model: nn.Module,
    model_config: ModelConfig | None,
    *,
    trainer_tensors: dict[str, Tensor] | None = None,
    trainer_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    record: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (see the module docstring).

    Args:
        directory: the checkpoint folder to create.
        model: the ensemble whose ``state_dict`` is saved.
        model_config: the config it was built from, or ``None``.
        record: its build record (:func:`ensemble_record`); by default made
            here when the ensemble can be described (a training checkpoint
            then loads with its later preparations, e.g. IMTA's phase II ISC heads).
        trainer_tensors: optimizer and RNG tensors of a training checkpoint.
        trainer_state: JSON-able training state (step, scheduler, ...).
        extra: more JSON-able entries for the manifest (data and train configs).
        overwrite: replace an existing folder (the old one is removed only
            once the new one is complete); otherwise an existing folder is an error.
    """
    directory = Path(directory)
    if record is None:
        try:
            record = ensemble_record(model)
        except BuildSpecError:
            if model_config is None:
                raise
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; choose another path or pass overwrite=True")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        files = {MODEL_FILE: _cpu_tensors(model.state_dict())}
        if trainer_tensors is not None:
            files[TRAINER_FILE] = _cpu_tensors(trainer_tensors)
        manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "files": {}}
        if model_config is not None:
            manifest["model"] = _config_dict(model_config)
        if record is not None:
            manifest["ensemble"] = record
        for name, tensors in files.items():
            save_file(tensors, str(tmp / name))
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
            manifest["files"][name] = {"bytes": (tmp / name).stat().st_size, "sha256": _digest(tmp / name)}
        if trainer_state is not None:
            manifest["trainer"] = trainer_state
        manifest.update(extra or {})
        fsync_write(tmp / MANIFEST, (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode())
        _fsync_dir(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
        _fsync_dir(directory.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return directory


def save(model: nn.Module, path: str | Path, overwrite: bool = False) -> Path:
    """Save an ensemble that :func:`~ensemblekit.wrap`, a recipe or a config built to the folder ``path``.

    :func:`load` gives it back with the same ``predict()`` results. Nothing
    is written when it cannot be described (see the module docstring).

    Raises:
        BuildSpecError: the ensemble cannot be rebuilt from JSON; the message says why and what to do.
        FileExistsError: ``path`` exists and ``overwrite`` is off.
    """
    record = ensemble_record(model)
    config = getattr(model, "build_config", None)
    return write_checkpoint(path, model, config if isinstance(config, ModelConfig) else None, overwrite=overwrite,
                            record=record)


def ensemble_record(model: nn.Module) -> dict[str, Any]:
    """The JSON build record that rebuilds ``model``: its build, the preparations since, its components.

    Raises:
        BuildSpecError: ``model`` was not built by ``wrap()``, a recipe or a
            config, or holds something JSON cannot describe.
    """
    if not isinstance(model, Ensemble):
        raise BuildSpecError(f"only an ensemblekit Ensemble can be saved, got {type(model).__name__}")
    spec = getattr(model, "build_spec", None)
    config = getattr(model, "build_config", None)
    if not isinstance(spec, dict):
        raise BuildSpecError("this Ensemble was made directly, not by ensemblekit.wrap() or a recipe, so nothing "
                             "records how to rebuild it: build it with ek.wrap(...) (or save its state_dict and "
                             "rebuild it with your own code)")
    if isinstance(config, ModelConfig):
        build: Any = "config"
    elif spec["unsaveable"]:
        raise BuildSpecError("this ensemble cannot be saved as JSON and safetensors: " + "; ".join(spec["unsaveable"]))
    else:
        build = {k: v for k, v in spec.items() if k in ("wrap", "recipe")}
    built = built_components(model)
    current = components(model)
    kinds = current if "wrap" in build else [k for k, obj in current.items() if obj is not built.get(k)]
    preparations = [p for p in spec["preparations"]
                    if p["name"] != "gradient_equilibrium" or has_gradient_equilibrium(model)]
    return {"build": build, "preparations": preparations,
            "components": {kind: component_spec(current[kind], kind) for kind in kinds}}


def _config_dict(config: ModelConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(config)


# ------------------------------------------------------------------ reading
def resolve(path: str | Path) -> Path:
    """The checkpoint folder that ``path`` names.

    ``path`` may be a checkpoint folder, a file inside one, or a run folder
    whose ``checkpoints/latest`` names its newest checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        path = path.parent
    for pointer in (path / LATEST, path / "checkpoints" / LATEST):
        if pointer.is_file():
            target = pointer.parent / pointer.read_text().strip()
            if not (target / MANIFEST).exists():
                raise CheckpointError(f"{pointer} names checkpoint {target}, which is missing or incomplete")
            return target
    if not (path / MANIFEST).exists():
        raise FileNotFoundError(
            f"{path} is not a checkpoint: it has no {MANIFEST} (nor a checkpoints/{LATEST} pointer of a run folder)"
        )
    return path


def read_manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(checkpoint folder, manifest)`` with every listed file checked for size and checksum."""
    directory = resolve(path)
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path} is not valid JSON (truncated or corrupted): {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} is not an ensemblekit checkpoint manifest (no format={FORMAT!r})")
    if manifest.get("version") not in (1, VERSION):
        raise CheckpointError(f"{manifest_path} has format version {manifest.get('version')}; "
                              f"this ensemblekit reads versions 1 to {VERSION}")
    rebuilt_from = "model" if manifest["version"] == 1 or "model" in manifest else "ensemble"  # config or record
    for key in ("files", rebuilt_from):
        if not isinstance(manifest.get(key), dict):
            raise CheckpointError(f"{manifest_path} lacks its {key!r} entry (truncated or corrupted)")
    for name, info in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        size = file.stat().st_size
        if size < info["bytes"]:
            raise CheckpointError(f"checkpoint file {file} is truncated: {size} bytes, expected {info['bytes']}")
        if size != info["bytes"] or _digest(file) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {file} is corrupted: its SHA-256 does not match {manifest_path}")
    return directory, manifest


def model_config(manifest: dict[str, Any], source: str) -> ModelConfig:
    """The :class:`ModelConfig` stored in a manifest."""
    return section_from_dict(ModelConfig, manifest["model"], "model", source)


def read_tensors(directory: Path, name: str) -> dict[str, Tensor]:
    """Load one safetensors file of a checkpoint folder."""
    file = directory / name
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint file {file} cannot be read: {err}") from None


def load_weights(model: nn.Module, path: str | Path) -> Path:
    """Load a checkpoint's weights into ``model``; a different topology is a clear error.

    Returns:
        The checkpoint folder read.
    """
    directory, manifest = read_manifest(path)
    state = read_tensors(directory, MODEL_FILE)
    _check_compatible(model, state, directory / MODEL_FILE, manifest)
    model.load_state_dict(state, strict=True)
    return directory


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an ensemble from a checkpoint's JSON config and weights.

    Args:
        path: a checkpoint folder (or a file in it), or a run folder (its newest checkpoint).
        device: where to put the ensemble.

    Returns:
        The :class:`~ensemblekit.Ensemble`, in eval mode.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: a damaged checkpoint (the message names the file).
    """
    directory, manifest = read_manifest(path)
    config = model_config(manifest, str(directory / MANIFEST)) if "model" in manifest else None
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; leave the caller's RNG alone
        model = rebuild(manifest.get("ensemble") or {"build": "config"}, config)
    load_weights(model, directory)
    return model.to(device).eval()


def rebuild(record: dict[str, Any], config: ModelConfig | None = None) -> Ensemble:
    """The ensemble a build record (:func:`ensemble_record`) describes, freshly initialised.

    Copies are not drawn anew (``init="copy"``): the weights are loaded next.
    """
    from ensemblekit.backbones import build_backbone
    from ensemblekit.training.config import build_ensemble

    build, parts = record["build"], dict(record.get("components", {}))
    if build == "config":
        if config is None:
            raise CheckpointError("this checkpoint's build record names a model config, but it holds none")
        model = build_ensemble(config, pretrained_weights=False)  # its weights are loaded next
    elif "wrap" in build:
        args = build["wrap"]
        shape = args["example_input"]
        model = wrap(build_backbone(args["backbone"]), from_json(parts.pop("topology")),
                     aggregator=from_json(parts.pop("aggregator")), loss=from_json(parts.pop("loss")),
                     halting=from_json(parts.pop("halting")), execution=from_json(parts.pop("execution")),
                     num_classes=args["num_classes"], num_blocks=args["num_blocks"], init="copy",
                     example_input=None if shape is None else torch.zeros(shape))
    else:
        recipe = build["recipe"]
        backbone = recipe["backbone"]
        options = from_json(recipe["options"])
        if accepts(RECIPES.get(recipe["name"]).factory, "init"):
            options["init"] = "copy"
        model = RECIPES.create(recipe["name"], backbone=backbone if isinstance(backbone, str)
                               else build_backbone(backbone), **options)
    for kind, spec in parts.items():
        _set_component(model, kind, from_json(spec))
    for preparation in record.get("preparations", []):
        options = dict(from_json(preparation))
        PREPARATIONS[options.pop("name")](model, **options)
    return model


def _set_component(model: Ensemble, kind: str, spec: Any) -> None:
    """Replace one component of a rebuilt ensemble by the one ``spec`` describes."""
    if kind == "execution":
        model.execution = spec
        return
    made: Any = None if spec is None else registry_of(kind).create(spec, context={"num_members": model.num_members})
    if kind == "aggregator":
        model.aggregator = made
    elif kind == "loss":
        model.loss_strategy = made
        if made is not None:
            made.check(model)
    elif kind == "halting":
        model.halting = made
        if made is not None:
            made.bind(model)
    else:
        raise CheckpointError(f"a rebuilt ensemble's {kind} cannot be replaced")


def _check_compatible(model: nn.Module, state: dict[str, Tensor], file: Path, manifest: dict[str, Any]) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in sorted(set(own) & set(state)) if tuple(own[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or shapes):
        return
    problems = []
    built = getattr(model, "build_config", None)
    if built is not None and "model" in manifest:
        from dataclasses import asdict

        ours, theirs = asdict(built), manifest["model"]
        diff = [f"{k}: checkpoint {theirs.get(k)!r}, model {ours[k]!r}" for k in ours if theirs.get(k) != ours[k]]
        if diff:
            problems.append("configs differ (" + "; ".join(diff) + ")")
    else:
        problems.append(f"the checkpoint was saved from {_summary(manifest)}")
    if missing:
        problems.append(f"{len(missing)} tensors missing from the checkpoint (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model lacks (e.g. {', '.join(unexpected[:3])})")
    for k in shapes[:3]:
        problems.append(f"{k} has shape {list(state[k].shape)} in the checkpoint, {list(own[k].shape)} in the model")
    raise CheckpointError(f"checkpoint {file} does not fit this model (a different topology or backbone): "
                          + "; ".join(problems))


def _summary(manifest: dict[str, Any]) -> str:
    """What built the checkpoint's ensemble, in a few words."""
    if "model" in manifest:
        return f"topology {manifest['model'].get('topology')!r} (recipe {manifest['model'].get('recipe')!r})"
    record = manifest["ensemble"]
    if "recipe" in record["build"]:
        return f"recipe {record['build']['recipe']['name']!r}"
    return f"topology {record['components'].get('topology')!r}"


def backbone_name(manifest: dict[str, Any]) -> str:
    """The name of the checkpoint's backbone (a timm architecture), for titles."""
    if "model" in manifest:
        return str(manifest["model"]["backbone"])
    build = manifest["ensemble"]["build"]
    backbone = (build.get("wrap") or build.get("recipe") or {}).get("backbone")
    return backbone if isinstance(backbone, str) else str((backbone or {}).get("name", "?"))
