"""Name -> component registries, filled by plugins (built-ins included).

``topology="tree"`` and ``topology=Tree(depth=4)`` resolve through the same
:class:`Registry`: a string (or ``{"name": ..., **kwargs}``) is looked up and
its factory called; an instance of the kind's base class is used as is.
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union


class UnknownComponentError(KeyError):
    """A name that no plugin registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DuplicateComponentError(ValueError):
    """Two plugins registered the same name for one kind of component."""


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    plugin: str


class Registry:
    """Components of one kind (topology, aggregator, ...) by name.

    Args:
        kind: what the components are, for messages ("topology").
        base: their base class; instances of it pass through :meth:`create`.
    """

    def __init__(self, kind: str, base: type):
        self.kind = kind
        self.base = base
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, factory: Callable[..., Any], *, plugin: str = "?") -> None:
        """Add ``factory`` under ``name``; a name taken by another plugin is an error.

        Plugins are loaded first, so a name registered here never hides a built-in.
        """
        self.check_new(name, factory, plugin=plugin)
        self._entries[name] = Entry(name, factory, plugin)

    def check_new(self, name: str, factory: Callable[..., Any], *, plugin: str = "?") -> None:
        """Raise the error :meth:`register` would raise for ``name``, without registering it.

        Examples:
            >>> from ensemblekit.components.aggregators import MeanLogits
            >>> AGGREGATORS.check_new("my_mean", MeanLogits, plugin="mine")  # free: no error
        """
        _ensure_loaded()
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise TypeError(f"{self.kind} {name!r} of plugin {plugin!r}: the factory must be callable, got {factory!r}")
        if name in self._entries:
            other = self._entries[name].plugin
            raise DuplicateComponentError(
                f"{self.kind} {name!r} is registered twice: by plugin {other!r} and by plugin {plugin!r}"
            )

    def unregister_plugin(self, plugin: str) -> None:
        """Remove everything ``plugin`` registered."""
        self._entries = {k: e for k, e in self._entries.items() if e.plugin != plugin}

    def clear(self) -> None:
        """Remove every entry (see :func:`ensemblekit.plugins.manager.reset_plugins`)."""
        self._entries = {}

    def names(self) -> list[str]:
        _ensure_loaded()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        _ensure_loaded()
        return [self._entries[k] for k in sorted(self._entries)]

    def get(self, name: str) -> Entry:
        """The entry registered as ``name``, or an error listing known and close names."""
        _ensure_loaded()
        if name not in self._entries:
            known = sorted(self._entries)
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownComponentError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.kind} names: {', '.join(known)}."
                + _skipped_plugins_note()
            )
        return self._entries[name]

    def create(self, spec: Any, **kwargs: Any) -> Any:
        """Resolve ``spec``: an instance passes through, a name or ``{"name": ...}`` is built.

        ``kwargs`` are passed to the factory; a keyword the factory does not
        take is an error that lists the ones it does.
        """
        if isinstance(spec, self.base):
            if kwargs:
                raise TypeError(
                    f"options {sorted(kwargs)} were given next to a ready {self.kind} object "
                    f"{spec!r}; pass them to its constructor instead"
                )
            return spec
        if isinstance(spec, dict):
            spec = dict(spec)
            if "name" not in spec:
                raise ValueError(f"a {self.kind} given as a mapping needs a 'name' key, got {sorted(spec)}")
            name = spec.pop("name")
            if not isinstance(name, str):
                raise TypeError(f"a {self.kind} mapping's 'name' must be a string, got {name!r}")
            kwargs = {**spec, **kwargs}
        elif isinstance(spec, str):
            name = spec
        else:
            raise TypeError(
                f"{self.kind} must be a name (str), a mapping with 'name', or a {self.base.__name__}, "
                f"got {type(spec).__name__}"
            )
        entry = self.get(name)
        _check_kwargs(self.kind, name, entry.factory, kwargs)
        return entry.factory(**kwargs)


