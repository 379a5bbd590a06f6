"""Registers ensemblekit's ``ek_*`` entrypoints with timm when timm is imported, not before.

``import ensemblekit`` must not load torch and timm (``ensemblekit --help`` stays
fast), yet ``timm.create_model("ek_hne_resnet18")`` must work whichever of the
two a user imports first. So: if timm is already imported, the entrypoints are
registered at once; otherwise a finder on ``sys.meta_path`` waits for timm's
import, lets timm's own loader run it, and then imports
``ensemblekit.backbones.entrypoints`` (which registers them), once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

ENTRYPOINTS = "ensemblekit.backbones.entrypoints"


class _AfterTimm(importlib.abc.MetaPathFinder):
    """Finds timm through the other finders and registers the entrypoints once its module has run."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # once: the other finders locate timm, and no recursion
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run_timm = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_timm(module)
            importlib.import_module(ENTRYPOINTS)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register the entrypoints now if timm is imported, else right after timm's import (once per process)."""
    if "timm" in sys.modules:
        importlib.import_module(ENTRYPOINTS)
    elif not any(isinstance(f, _AfterTimm) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTimm())
