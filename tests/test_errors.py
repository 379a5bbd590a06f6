"""Every exception ensemblekit defines derives from ek.EnsembleKitError (warnings from EnsembleKitWarning), and
ensemblekit raises no bare builtin ValueError, TypeError, KeyError, FileNotFoundError or FileExistsError."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import warnings
from pathlib import Path

import pytest

import ensemblekit as ek
from ensemblekit import errors
from ensemblekit.errors import (
    EnsembleKitError,
    EnsembleKitWarning,
    InvalidTypeError,
    InvalidValueError,
    PathExistsError,
    PathNotFoundError,
    UnknownNameError,
)


def package_classes() -> list[type]:
    """Every class defined in a module of the package (modules that fail to import are reported)."""
    found: dict[str, type] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for info in pkgutil.walk_packages(ek.__path__, "ensemblekit."):
            if info.name == "ensemblekit.__main__":
                continue
            module = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == module.__name__:
                    found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return list(found.values())


CLASSES = package_classes()
EXCEPTIONS = [c for c in CLASSES if issubclass(c, BaseException)]


def test_the_package_defines_exceptions():
    names = {c.__name__ for c in EXCEPTIONS}
    assert {"EnsembleKitError", "SplitError", "ConfigError", "CheckpointError", "UnknownComponentError",
            "PluginError", "UnknownBackboneError", "NonFiniteLossError", "ConformanceError"} <= names


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_every_exception_derives_from_the_base(cls):
    if issubclass(cls, Warning):
        assert issubclass(cls, EnsembleKitWarning)
    else:
        assert issubclass(cls, EnsembleKitError)


@pytest.mark.parametrize(("path", "name", "builtin"), [
    ("ensemblekit.errors", "SplitError", ValueError),
    ("ensemblekit.training.config", "ConfigError", ValueError),
    ("ensemblekit.training.checkpoint", "CheckpointError", ValueError),
    ("ensemblekit.training.trainer", "NonFiniteLossError", ValueError),
    ("ensemblekit.core.registry", "UnknownComponentError", KeyError),
    ("ensemblekit.core.registry", "DuplicateComponentError", ValueError),
    ("ensemblekit.core.registry", "ComponentTypeError", TypeError),
    ("ensemblekit.backbones.spec", "BackboneOptionError", ValueError),
    ("ensemblekit.plugins.manager", "PluginError", RuntimeError),
    ("ensemblekit.backbones.factory", "UnknownBackboneError", ValueError),
    ("ensemblekit.testing", "ConformanceError", AssertionError),
])
def test_callers_catching_the_builtin_class_still_catch_it(path, name, builtin):
    cls = getattr(importlib.import_module(path), name)
    assert issubclass(cls, builtin)
    with pytest.raises(builtin):
        raise cls("message")


def test_the_base_is_exported_and_catches_real_errors():
    from ensemblekit.core.registry import TOPOLOGIES

    assert ek.EnsembleKitError is EnsembleKitError and "EnsembleKitError" in ek.__all__
    with pytest.raises(ek.EnsembleKitError, match="cannot split object"):
        ek.wrap(object(), "tree")  # not a model: a SplitError
    with pytest.raises(ek.EnsembleKitError, match="no-such-topology"):
        TOPOLOGIES.create("no-such-topology")  # an UnknownComponentError


def test_split_error_has_one_class_under_its_old_paths():
    from ensemblekit.splitting import SplitError
    from ensemblekit.splitting.errors import SplitError as old

    assert SplitError is old is importlib.import_module("ensemblekit.errors").SplitError


def test_plugin_warning_has_one_class_under_its_old_path():
    from ensemblekit.core.registry import PluginWarning
    from ensemblekit.plugins.manager import PluginWarning as old

    assert PluginWarning is old and issubclass(PluginWarning, EnsembleKitWarning)


# ------------------------------------------------------------------ no builtin error is raised by ensemblekit
BUILTIN_ERRORS = {"ValueError", "TypeError", "KeyError", "FileNotFoundError", "FileExistsError"}
"""Raised for a user's mistake, these must be ensemblekit errors that keep the builtin as a base
(InvalidValueError, InvalidTypeError, UnknownNameError, PathNotFoundError, PathExistsError, or a more
specific class): the command line prints those on one line and shows a traceback for anything else."""
ALLOWED: dict[tuple[str, str], str] = {}
"""``(module path, class) -> reason`` for a raise of a builtin error that must stay; none does now (a bare
``raise`` that re-raises a caught error is not counted)."""


def builtin_raises() -> list[tuple[str, int, str]]:
    """``(path, line, class)`` of every ``raise ValueError(...)`` (or the class alone) in the package."""
    package = Path(ek.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), rel)):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = exc.id if isinstance(exc, ast.Name) else exc.attr if isinstance(exc, ast.Attribute) else None
            if name in BUILTIN_ERRORS:
                found.append((rel, node.lineno, name))
    return sorted(found)


def test_ensemblekit_raises_no_builtin_error_class():
    left = [f"{path}:{line}: raise {name}" for path, line, name in builtin_raises() if (path, name) not in ALLOWED]
    assert not left, "raise an ensemblekit error (ensemblekit.errors) instead:\n" + "\n".join(left)


def test_the_allow_list_has_no_stale_entries():
    found = {(path, name) for path, _, name in builtin_raises()}
    assert not set(ALLOWED) - found


def test_the_scan_finds_a_builtin_raise(tmp_path, monkeypatch):
    fake = tmp_path / "ensemblekit"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f(x):\n    if x:\n        raise ValueError(x)\n    raise builtins.KeyError\n")
    monkeypatch.setattr(ek, "__file__", str(fake / "__init__.py"))
    assert builtin_raises() == [("ensemblekit/bad.py", 3, "ValueError"), ("ensemblekit/bad.py", 4, "KeyError")]


@pytest.mark.parametrize(("cls", "builtin"), [
    (InvalidValueError, ValueError), (InvalidTypeError, TypeError), (UnknownNameError, KeyError),
    (UnknownNameError, ValueError), (PathNotFoundError, FileNotFoundError), (PathExistsError, FileExistsError),
])
def test_the_generic_errors_keep_their_builtin_base(cls, builtin):
    assert issubclass(cls, EnsembleKitError) and issubclass(cls, builtin)
    assert cls.__name__ in errors.__all__


def test_an_unknown_name_reads_as_its_message_not_a_repr():
    from ensemblekit.core.registry import UnknownComponentError

    assert issubclass(UnknownComponentError, UnknownNameError)
    assert str(UnknownNameError("unknown dataset 'x'")) == "unknown dataset 'x'"
    assert str(PathNotFoundError("config file x does not exist")) == "config file x does not exist"


CALLED = re.compile(r"(?<![\w.])((?:ensemblekit|ek)(?:\.\w+)+)\(\)")
"""``ensemblekit.name()`` or ``ek.name()`` as a message or a page names a function to call."""


def called_names() -> dict[str, str]:
    """Every ``ensemblekit.X()`` in the package's strings (messages, docstrings), the docs and the README, with the
    first place it appears."""
    root = Path(ek.__file__).resolve().parents[1]
    texts = [(path, node.lineno, node.value) for path in sorted((root / "ensemblekit").rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    texts += [(path, 1, path.read_text(encoding="utf-8")) for path in [root / "README.md",
                                                                      *sorted((root / "docs").rglob("*.md"))]]
    found: dict[str, str] = {}
    for path, line, text in texts:
        for match in CALLED.finditer(text):
            found.setdefault(match.group(1), f"{path.relative_to(root)}:{line}")
    return found


def resolve(dotted: str):
    """What ``dotted`` names: an attribute where the parent has one (``ek.wrap``), else a submodule (the package
    ``ensemblekit.methods.irene`` under the function ``irene`` of the same name)."""
    value, path = ek, "ensemblekit"
    for part in dotted.split(".")[1:]:
        path += f".{part}"
        try:
            value = getattr(value, part)
        except AttributeError:
            value = importlib.import_module(path)
    return value


def test_messages_and_docs_name_only_functions_that_exist():
    """A renamed function leaves no message saying to call its old name (``ensemblekit.build()`` is a module)."""
    names = called_names()
    assert "ensemblekit.wrap" in names
    stale = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name, where in names.items():
            try:
                value = resolve(name)
            except (ImportError, AttributeError):
                value = None
            if not callable(value):
                stale.append(f"{where}: {name}()")
    assert not stale, "messages or pages name functions that do not exist:\n" + "\n".join(stale)