def _check_kwargs(kind: str, name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Unknown, missing and wrongly typed options fail here, naming the option, not inside the factory."""
    if isinstance(factory, type) and getattr(factory.__init__, "__module__", "").startswith("torch."):
        params = {}  # no __init__ of its own: torch's (nn.Module's *args, **kwargs) takes no options
    else:
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            return
    accepted = [p for p in params if p != "self"]
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise TypeError(
                f"{kind} {name!r} does not take {', '.join(unknown)}; it takes: {', '.join(accepted) or 'no options'}"
            )
    missing = [p.name for p in params.values() if p.default is p.empty and p.name not in kwargs
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    if missing:
        raise TypeError(f"{kind} {name!r} needs the option(s) {', '.join(missing)}, "
                        f"e.g. {{'name': {name!r}, {missing[0]!r}: ...}}")
    hints = _type_hints(factory)
    for key, value in kwargs.items():
        if key in hints and not _fits(value, hints[key]):
            raise TypeError(f"{kind} {name!r}: option {key}={value!r} is not of type {_type_name(hints[key])}")


def _type_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    """The annotations of ``factory``'s parameters; none where they cannot be resolved."""
    try:
        return typing.get_type_hints(factory.__init__ if isinstance(factory, type) else factory)
    except Exception:  # unresolvable annotations (a plugin's forward references): nothing to check against
        return {}


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint``; annotations it does not know always fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis) else None
        return item is None or all(_fits(v, item) for v in value)
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("collections.abc.", "").replace("<class '", "").replace("'>", "")


def accepts(factory: Callable[..., Any], keyword: str) -> bool:
    """Whether ``factory`` names ``keyword`` among its parameters (``**kwargs`` does not count)."""
    try:
        return keyword in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


class SplitterRegistry(Registry):
    """Backbone splitters by name; :meth:`ordered` is the order :func:`~ensemblekit.split` tries them.

    Third-party plugins' splitters come before the built-in ones, so a plugin
    can take over a model a built-in would split.

    Examples:
        >>> [e.name for e in SPLITTERS.entries() if e.plugin == "ensemblekit.plugins.builtins"]
        ['sequential', 'timm']
    """

    def __init__(self) -> None:
        super().__init__("splitter", object)

    def ordered(self) -> list[Callable[..., Any]]:
        """Splitter functions, plugins' before the built-in ones, each in registration order."""
        from ensemblekit.plugins.manager import BUILTIN_PLUGINS

        _ensure_loaded()
        entries = sorted(self._entries.values(), key=lambda e: e.plugin in BUILTIN_PLUGINS)
        return [e.factory for e in entries]


def _skipped_plugins_note() -> str:
    from ensemblekit.plugins.manager import plugin_infos

    skipped = [f"{p.name} ({p.error})" for p in plugin_infos() if p.status != "loaded"]
    if not skipped:
        return ""
    return f" Not loaded: {'; '.join(skipped)}. See `ensemblekit plugins`."


def _ensure_loaded() -> None:
    from ensemblekit.plugins.manager import load_plugins

    load_plugins()


def _make_registries() -> dict[str, Registry]:
    from ensemblekit.core.interfaces import Aggregator, HaltingPolicy, LossStrategy
    from ensemblekit.core.graph import SharingTopology

    return {
        "register_topologies": Registry("topology", SharingTopology),
        "register_aggregators": Registry("aggregator", Aggregator),
        "register_losses": Registry("loss", LossStrategy),
        "register_halting_policies": Registry("halting policy", HaltingPolicy),
        "register_backbone_splitters": SplitterRegistry(),
    }


REGISTRIES = _make_registries()
TOPOLOGIES = REGISTRIES["register_topologies"]
AGGREGATORS = REGISTRIES["register_aggregators"]
LOSSES = REGISTRIES["register_losses"]
HALTING_POLICIES = REGISTRIES["register_halting_policies"]
SPLITTERS = REGISTRIES["register_backbone_splitters"]
