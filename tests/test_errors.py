"""Every exception ensemblekit defines derives from ek.EnsembleKitError (warnings from EnsembleKitWarning)."""

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
from ensemblekit.errors import EnsembleKitError, EnsembleKitWarning


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
