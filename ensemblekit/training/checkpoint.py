"""Checkpoints: a folder of safetensors weights and a JSON manifest, written atomically.

A checkpoint folder holds

* ``config.json``: the format version, the *build record* that rebuilds the
  ensemble (``"ensemble"``, see below), the
  [`ModelConfig`][ensemblekit.training.config.ModelConfig] it was built from when
  there is one (``"model"``: what the CLI and the trainer build), the size
  and SHA-256 of every other file, and (for training checkpoints) the
  JSON-able training state;
* ``model.safetensors``: the ensemble's ``state_dict``, halting state
  included (a calibrated [`Budgeted`][ensemblekit.components.halting.Budgeted]
  policy's thresholds, a learned selector's weights), and in its metadata
  the SHA-256 of the manifest (all of it but the entry of this file);
* ``trainer.safetensors`` (training checkpoints only): optimizer tensors and
  RNG states.

The build record says how the ensemble was built: the
`wrap()` call (the backbone's timm spec, ``num_classes``,
``num_blocks``, the example input's shape), the recipe and its options, or
the ``ModelConfig``; then the preparations applied since (IMTA's ISC heads
and gradient equilibrium, ``reset_classifier``, in order) and the components as they are now
(topology, aggregator, loss, halting policy, executor), each as a registry
spec ``{"name": ..., **options}`` (see `component_spec()`).
[`load()`][ensemblekit.training.checkpoint.load] replays it, then loads the weights. What JSON cannot describe (a
hand-made ``nn.Sequential`` backbone, a custom exit head, a component object
whose options cannot be read back) makes [`save()`][ensemblekit.training.checkpoint.save] fail before anything
is written, saying what to do.

Loading reads JSON and safetensors only, so it never runs pickled code: a
backbone option that would make timm read a file (``checkpoint_path``) is
refused, and a ``pretrained`` backbone is rebuilt without its weights (the
checkpoint's replace them). Before anything is built, the manifest is checked:

* its types, and its file list: ``model.safetensors`` always, ``trainer.safetensors``
  with a training state, nothing else;
* every listed file's size and SHA-256, and the manifest's own SHA-256 recorded in
  ``model.safetensors`` (so an edited manifest, an emptied file list included, is
  refused; a version 1 or 2 manifest, written before that record, has none);
* the components it names, against the registries (an unknown name or option is
  refused before anything is built).

Checksums catch damage and edits, not a forger who recomputes them: load
checkpoints you trust. Any error is a [`CheckpointError`][ensemblekit.training.checkpoint.CheckpointError]
naming the file.

A folder is written under a temporary name (every file fsynced) and renamed
into place in one step; an overwrite first renames the old folder aside
(``.<name>.old-...``), so a crash leaves either the old checkpoint or the new
one, never a mix. Recovery:

* a crash between the two renames of an overwrite leaves the old checkpoint
  under its ``.old`` name: [`resolve()`][ensemblekit.training.checkpoint.resolve] (so
  [`load()`][ensemblekit.training.checkpoint.load]) reads it there, and the next save into that folder, or a
  resumed run, renames it back;
* temporary folders and files of saves that were killed are removed by the next
  save into the same folder and when a run is resumed ([`clean_up()`][ensemblekit.training.checkpoint.clean_up]); those
  of a save still running are left alone.

A run folder's ``checkpoints/latest`` pointer holds the bare name of a
checkpoint folder next to it; one that leads outside (``../x``, an absolute
path, a symbolic link pointing elsewhere) is refused.

Examples:
    >>> ens = ek.wrap(timm.create_model("resnet10t", num_classes=10), "tree", depth=2)  # doctest: +SKIP
    >>> ek.save(ens, "model.ek")                                                       # doctest: +SKIP
    >>> same = ek.load("model.ek")                                                     # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ensemblekit.backbones import check_backbone_options, check_backbone_spec
from ensemblekit.build import (
    COMPONENT_KINDS,
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
from ensemblekit.errors import EnsembleKitError, InvalidValueError, PathExistsError, PathNotFoundError
from ensemblekit.methods.imta.gradient_equilibrium import apply_gradient_equilibrium, has_gradient_equilibrium
from ensemblekit.methods.imta.isc import add_isc
from ensemblekit.training.config import ModelConfig, section_from_dict

__all__ = [
    "FORMAT",
    "LATEST",
    "MANIFEST",
    "MANIFEST_DIGEST",
    "MODEL_FILE",
    "PREPARATIONS",
    "STALE_AFTER",
    "TRAINER_FILE",
    "VERSION",
    "CheckpointError",
    "CheckpointWriteError",
    "atomic_write",
    "backbone_name",
    "clean_up",
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
VERSION = 3
"""3: ``model.safetensors`` records the manifest's SHA-256; 2 (still read): the manifest's "ensemble" build
record rebuilds any ensemble; 1 (still read): a ModelConfig only."""
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
MANIFEST_DIGEST = "ensemblekit.manifest_sha256"
"""The key of ``model.safetensors``' metadata holding the SHA-256 of the manifest (all but that file's entry)."""
STALE_AFTER = 3600.0
"""Seconds after which a temporary folder written on another machine counts as left by a killed save."""
_RESERVED = ("format", "version", "files", "model", "ensemble", "trainer")
_FILES = (MODEL_FILE, TRAINER_FILE)
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?:(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-)?[0-9a-f]{8}$")
"""A temporary name: ``.<name>.tmp-<host>-<pid>-<random>`` while written, ``.old-`` for the folder an overwrite
replaces (``.<name>.tmp-<random>``: an older ensemblekit's)."""
_writing: set[str] = set()
"""The temporary names this process is writing now (those of its own that are not here are left-overs)."""


class CheckpointError(EnsembleKitError, ValueError):
    """A checkpoint that cannot be used: damaged, or made for another model. The message names the file."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, no inodes left, read-only file system)."""


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
    tmp = _temp_path(path, "tmp")
    try:
        fsync_write(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        _writing.discard(tmp.name)
    _fsync_dir(path.parent)
    return path


def _temp_path(path: Path, kind: str) -> Path:
    """A fresh temporary name next to ``path`` (see ``_TEMP``), registered as being written by this process."""
    temp = path.with_name(f".{path.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    _writing.add(temp.name)
    return temp


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cpu_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write a safetensors file, flush it to disk; its manifest entry (size and SHA-256)."""
    save_file(_cpu_tensors(tensors), str(path), metadata=metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": _digest(path)}


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest as canonical JSON, all of it but the entry of ``model.safetensors`` (which holds it)."""
    files = manifest.get("files")
    covered = {**manifest, "files": {k: v for k, v in files.items() if k != MODEL_FILE} if isinstance(files, dict)
               else files}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


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
    weights: dict[str, Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (see the module docstring).

    Args:
        directory: the checkpoint folder to create.
        model: the ensemble whose ``state_dict`` is saved.
        model_config: the config it was built from, or ``None``.
        record: its build record ([`ensemble_record()`][ensemblekit.training.checkpoint.ensemble_record]); by
            default made here when the ensemble can be described (a training checkpoint then loads with its
            later preparations, e.g. IMTA's phase II ISC heads).
        trainer_tensors: optimizer and RNG tensors of a training checkpoint.
        trainer_state: JSON-able training state (step, scheduler, ...).
        extra: more JSON-able entries for the manifest (data and train configs).
        overwrite: replace an existing folder (the old one is removed only
            once the new one is complete); otherwise an existing folder is an error.
        weights: the tensors written as ``model.safetensors`` instead of
            ``model.state_dict()``, with the same keys (the trainer's EMA weights).
    """
    directory = Path(directory)
    if record is None:
        try:
            record = ensemble_record(model)
        except BuildSpecError:
            if model_config is None:
                raise
    clashes = sorted(set(extra or {}) & set(_RESERVED))
    if clashes:
        raise InvalidValueError(f"extra manifest entries may not replace {', '.join(clashes)}")
    clean_up(directory.parent)  # what killed saves left; a checkpoint a crash hid is renamed back first
    if directory.exists() and not overwrite:
        raise PathExistsError(f"{directory} already exists; choose another path or pass overwrite=True")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(directory, "tmp")
    old: Path | None = None
    try:
        tmp.mkdir()
        manifest: dict[str, Any] = {"format": FORMAT, "version": VERSION, "files": {}}
        if model_config is not None:
            manifest["model"] = _config_dict(model_config)
        if record is not None:
            manifest["ensemble"] = record
        if trainer_tensors is not None:
            manifest["files"][TRAINER_FILE] = _write_tensors(tmp / TRAINER_FILE, trainer_tensors)
        if trainer_state is not None:
            manifest["trainer"] = trainer_state
        manifest.update(extra or {})
        manifest = json.loads(json.dumps(manifest, allow_nan=False))  # as it reads back (str keys, lists)
        model_entry = _write_tensors(tmp / MODEL_FILE, model.state_dict() if weights is None else weights,
                                     metadata={MANIFEST_DIGEST: _manifest_digest(manifest)})
        manifest["files"] = {MODEL_FILE: model_entry, **manifest["files"]}
        fsync_write(tmp / MANIFEST, (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode())
        _fsync_dir(tmp)
        if directory.exists():
            old = _temp_path(directory, "old")
            os.replace(directory, old)
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(old, directory)  # the old checkpoint back in place (a hard kill here: see resolve)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
        _fsync_dir(directory.parent)
    except (OSError, SafetensorError) as err:
        kept = "the previous checkpoint is kept" if directory.exists() else "nothing was written"
        reason = getattr(err, "strerror", None) or str(err)
        raise CheckpointWriteError(f"could not write checkpoint {directory}: {reason}; {kept}") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        _writing.discard(tmp.name)
        if old is not None:
            _writing.discard(old.name)
    return directory


def save(model: nn.Module, path: str | Path, overwrite: bool = False) -> Path:
    """Save an ensemble that `wrap()`, a recipe or a config built to the folder ``path``.

    [`load()`][ensemblekit.training.checkpoint.load] gives it back with the same ``predict()`` results. Nothing
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


# ------------------------------------------------------------------ recovery
def clean_up(folder: str | Path) -> list[Path]:
    """Finish what killed saves left in ``folder``; the paths restored or removed.

    * A checkpoint that a crash between the two renames of an overwrite left
      under its ``.old`` name, with nothing at its own name, is renamed back.
    * Temporary folders and files of saves that were killed are removed: those
      of this machine whose process has ended (or, of this process, that it is
      not writing now), those of another machine after [`STALE_AFTER`][ensemblekit.training.checkpoint.STALE_AFTER]
      seconds, and those of an older ensemblekit. A folder holding anything but
      checkpoint files is never removed.

    [`write_checkpoint()`][ensemblekit.training.checkpoint.write_checkpoint] calls it on the folder it writes
    into, and the trainer on a run's checkpoint folder before resuming. Best effort: what cannot be removed
    stays (a read-only folder is left as it is).
    """
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir())
    except OSError:  # missing, not a folder, unreadable: nothing to do
        return []
    temps = [(p, m) for p in entries if (m := _TEMP.match(p.name))]
    done = []
    for target in sorted({m["target"] for _, m in temps if m["kind"] == "old"}):
        hidden = _hidden(folder / target)
        if hidden is not None and not os.path.lexists(folder / target):
            try:
                os.replace(hidden, folder / target)
            except OSError:
                continue
            done.append(folder / target)
    for path, match in temps:
        if not os.path.lexists(path) or path.name in _writing or not _writer_gone(path, match):
            continue
        if match["kind"] == "old" and not os.path.lexists(folder / match["target"]):
            continue  # still the only copy of that checkpoint (it could not be renamed back)
        try:
            if path.is_dir() and not path.is_symlink():
                if any(not f.is_file() or f.is_symlink() or f.name not in (MANIFEST, *_FILES) for f in path.iterdir()):
                    continue  # not what a save writes: not ours to remove
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        done.append(path)
    return done


def _writer_gone(path: Path, match: re.Match[str]) -> bool:
    """Whether the save that wrote temporary ``path`` has ended (then ``path`` is a left-over)."""
    if match["host"] is None:
        return True  # an older ensemblekit's name, which does not say who writes it; saves take seconds
    if match["host"] == _HOST and os.name == "posix":
        pid = int(match["pid"])
        if pid == os.getpid():
            return True  # not in _writing: this process is not writing it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, owned by another user
            return False
        return False
    try:
        return time.time() - path.lstat().st_mtime > STALE_AFTER
    except OSError:
        return False


def _hidden(target: Path) -> Path | None:
    """The checkpoint a crash between the two renames of an overwrite of ``target`` left under its ``.old`` name."""
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return None
    found = [p for p in entries if (m := _TEMP.match(p.name)) and m["kind"] == "old" and m["target"] == target.name
             and (p / MANIFEST).is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


# ------------------------------------------------------------------ reading
def resolve(path: str | Path) -> Path:
    """The checkpoint folder that ``path`` names.

    ``path`` may be a checkpoint folder, a file inside one, or a run folder
    whose ``checkpoints/latest`` names its newest checkpoint (a bare folder
    name next to it: a pointer that leads outside is refused). A checkpoint
    missing after a crash between the two renames of an overwrite is found
    under its ``.old`` name (see the module docstring).
    """
    path = Path(path)
    if not path.exists():
        hidden = _hidden(path) if path.name else None
        if hidden is not None:
            return hidden
        raise PathNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        path = path.parent
    for pointer in (path / LATEST, path / "checkpoints" / LATEST):
        if pointer.is_file():
            return _follow(pointer)
    if not (path / MANIFEST).exists():
        raise PathNotFoundError(
            f"{path} is not a checkpoint: it has no {MANIFEST} (nor a checkpoints/{LATEST} pointer of a run folder)"
        )
    return path


def _follow(pointer: Path) -> Path:
    """The checkpoint folder a ``latest`` pointer names, which must lie in the pointer's own folder."""
    folder = pointer.parent
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{pointer} cannot be read as a checkpoint name: {err}") from None
    if not name or name.startswith(".") or any(c in name for c in "/\\\0") or Path(name).is_absolute():
        raise CheckpointError(f"{pointer} names {name!r}, refused: a {LATEST!r} pointer holds the bare name of a "
                              f"checkpoint folder in {folder} (like 'step-0000100'), not a path")
    home = folder.resolve()
    target = folder / name
    for what, place in (("the pointer", pointer), ("the checkpoint it names", target)):
        if not place.resolve().is_relative_to(home):
            raise CheckpointError(f"{pointer}: {what} leads outside the run's folder {folder} (to "
                                  f"{place.resolve()}, through a symbolic link), refused")
    if not (target / MANIFEST).exists():
        hidden = _hidden(target)
        if hidden is not None:
            return hidden
        raise CheckpointError(f"{pointer} names checkpoint {target}, which is missing or incomplete")
    return target


def read_manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(checkpoint folder, manifest)``, checked as the module docstring says, before anything is built.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: a damaged, edited or invalid checkpoint (the message names the file and the entry).
    """
    directory = resolve(path)
    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path} is not valid JSON (truncated or corrupted): {err}") from None
    except OSError as err:
        raise CheckpointError(f"{manifest_path} cannot be read: {err}") from None
    _check_layout(manifest, manifest_path)
    for name, info in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing")
        size = file.stat().st_size
        if size < info["bytes"]:
            raise CheckpointError(f"checkpoint file {file} is truncated: {size} bytes, expected {info['bytes']}")
        if size != info["bytes"] or _digest(file) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {file} is corrupted: its SHA-256 does not match {manifest_path}")
    _check_digest(manifest, manifest_path, directory / MODEL_FILE)
    _check_contents(manifest, manifest_path)
    return directory, manifest


def _check_layout(manifest: Any, path: Path) -> None:
    """The format, the version and the file list: what the integrity checks rely on."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ensemblekit checkpoint manifest (no format={FORMAT!r})")
    version = manifest.get("version")
    if type(version) is not int or not 1 <= version <= VERSION:
        raise CheckpointError(f"{path} has format version {version!r}; this ensemblekit reads versions 1 to {VERSION}")
    rebuilt_from = "model" if version == 1 or "model" in manifest else "ensemble"  # config or record
    for key in ("files", rebuilt_from):
        if not isinstance(manifest.get(key), dict):
            raise CheckpointError(f"{path} lacks its {key!r} entry (truncated or corrupted)")
    files = manifest["files"]
    unknown = [name for name in files if name not in _FILES]
    if unknown:
        raise CheckpointError(f"{path}: 'files' lists {unknown[0]!r}, which is not a checkpoint file (a checkpoint "
                              f"holds {' and '.join(_FILES)} only)")
    needed = [MODEL_FILE, *([TRAINER_FILE] if "trainer" in manifest else [])]
    for name in needed:
        if name not in files:
            raise CheckpointError(f"{path}: 'files' does not list {name}, which every "
                                  f"{'checkpoint' if name == MODEL_FILE else 'training checkpoint'} holds "
                                  "(with its size and SHA-256)")
    for name, info in files.items():
        if not (isinstance(info, dict) and set(info) == {"bytes", "sha256"} and type(info["bytes"]) is int
                and info["bytes"] >= 0 and isinstance(info["sha256"], str)
                and re.fullmatch(r"[0-9a-f]{64}", info["sha256"])):
            raise CheckpointError(f"{path}: files[{name!r}] is {info!r}; expected "
                                  "{'bytes': <size>, 'sha256': <64 hexadecimal digits>}")


def _check_digest(manifest: dict[str, Any], path: Path, weights: Path) -> None:
    """The manifest's SHA-256 against the one its weights file recorded (version 3 on)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            recorded = (f.metadata() or {}).get(MANIFEST_DIGEST)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint file {weights} cannot be read: {err}") from None
    if manifest["version"] < 3:
        if recorded is not None:
            raise CheckpointError(f"{path} says format version {manifest['version']}, but {weights} holds the "
                                  "manifest's SHA-256, which only version 3 writes: the manifest was edited")
        return
    if recorded is None:
        raise CheckpointError(f"{weights} lacks the SHA-256 of {path} that every version 3 checkpoint records in it")
    if recorded != _manifest_digest(manifest):
        raise CheckpointError(f"{path} was changed after the checkpoint was written: its SHA-256 differs from the one "
                              f"recorded in {weights} (edited or damaged); restore it, or save the model again")


def _check_contents(manifest: dict[str, Any], path: Path) -> None:
    """The config, the build record and the training state: their types, and the components they name."""
    if "model" in manifest:
        try:
            config = model_config(manifest, str(path))
            check_backbone_options(config.backbone_options, "model.backbone_options:")
        except EnsembleKitError as err:
            raise CheckpointError(str(err) if str(path) in str(err) else f"{path}: {err}") from None
    if "trainer" in manifest and not isinstance(manifest["trainer"], dict):
        raise CheckpointError(f"{path}: 'trainer' must be a mapping, got {type(manifest['trainer']).__name__}")
    record = manifest.get("ensemble")
    if record is None:
        return
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: 'ensemble' must be a mapping, got {type(record).__name__}")
    try:
        _check_record(record, "model" in manifest)
    except (EnsembleKitError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def _check_record(record: dict[str, Any], has_config: bool) -> None:
    """Raise for a build record [`rebuild()`][ensemblekit.training.checkpoint.rebuild] cannot replay (the
    message names the entry)."""
    build, parts, preparations = record.get("build"), record.get("components", {}), record.get("preparations", [])
    if not isinstance(parts, dict) or not isinstance(preparations, list):
        raise CheckpointError("ensemble.components must be a mapping and ensemble.preparations a list")
    if build == "config":
        if not has_config:
            raise CheckpointError("ensemble.build names a model config ('config'), but the manifest holds no 'model'")
    elif isinstance(build, dict) and set(build) == {"wrap"} and isinstance(build["wrap"], dict):
        args = build["wrap"]
        check_backbone_spec(args.get("backbone"), "ensemble.build.wrap.backbone")
        for key in ("num_classes", "num_blocks"):
            value = args.get(key)
            if value is not None and (type(value) is not int or value < 1):
                raise CheckpointError(f"ensemble.build.wrap.{key} must be an integer >= 1 or null, got {value!r}")
        shape = args.get("example_input")
        if shape is not None and not (isinstance(shape, list) and all(type(n) is int and n >= 1 for n in shape)):
            raise CheckpointError(f"ensemble.build.wrap.example_input must be a shape (a list of sizes) or null, "
                                  f"got {shape!r}")
        missing = [kind for kind in COMPONENT_KINDS if kind not in parts]
        if missing:
            raise CheckpointError(f"ensemble.components lacks {', '.join(missing)}, which a wrap() build names")
    elif isinstance(build, dict) and set(build) == {"recipe"} and isinstance(build["recipe"], dict):
        recipe = build["recipe"]
        name, backbone, options = recipe.get("name"), recipe.get("backbone"), recipe.get("options")
        if not isinstance(name, str) or not isinstance(options, dict):
            raise CheckpointError(f"ensemble.build.recipe must hold a 'name' and 'options', got {recipe!r}")
        check_backbone_spec({"kind": "timm", "name": backbone, "kwargs": {}} if isinstance(backbone, str)
                            else backbone, "ensemble.build.recipe.backbone")
        try:
            RECIPES.check({**from_json(options), "name": name}, context=("backbone",))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"ensemble.build.recipe: {err}") from None
    else:
        raise CheckpointError(f"ensemble.build must be 'config', {{'wrap': {{...}}}} or {{'recipe': {{...}}}}, "
                              f"got {build!r}")
    for kind, spec in parts.items():
        if kind not in COMPONENT_KINDS:
            raise CheckpointError(f"ensemble.components names {kind!r}, which is not a component "
                                  f"({', '.join(COMPONENT_KINDS)})")
        if spec is None and kind not in ("topology", "execution"):
            continue
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise CheckpointError(f"ensemble.components.{kind} must be a spec {{'name': ..., **options}}, got {spec!r}")
        try:
            registry_of(kind).check(from_json(spec), context=("num_members",))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"ensemble.components.{kind}: {err}") from None
    for i, preparation in enumerate(preparations):
        if not isinstance(preparation, dict) or preparation.get("name") not in PREPARATIONS:
            raise CheckpointError(f"ensemble.preparations[{i}] is {preparation!r}; a preparation is "
                                  f"{{'name': one of {', '.join(map(repr, PREPARATIONS))}, **options}}")


def model_config(manifest: dict[str, Any], source: str) -> ModelConfig:
    """The [`ModelConfig`][ensemblekit.training.config.ModelConfig] stored in a manifest."""
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
        The [`Ensemble`][ensemblekit.core.ensemble.Ensemble], in eval mode.

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
    """The ensemble a build record ([`ensemble_record()`][ensemblekit.training.checkpoint.ensemble_record])
    describes, freshly initialised.

    Copies are not drawn anew (``init="copy"``): the weights are loaded next.
    """
    from ensemblekit.backbones import build_backbone
    from ensemblekit.training.config import build_ensemble

    build, parts = record["build"], dict(record.get("components", {}))
    if build == "config":
        if config is None:
            raise CheckpointError("this checkpoint's build record names a model config, but it holds none")
        model = build_ensemble(config, pretrained_weights=False)  # its weights come from the checkpoint
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
