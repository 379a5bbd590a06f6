"""Name -> component registries, filled by plugins (built-ins included).

``topology="tree"`` and ``topology=Tree(depth=4)`` resolve through the same
[`Registry`][ensemblekit.core.registry.Registry]: a string (or ``{"name": ..., **kwargs}``) is looked up and
its factory called; an instance of the kind's base class is used as is.

The registries are passive: they import nothing that fills them. The plugin
manager installs its loader with [`set_loader()`][ensemblekit.core.registry.set_loader] when it is imported, and
every lookup by name calls that loader first (it loads the plugins once).

A factory whose ``**kwargs`` go on to another callable (a recipe passing them
to [`ensemblekit.wrap()`][ensemblekit.build.wrap]) names that callable in its ``passes_kwargs_to``
attribute; the option checks then accept that callable's keyword-only
parameters as the factory's own.
"""

from __future__ import annotations

import collections.abc
import difflib
import functools
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

from ensemblekit.errors import (
    EnsembleKitError,
    EnsembleKitWarning,
    InvalidTypeError,
    InvalidValueError,
    UnknownNameError,
)

__all__ = [
    "AGGREGATORS",
    "EXECUTORS",
    "HALTING_POLICIES",
    "LOSSES",
    "RECIPES",
    "REGISTRIES",
    "SCHEDULES",
    "SPLITTERS",
    "TOPOLOGIES",
    "ComponentTypeError",
    "DuplicateComponentError",
    "Entry",
    "PluginWarning",
    "Registry",
    "SplitterRegistry",
    "UnknownComponentError",
    "accepts",
    "get_registry",
    "keywords",
    "list_components",
    "set_loader",
]


class UnknownComponentError(UnknownNameError):
    """A name that no plugin registered; the message lists the known names.

    A ``KeyError`` (a failed lookup) and a ``ValueError`` (a bad argument
    value, what an unknown ``execution=`` name raised before executors were
    registered components), like every
    [`UnknownNameError`][ensemblekit.errors.UnknownNameError].
    """


class DuplicateComponentError(EnsembleKitError, ValueError):
    """Two plugins registered the same name for one kind of component."""


class ComponentTypeError(EnsembleKitError, TypeError):
    """A plugin's factory is not of, or did not return, the kind's base class; the message names the plugin."""


class PluginWarning(EnsembleKitWarning):
    """A plugin, or one of its components, was skipped because it failed; the message says which and why.

    Also importable as ``ensemblekit.plugins.manager.PluginWarning``.
    """


@dataclass(frozen=True)
class Entry:
    """One registered component: its name, its factory and the plugin that registered it."""

    name: str
    factory: Callable[..., Any]
    plugin: str
    builtin: bool = False


_load: Callable[[], None] | None = None
_describe_skipped: Callable[[], str] | None = None


def set_loader(load: Callable[[], None], describe_skipped: Callable[[], str]) -> None:
    """Install what fills the registries: called by [`ensemblekit.plugins.manager`][ensemblekit.plugins.manager]
    at import.

    Args:
        load: fills every registry; called before each lookup, so it must
            return at once when it has already run.
        describe_skipped: a sentence naming the plugins that were not loaded
            and why ("" when all were), added to unknown-name errors.
    """
    global _load, _describe_skipped
    _load, _describe_skipped = load, describe_skipped


def _ensure_loaded() -> None:
    if _load is not None:
        _load()


