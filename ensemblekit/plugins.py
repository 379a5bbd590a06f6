"""Loading plugins: the built-ins first, then every ``ensemblekit`` entry point.

Loading is lazy (on the first name lookup) and happens once. A plugin that
fails to import or whose hook raises is recorded in :data:`LOAD_ERRORS` and
skipped; the others load normally.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import pluggy

from ensemblekit import hookspecs

BUILTIN_PLUGINS = ("ensemblekit.builtins",)


@dataclass
class PluginInfo:
    """A loaded (or failed) plugin and what it registered."""

    name: str
    distribution: str | None = None
    version: str | None = None
    components: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


_manager: pluggy.PluginManager | None = None
PLUGINS: dict[str, PluginInfo] = {}


def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (plugins loaded)."""
    load_plugins()
    assert _manager is not None
    return _manager


def load_plugins() -> None:
    """Load built-in and installed plugins once, then run their registration hooks."""
    global _manager
    if _manager is not None:
        return
    pm = pluggy.PluginManager("ensemblekit")
    pm.add_hookspecs(hookspecs)
    _manager = pm
    import importlib

    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
        PLUGINS[module_name] = PluginInfo(module_name, "ensemblekit", _version("ensemblekit"))
    _load_entry_points(pm)
    _run_registration_hooks(pm)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group="ensemblekit"):
        dist = ep.dist.name if ep.dist else None
        info = PluginInfo(ep.name, dist, ep.dist.version if ep.dist else None)
        PLUGINS[ep.name] = info
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception:  # one broken plugin must not stop the others
            info.error = traceback.format_exc(limit=3)


def register_plugin(plugin: object, name: str) -> None:
    """Register a plugin object at run time (tests, notebooks) and run its hooks."""
    pm = plugin_manager()
    pm.register(plugin, name=name)
    PLUGINS[name] = PluginInfo(name)
    _run_registration_hooks(pm, only=name)


def _run_registration_hooks(pm: pluggy.PluginManager, only: str | None = None) -> None:
    from ensemblekit.registry import REGISTRIES

    for hook_name, registry in REGISTRIES.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if only is not None and impl.plugin_name != only:
                continue
            info = PLUGINS.setdefault(impl.plugin_name, PluginInfo(impl.plugin_name))
            if info.error:
                continue

            def register(name, factory, _plugin=impl.plugin_name, _registry=registry):
                _registry.register(name, factory, plugin=_plugin)
                PLUGINS[_plugin].components.setdefault(_registry.kind, []).append(name)

            try:
                impl.function(register=register)
            except Exception:
                info.error = traceback.format_exc(limit=3)
                for other in REGISTRIES.values():
                    other.unregister_plugin(impl.plugin_name)
