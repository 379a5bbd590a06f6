"""Name -> component registries, filled by plugins (built-ins included).

``topology="tree"`` and ``topology=Tree(depth=4)`` resolve through the same
:class:`Registry`: a string (or ``{"name": ..., **kwargs}``) is looked up and
its factory called; an instance of the kind's base class is used as is.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable


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
        """Add ``factory`` under ``name``; a name taken by another plugin is an error."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries:
            other = self._entries[name].plugin
            raise DuplicateComponentError(
                f"{self.kind} {name!r} is registered twice: by plugin {other!r} and by plugin {plugin!r}"
            )
        self._entries[name] = Entry(name, factory, plugin)

    def unregister_plugin(self, plugin: str) -> None:
        """Remove everything ``plugin`` registered (used when its hook fails half way)."""
        self._entries = {k: e for k, e in self._entries.items() if e.plugin != plugin}

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
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        accepted = [p for p in params if p != "self"]
        raise TypeError(
            f"{kind} {name!r} does not take {', '.join(unknown)}; it takes: {', '.join(accepted) or 'no options'}"
        )


def accepts(factory: Callable[..., Any], keyword: str) -> bool:
    """Whether ``factory`` names ``keyword`` among its parameters (``**kwargs`` does not count)."""
    try:
        return keyword in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _ensure_loaded() -> None:
    from ensemblekit.plugins import load_plugins

    load_plugins()


def _make_registries() -> dict[str, Registry]:
    from ensemblekit.interfaces import Aggregator, HaltingPolicy, LossStrategy
    from ensemblekit.topologies import SharingTopology

    return {
        "register_topologies": Registry("topology", SharingTopology),
        "register_aggregators": Registry("aggregator", Aggregator),
        "register_losses": Registry("loss", LossStrategy),
        "register_halting_policies": Registry("halting policy", HaltingPolicy),
    }


REGISTRIES = _make_registries()
TOPOLOGIES = REGISTRIES["register_topologies"]
AGGREGATORS = REGISTRIES["register_aggregators"]
LOSSES = REGISTRIES["register_losses"]
HALTING_POLICIES = REGISTRIES["register_halting_policies"]