class Registry:
    """Components of one kind (topology, aggregator, ...) by name.

    Args:
        kind: what the components are, for messages ("topology").
        base: their base class; instances of it pass through [`create()`][ensemblekit.core.registry.Registry.create]
            (``None``: components are only built from a name, like recipes).
        result: what a factory must return (default: ``base``; ``None``: not
            checked). A factory that is a class outside it is refused when
            registered, and whatever a factory returns is checked by
            [`create()`][ensemblekit.core.registry.Registry.create]; both errors name the plugin. A layer above
            may set it later (``RECIPES.result`` is set where ``Ensemble`` can be imported).
    """

    def __init__(self, kind: str, base: type | str | None, result: type | str | None = None):
        self.kind = kind
        self._base = base
        self._result = base if result is None else result
        self._entries: dict[str, Entry] = {}

    @property
    def base(self) -> type | None:
        """The components' base class (named as ``"module:Class"`` until first needed, so torch loads late)."""
        self._base = _resolve(self._base)
        return self._base

    @property
    def result(self) -> type | None:
        self._result = _resolve(self._result)
        return self._result

    @result.setter
    def result(self, value: type | None) -> None:
        self._result = value

    def register(self, name: str, factory: Callable[..., Any], *, plugin: str = "?", builtin: bool = False) -> None:
        """Add ``factory`` under ``name``; a name taken by another plugin is an error.

        Plugins are loaded first, so a name registered here never hides a built-in.
        """
        self.check_new(name, factory, plugin=plugin)
        self._entries[name] = Entry(name, factory, plugin, builtin)

    def check_new(self, name: str, factory: Callable[..., Any], *, plugin: str = "?") -> None:
        """Raise the error [`register()`][ensemblekit.core.registry.Registry.register] would raise for ``name``,
        without registering it.

        Examples:
            >>> from ensemblekit.components.aggregators import MeanLogits
            >>> AGGREGATORS.check_new("my_mean", MeanLogits, plugin="mine")  # free: no error
        """
        _ensure_loaded()
        if not isinstance(name, str) or not name:
            raise InvalidValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise ComponentTypeError(f"{self.kind} {name!r} of plugin {plugin!r}: the factory must be callable, got "
                                     f"{factory!r}")
        cls = _factory_class(factory)
        if self.result is not None and cls is not None and not issubclass(cls, self.result):
            raise ComponentTypeError(f"{self.kind} {name!r} of plugin {plugin!r}: the factory is the class "
                                     f"{cls.__qualname__}, which does not derive from {self.result.__name__} (what "
                                     f"a {self.kind} factory must build)")
        if name in self._entries:
            other = self._entries[name].plugin
            raise DuplicateComponentError(
                f"{self.kind} {name!r} is registered twice: by plugin {other!r} and by plugin {plugin!r}"
            )

    def unregister_plugin(self, plugin: str) -> None:
        """Remove everything ``plugin`` registered."""
        self._entries = {k: e for k, e in self._entries.items() if e.plugin != plugin}

    def clear(self) -> None:
        """Remove every entry (see
        [`ensemblekit.plugins.manager.reset_plugins()`][ensemblekit.plugins.manager.reset_plugins])."""
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
            skipped = _describe_skipped() if _describe_skipped is not None else ""
            raise UnknownComponentError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.kind} names: {', '.join(known)}."
                + (f" {skipped}" if skipped else "")
            )
        return self._entries[name]

    def create(self, spec: Any, /, context: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Resolve ``spec``: an instance passes through, a name or ``{"name": ...}`` is built.

        ``kwargs`` are passed to the factory; a keyword the factory does not
        take is an error that lists the ones it does. ``context`` holds what
        the caller knows (``num_members`` for an aggregator): each keyword goes
        to a factory that names it, unless the spec sets it.

        Examples:
            >>> AGGREGATORS.create("weighted", context={"num_members": 3}).log_weights.shape
            torch.Size([3])
        """
        if self._is_ready(spec, kwargs):
            return spec
        name, options = self._options(spec, kwargs)
        factory = self.get(name).factory
        given = {k: v for k, v in (context or {}).items() if k not in options and accepts(factory, k)}
        options = {**given, **options}
        _check_kwargs(self.kind, name, factory, options, supplied=set(context or ()))
        made = factory(**options)
        if self.result is not None and not isinstance(made, self.result):
            raise ComponentTypeError(
                f"{self.kind} {name!r} of plugin {self._entries[name].plugin!r} is broken: its factory returned "
                f"{_short(made)} ({type(made).__name__}) where a {self.result.__name__} was expected; fix or remove "
                "that plugin (`ensemblekit plugins` lists them)")
        return made

    def check(self, spec: Any, /, context: Iterable[str] = (), **kwargs: Any) -> None:
        """Raise the error [`create()`][ensemblekit.core.registry.Registry.create] would raise for these
        options, without building anything.

        ``context`` names keywords the caller will supply, so they count as given.
        """
        if self._is_ready(spec, kwargs):
            return
        name, options = self._options(spec, kwargs)
        _check_kwargs(self.kind, name, self.get(name).factory, options, supplied=set(context))

    def _is_ready(self, spec: Any, kwargs: dict[str, Any]) -> bool:
        """Whether ``spec`` is a ready component (then no options may come with it)."""
        if self.base is None or not isinstance(spec, self.base):
            return False
        if kwargs:
            raise InvalidTypeError(
                f"options {sorted(kwargs)} were given next to a ready {self.kind} object "
                f"{spec!r}; pass them to its constructor instead"
            )
        return True

    def _options(self, spec: Any, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The name ``spec`` gives and the options it carries, merged with ``kwargs``."""
        if isinstance(spec, dict):
            spec = dict(spec)
            if "name" not in spec:
                raise InvalidValueError(f"a {self.kind} given as a mapping needs a 'name' key, got {sorted(spec)}")
            name = spec.pop("name")
            if not isinstance(name, str):
                raise InvalidTypeError(f"a {self.kind} mapping's 'name' must be a string, got {name!r}")
            return name, {**spec, **kwargs}
        if isinstance(spec, str):
            return spec, dict(kwargs)
        ready = "" if self.base is None else f", or a {self.base.__name__}"
        raise InvalidTypeError(f"{self.kind} must be a name (str), a mapping with 'name'{ready}, got "
                               f"{type(spec).__name__}")


def _factory_class(factory: Callable[..., Any]) -> type | None:
    """The class ``factory`` instantiates when it is a class (or a ``functools.partial`` of one), else ``None``."""
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory if isinstance(factory, type) else None


def _short(value: Any, limit: int = 60) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _parameters(factory: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    """The parameters ``factory`` takes by keyword; ``None`` when its signature cannot be read.

    Its ``**kwargs`` stand for the keyword-only parameters of the callable it
    names in ``passes_kwargs_to``, when it names one.
    """
    if isinstance(factory, type) and getattr(factory.__init__, "__module__", "").startswith("torch."):  # type: ignore[misc]
        return {}  # no __init__ of its own: torch's (nn.Module's *args, **kwargs) takes no options
    try:
        params = {k: p for k, p in inspect.signature(factory).parameters.items() if k != "self"}
    except (TypeError, ValueError):
        return None
    target = getattr(factory, "passes_kwargs_to", None)
    var_keyword = [k for k, p in params.items() if p.kind is p.VAR_KEYWORD]
    if target is not None and var_keyword:
        del params[var_keyword[0]]
        for k, p in (_parameters(target) or {}).items():
            if p.kind is p.KEYWORD_ONLY:
                params.setdefault(k, p)
    return params


def _check_kwargs(kind: str, name: str, factory: Callable[..., Any], kwargs: dict[str, Any],
                  supplied: Iterable[str] = ()) -> None:
    """Unknown, missing and wrongly typed options fail here, naming the option, not inside the factory.

    ``supplied``: keywords the caller provides, not listed among the options a user may set.
    """
    params = _parameters(factory)
    if params is None:
        return
    supplied = set(supplied)
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            accepted = [p for p in params if p not in supplied]
            raise InvalidTypeError(
                f"{kind} {name!r} does not take {', '.join(unknown)}; it takes: {', '.join(accepted) or 'no options'}"
            )
    missing = [p.name for p in params.values() if p.default is p.empty and p.name not in kwargs
               and p.name not in supplied and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise InvalidTypeError(f"{kind} {name!r} needs the option(s) {', '.join(missing)}, "
                               f"e.g. {{'name': {name!r}, {missing[0]!r}: ...}}")
    hints = _type_hints(factory)
    for key, value in kwargs.items():
        if key in hints and not _fits(value, hints[key]):
            raise InvalidTypeError(f"{kind} {name!r}: option {key}={value!r} is not of type {_type_name(hints[key])}")


def _type_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    """The annotations of ``factory``'s parameters (and of ``passes_kwargs_to``'s); none where unresolvable."""
    target = getattr(factory, "passes_kwargs_to", None)
    try:
        hints = typing.get_type_hints(factory.__init__ if isinstance(factory, type) else factory)  # type: ignore[misc]
    except Exception:  # unresolvable annotations (a plugin's forward references): nothing to check against
        hints = {}
    return hints if target is None else {**_type_hints(target), **hints}


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
    if hint is dict or origin is dict:
        return isinstance(value, collections.abc.Mapping)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis) else None
        return item is None or all(_fits(v, item) for v in value)
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("collections.abc.", "").replace("<class '", "").replace("'>", "")


def accepts(factory: Callable[..., Any], keyword: str) -> bool:
    """Whether ``factory`` names ``keyword`` among its parameters (``**kwargs`` does not count).

    Keywords of the callable it names in ``passes_kwargs_to`` count as its own.
    """
    return keyword in (_parameters(factory) or {})


def keywords(factory: Callable[..., Any]) -> list[str]:
    """The names ``factory`` takes by keyword, as ``accepts`` reads them (``[]`` when unreadable)."""
    return list(_parameters(factory) or {})


class SplitterRegistry(Registry):
    """Backbone splitters by name; [`ordered()`][ensemblekit.core.registry.SplitterRegistry.ordered] is the
    order [`split()`][ensemblekit.splitting.split] tries them.

    Third-party plugins' splitters come before the built-in ones, so a plugin
    can take over a model a built-in would split.

    Examples:
        >>> [e.name for e in SPLITTERS.entries() if e.builtin]
        ['sequential', 'timm']
    """

    def __init__(self) -> None:
        super().__init__("splitter", object)

    def ordered(self) -> list[Callable[..., Any]]:
        """Splitter functions, plugins' before the built-in ones, each in registration order."""
        return [e.factory for e in self.ordered_entries()]

    def ordered_entries(self) -> list[Entry]:
        """The entries of [`ordered()`][ensemblekit.core.registry.SplitterRegistry.ordered], which name the
        plugin of each splitter."""
        _ensure_loaded()
        return sorted(self._entries.values(), key=lambda e: e.builtin)


def _resolve(cls: type | str | None) -> type | None:
    """A class given as ``"module:Class"`` imported; a class or ``None`` as it is."""
    if not isinstance(cls, str):
        return cls
    module, name = cls.split(":")
    return getattr(importlib.import_module(module), name)


def _make_registries() -> dict[str, Registry]:
    interfaces = "ensemblekit.core.interfaces"
    return {
        "register_topologies": Registry("topology", "ensemblekit.core.graph:SharingTopology"),
        "register_aggregators": Registry("aggregator", f"{interfaces}:Aggregator"),
        "register_losses": Registry("loss", f"{interfaces}:LossStrategy"),
        "register_halting_policies": Registry("halting policy", f"{interfaces}:HaltingPolicy"),
        "register_backbone_splitters": SplitterRegistry(),
        "register_executors": Registry("execution strategy", f"{interfaces}:Executor"),
        "register_recipes": Registry("recipe", None),
        "register_schedules": Registry("schedule", None, result=list),
    }


REGISTRIES = _make_registries()
"""Hook name -> the registry its registrations go to."""
TOPOLOGIES = REGISTRIES["register_topologies"]
AGGREGATORS = REGISTRIES["register_aggregators"]
LOSSES = REGISTRIES["register_losses"]
HALTING_POLICIES = REGISTRIES["register_halting_policies"]
SPLITTERS = typing.cast(SplitterRegistry, REGISTRIES["register_backbone_splitters"])
EXECUTORS = REGISTRIES["register_executors"]
RECIPES = REGISTRIES["register_recipes"]
SCHEDULES = REGISTRIES["register_schedules"]


def get_registry(kind: str) -> Registry:
    """The registry of one kind of component ("topology", "execution strategy", ...).

    Examples:
        >>> get_registry("recipe") is RECIPES
        True
    """
    by_kind = {registry.kind: registry for registry in REGISTRIES.values()}
    if kind not in by_kind:
        raise UnknownNameError(f"unknown kind of component {kind!r}; the kinds are {', '.join(by_kind)}")
    return by_kind[kind]


def list_components(kind: str) -> list[str]:
    """The registered names of one kind of component, sorted (plugins' included).

    Examples:
        >>> import ensemblekit as ek
        >>> ek.list_components("execution strategy")
        ['auto', 'grouped', 'grouped_nhwc', 'loop', 'loop_nhwc', 'vmap']
    """
    return get_registry(kind).names()
