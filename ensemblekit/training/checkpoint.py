"""Checkpoints: a folder of safetensors weights and a JSON manifest, written atomically.

A checkpoint folder holds

* ``config.json``: the format version, the :class:`~ensemblekit.training.config.ModelConfig`
  that rebuilds the ensemble, the size and SHA-256 of every other file, and
  (for training checkpoints) the JSON-able training state;
* ``model.safetensors``: the ensemble's ``state_dict``;
* ``trainer.safetensors`` (training checkpoints only): optimizer tensors and
  RNG states.

Loading reads JSON and safetensors only, so it never runs pickled code.
A folder is written under a temporary name (every file fsynced) and renamed
into place in one step, so a crash leaves either the old checkpoint or the
new one, never a mix. Any damage (a missing, truncated or altered file) is
caught by the sizes and checksums and reported with the file's name.

Examples:
    >>> ens = build_ensemble(ModelConfig("resnet10t", num_classes=10))  # doctest: +SKIP
    >>> save(ens, "model.ek")                                           # doctest: +SKIP
    >>> same = ek.load("model.ek")                                      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ensemblekit.errors import EnsembleKitError
from ensemblekit.training.config import ModelConfig, section_from_dict

FORMAT = "ensemblekit-checkpoint"
VERSION = 1
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
    model_config: ModelConfig,
    *,
    trainer_tensors: dict[str, Tensor] | None = None,
    trainer_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint folder atomically (see the module docstring).

    Args:
        directory: the checkpoint folder to create.
        model: the ensemble whose ``state_dict`` is saved.
        model_config: how to rebuild it.
        trainer_tensors: optimizer and RNG tensors of a training checkpoint.
        trainer_state: JSON-able training state (step, scheduler, ...).
        extra: more JSON-able entries for the manifest (data and train configs).
        overwrite: replace an existing folder (the old one is removed only
            once the new one is complete); otherwise an existing folder is an error.
    """
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; choose another path or pass overwrite=True")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        files = {MODEL_FILE: _cpu_tensors(model.state_dict())}
        if trainer_tensors is not None:
            files[TRAINER_FILE] = _cpu_tensors(trainer_tensors)
        manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "model": _config_dict(model_config),
                                    "files": {}}
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
    """Save an ensemble built by :func:`~ensemblekit.training.config.build_ensemble` (or a run) to ``path``.

    Raises:
        ValueError: the ensemble carries no ``build_config`` to rebuild it from.
    """
    config = getattr(model, "build_config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError(
            "this ensemble has no build_config, so it could not be rebuilt from a checkpoint; "
            "build it with ensemblekit.training.config.build_ensemble(ModelConfig(...)) (what the CLI and trainer do)"
        )
    return write_checkpoint(path, model, config, overwrite=overwrite)


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
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{manifest_path} has format version {manifest.get('version')}; "
                              f"this ensemblekit reads version {VERSION}")
    for key in ("model", "files"):
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
    from ensemblekit.training.config import build_ensemble

    directory, manifest = read_manifest(path)
    config = model_config(manifest, str(directory / MANIFEST))
    with torch.random.fork_rng(devices=[]):  # building draws initial weights; leave the caller's RNG alone
        model = build_ensemble(config)
    load_weights(model, directory)
    return model.to(device).eval()


def _check_compatible(model: nn.Module, state: dict[str, Tensor], file: Path, manifest: dict[str, Any]) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in sorted(set(own) & set(state)) if tuple(own[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or shapes):
        return
    problems = []
    built = getattr(model, "build_config", None)
    if built is not None:
        from dataclasses import asdict

        ours, theirs = asdict(built), manifest["model"]
        diff = [f"{k}: checkpoint {theirs.get(k)!r}, model {ours[k]!r}" for k in ours if theirs.get(k) != ours[k]]
        if diff:
            problems.append("configs differ (" + "; ".join(diff) + ")")
    else:
        problems.append(f"the checkpoint was saved from {manifest['model'].get('topology')!r} "
                        f"(recipe {manifest['model'].get('recipe')!r})")
    if missing:
        problems.append(f"{len(missing)} tensors missing from the checkpoint (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model lacks (e.g. {', '.join(unexpected[:3])})")
    for k in shapes[:3]:
        problems.append(f"{k} has shape {list(state[k].shape)} in the checkpoint, {list(own[k].shape)} in the model")
    raise CheckpointError(f"checkpoint {file} does not fit this model (a different topology or backbone): "
                          + "; ".join(problems))
