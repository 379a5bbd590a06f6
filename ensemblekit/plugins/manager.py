"""Loading plugins: ensemblekit's built-ins first, then every ``ensemblekit`` entry point.

Loading is lazy (the first lookup of a component by name triggers it) and
happens once per process. A plugin that fails to import (``sys.exit()``
included), implements a hook that does not exist (a misspelt name), registers
a class of the wrong kind or whose hook raises is recorded, reported once
with a [`PluginWarning`][ensemblekit.core.registry.PluginWarning] and skipped; the other plugins load normally.
What a plugin registers is kept only if all its hooks succeed.

Two environment variables, read when loading, choose the installed plugins
(comma-separated entry-point names; built-in plugins always load):

* ``ENSEMBLEKIT_PLUGINS_BLOCK``: do not load these.
* ``ENSEMBLEKIT_PLUGINS_ONLY``: load only these.

Examples:
    >>> from ensemblekit.plugins.manager import plugin_infos
    >>> [p.name for p in plugin_infos() if p.builtin]
    ['ensemblekit.plugins.builtins']
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
import threading
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, version
from typing import Any, Literal

import pluggy

from ensemblekit.core.registry import REGISTRIES, DuplicateComponentError, PluginWarning, Registry, set_loader
from ensemblekit.errors import EnsembleKitError
from ensemblekit.plugins import hookspecs

__all__ = [
    "BLOCK_ENV",
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "ONLY_ENV",
    "PluginError",
    "PluginInfo",
    "PluginWarning",
    "load_plugins",
    "plugin_infos",
    "register_plugin",
    "reset_plugins",
]

BUILTIN_PLUGINS = ("ensemblekit.plugins.builtins",)
ENTRY_POINT_GROUP = "ensemblekit"
BLOCK_ENV = "ENSEMBLEKIT_PLUGINS_BLOCK"
ONLY_ENV = "ENSEMBLEKIT_PLUGINS_ONLY"


class PluginError(EnsembleKitError, RuntimeError):
    """A plugin given to [`register_plugin()`][ensemblekit.plugins.manager.register_plugin] failed to load."""


@dataclass
class PluginInfo:
    """A plugin, where it comes from and what it registered.

    Attributes:
        name: the entry-point name (the module name for built-ins).
        distribution: the installed package that declares it, if any.
        version: that package's version.
        builtin: part of ensemblekit itself (cannot be blocked).
        status: "loaded", "failed" or "blocked" (by an environment variable).
        components: kind ("aggregator", ...) -> names it registered.
        error: one line saying why it failed or was blocked.
        traceback: the full traceback of a failure.
    """

    name: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    status: Literal["loaded", "failed", "blocked"] = "loaded"
    components: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_lock = threading.RLock()
_manager: pluggy.PluginManager | None = None
_loaded = False
_infos: list[PluginInfo] = []


def load_plugins() -> None:
    """Load the built-in and installed plugins and run their hooks, once per process."""
    global _manager, _loaded
    if _loaded:
        return
    with _lock:
        if _manager is not None:  # loaded, or being loaded by this thread (a hook looked a name up)
            return
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        _manager = pm
        for module_name in BUILTIN_PLUGINS:
            info = PluginInfo(module_name, "ensemblekit", _own_version(), builtin=True)
            _add(pm, info, functools.partial(importlib.import_module, module_name))
        block, only = _env_names(BLOCK_ENV), _env_names(ONLY_ENV)
        found = _entry_points()
        for ep in found:
            info = PluginInfo(ep.name, ep.dist.name if ep.dist else None, ep.dist.version if ep.dist else None)
            reason = _blocked(ep.name, block, only)
            if reason:
                info.status, info.error = "blocked", reason
                _infos.append(info)
            else:
                _add(pm, info, ep.load)
        _warn_unknown_names(block, only, {ep.name for ep in found})
        _loaded = True


def plugin_infos() -> list[PluginInfo]:
    """Every plugin in load order (built-ins first), loading them if needed.

    Examples:
        >>> from ensemblekit.plugins.manager import plugin_infos
        >>> plugin_infos()[0].name, plugin_infos()[0].status
        ('ensemblekit.plugins.builtins', 'loaded')
    """
    load_plugins()
    return list(_infos)


def register_plugin(plugin: object, name: str) -> PluginInfo:
    """Register a plugin object at run time (tests, notebooks) and run its hooks now.

    Raises:
        PluginError: the plugin failed (its error is also kept in
            [`plugin_infos()`][ensemblekit.plugins.manager.plugin_infos]).

    Examples:
        >>> import ensemblekit
        >>> from ensemblekit.components.aggregators import MeanLogits
        >>> class Mine:
        ...     @ensemblekit.hookimpl
        ...     def register_aggregators(self, register):
        ...         register("my_mean", MeanLogits)
        >>> register_plugin(Mine(), "mine").components
        {'aggregator': ['my_mean']}
        >>> reset_plugins()  # forget it again
    """
    load_plugins()
    with _lock:
        info = PluginInfo(name)
        assert _manager is not None  # set by load_plugins()
        if not _add(_manager, info, lambda: plugin, warn=False):
            raise PluginError(f"plugin {name!r} failed to load: {info.error}")
        return info


def reset_plugins() -> None:
    """Forget every plugin and registered component; the next lookup loads them again.

    For tests; see [`ensemblekit.testing.isolated_plugins()`][ensemblekit.testing.isolated_plugins].
    """
    global _manager, _loaded
    with _lock:
        for target in _targets().values():
            target.clear()
        _manager, _loaded = None, False
        _infos.clear()


def _add(pm: pluggy.PluginManager, info: PluginInfo, load: Callable[[], object], warn: bool = True) -> bool:
    """Load, register and run one plugin; on any error record it, undo, and return False."""
    _infos.append(info)
    plugin = None
    try:
        plugin = load()
        pm.register(plugin, name=info.name)
        _check_hook_names(pm, plugin)
        staged = _run_hooks(pm, plugin, info.name)
    except (Exception, SystemExit) as err:  # one broken plugin must not stop the others (nor end the process)
        if plugin is not None and pm.is_registered(plugin):
            pm.unregister(plugin)
        info.status, info.error = "failed", _one_line(err)
        info.traceback = "".join(traceback.format_exception(err))
        if warn:
            source = f" (from {info.distribution})" if info.distribution else ""
            warnings.warn(f"ensemblekit plugin {info.name!r}{source} was skipped: {info.error}",
                          PluginWarning, stacklevel=4)
        return False
    targets = _targets()
    for hook_name, name, factory in staged:
        targets[hook_name].register(name, factory, plugin=info.name, builtin=info.builtin)
        info.components.setdefault(targets[hook_name].kind, []).append(name)
    return True


def _one_line(err: BaseException) -> str:
    """What went wrong, on one line; a ``sys.exit()`` says so (its message is only the exit code)."""
    if isinstance(err, SystemExit):
        return f"SystemExit: the plugin called sys.exit({err.code!r}) while loading"
    return " ".join(f"{type(err).__name__}: {err}".split())


def _check_hook_names(pm: pluggy.PluginManager, plugin: object) -> None:
    """Like ``pm.check_pending()`` for one plugin, suggesting the hook a misspelt name meant."""
    known = sorted(_targets())
    for caller in pm.get_hookcallers(plugin) or []:
        impls = [i for i in caller.get_hookimpls() if i.plugin is plugin and not i.optionalhook]
        if impls and not caller.has_spec():
            close = difflib.get_close_matches(caller.name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the hooks are {', '.join(known)}"
            raise pluggy.PluginValidationError(plugin, f"unknown hook {caller.name!r}{hint}")


def _run_hooks(pm: pluggy.PluginManager, plugin: object, plugin_name: str) -> list[tuple[str, str, Any]]:
    """Call each hook ``plugin`` implements; return its registrations, checked but not yet added."""
    staged: list[tuple[str, str, Any]] = []
    for hook_name, target in _targets().items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin is not plugin:
                continue

            def register(name: str, factory: Callable[..., Any], _hook: str = hook_name,
                         _target: Registry = target) -> None:
                _target.check_new(name, factory, plugin=plugin_name)
                if any(h == _hook and n == name for h, n, _ in staged):
                    raise DuplicateComponentError(f"{_target.kind} {name!r} is registered twice by plugin "
                                                  f"{plugin_name!r}")
                staged.append((_hook, name, factory))

            impl.function(**{arg: register for arg in impl.argnames})
    return staged


def _targets() -> dict[str, Registry]:
    """Hook name -> the registry its registrations go to."""
    return dict(REGISTRIES)


def _skipped_note() -> str:
    """The plugins not loaded and why, for unknown-name errors ("" when all loaded)."""
    skipped = [f"{p.name} ({p.error})" for p in plugin_infos() if p.status != "loaded"]
    if not skipped:
        return ""
    return f"Not loaded: {'; '.join(skipped)}. See `ensemblekit plugins`."


def _own_version() -> str | None:
    try:
        return version("ensemblekit")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return None


def _entry_points() -> list[EntryPoint]:
    eps = entry_points(group=ENTRY_POINT_GROUP)
    return sorted(eps, key=lambda ep: (ep.name, ep.dist.name if ep.dist else ""))


def _env_names(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _blocked(name: str, block: set[str] | None, only: set[str] | None) -> str | None:
    if block is not None and name in block:
        return f"blocked by {BLOCK_ENV}"
    if only is not None and name not in only:
        return f"not in {ONLY_ENV}"
    return None


def _warn_unknown_names(block: set[str] | None, only: set[str] | None, installed: set[str]) -> None:
    for variable, names in ((BLOCK_ENV, block), (ONLY_ENV, only)):
        for name in sorted((names or set()) - installed):
            why = ("built-in plugins always load" if name in BUILTIN_PLUGINS
                   else f"no installed plugin is called that (installed: {', '.join(sorted(installed)) or 'none'})")
            warnings.warn(f"{variable} names {name!r}, ignored: {why}", PluginWarning, stacklevel=3)


set_loader(load_plugins, _skipped_note)
