"""The catalogue of named components and presets.

Two sources, merged once per process:

* ``registry.yaml`` (repository root; the package ships it as ``reaudio_core/registry.yaml``):
  built-in components (kind, name, providing plugin, default parameters), shared defaults
  and named presets. The only place built-in defaults are stated.
* the ``register_components`` hook of every loaded plugin: the classes themselves, and
  for third-party components not in ``registry.yaml`` their default parameters.
"""
from __future__ import annotations

import difflib
import inspect
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from .interfaces import BASES, KINDS
from .plugins import PluginInfo, load_plugins

REGISTRY_ENV = "REAUDIO_REGISTRY"


class ReaudioError(Exception):
    """An error a user can act on; the CLI prints it without a traceback."""


class UnknownName(ReaudioError, KeyError):
    def __str__(self):  # KeyError would quote the message
        return self.args[0]


class ParamTypeError(ReaudioError, TypeError):
    """A component parameter of another type than its registered default."""


def param_type_problem(value, default) -> str | None:
    """What ``value`` would have to be to stand where the registered default is ``default``, or None when
    it may: a None default (or value) accepts anything; a bool default wants a bool; an int default an integer
    (not a bool, not 2.0); a float default any real number (an int is fine); a str default a string or path;
    a list default a list or tuple whose items fit the default's items (when those share one type); a dict
    default a mapping whose keys that the default names fit those entries (other keys: the component's call)."""
    if default is None or value is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, numbers.Integral):
        return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) else "an integer"
    if isinstance(default, numbers.Real):
        return None if isinstance(value, numbers.Real) and not isinstance(value, bool) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, (str, os.PathLike)) else "a string"
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            return "a list"
        kinds = {type(d) for d in default}
        if default and len(kinds) == 1:
            for i, item in enumerate(value):
                problem = param_type_problem(item, default[0])
                if problem:
                    return f"a list of items that are each {problem} (item {i} is {item!r})"
        return None
    if isinstance(default, Mapping):
        if not isinstance(value, Mapping):
            return "a mapping"
        for key in set(default) & set(value):
            problem = param_type_problem(value[key], default[key])
            if problem:
                return f"a mapping whose '{key}' is {problem} (it is {value[key]!r})"
        return None
    return None if isinstance(value, type(default)) else f"a {type(default).__name__}"


def closest(name: str, options) -> str:
    """Message fragment listing ``options`` with the closest match to ``name`` first."""
    options = sorted(options)
    match = difflib.get_close_matches(str(name), options, n=1, cutoff=0.4)
    hint = f" Did you mean '{match[0]}'?" if match else ""
    return f"Known: {', '.join(options) or '(none)'}.{hint}"


def registry_path() -> Path:
    """``$REAUDIO_REGISTRY`` if set, else the catalogue shipped inside this package
    (``reaudio_core/registry.yaml``: in a source checkout a symlink to the top-level file, in a
    wheel its copy), so an installed package finds it from any working directory."""
    env = os.environ.get(REGISTRY_ENV)
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parent / "registry.yaml"
    if candidate.exists():
        return candidate
    raise ReaudioError(f"registry.yaml not found at {candidate}; reinstall reaudio or set REAUDIO_REGISTRY to its path")


@dataclass
class ComponentSpec:
    kind: str
    name: str
    plugin: str  #: entry-point name of the providing plugin
    defaults: dict[str, Any] = field(default_factory=dict)
    cls: type | None = None
    distribution: str = "?"
    version: str = "?"
    error: str | None = None  #: why the component is unavailable, if it is
    tiny: dict[str, Any] | None = None  #: parameters for a seconds-fast test instance (None: not declared)

    def parameters(self) -> list[str]:
        """Every keyword the constructor accepts."""
        if self.cls is None:
            return sorted(self.defaults)
        sig = inspect.signature(self.cls.__init__)
        names = {p.name for p in sig.parameters.values()
                 if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"}
        return sorted(names | set(self.defaults))

    def default(self, key: str):
        """The default of parameter ``key``: the registered one, else the constructor's (None if neither)."""
        if key in self.defaults or self.cls is None:
            return self.defaults.get(key)
        p = inspect.signature(self.cls.__init__).parameters.get(key)
        return None if p is None or p.default is p.empty else p.default


class Registry:
    def __init__(self, catalogue: dict, plugins: list[PluginInfo], registered: list[tuple]):
        self.plugins = plugins
        self.defaults: dict = catalogue.get("defaults", {}) or {}
        self.presets: dict[str, dict] = catalogue.get("presets", {}) or {}
        self.components: dict[tuple[str, str], ComponentSpec] = {}
        by_plugin = {p.name: p for p in plugins}
        for kind, entries in (catalogue.get("components") or {}).items():
            if kind not in KINDS:
                raise ReaudioError(f"registry.yaml: unknown kind '{kind}'. {closest(kind, KINDS)}")
            for name, entry in (entries or {}).items():
                plugin = entry["plugin"]
                spec = ComponentSpec(kind, name, plugin, dict(entry.get("params") or {}))
                info = by_plugin.get(plugin)
                if info is None:
                    spec.error = f"plugin '{plugin}' is not installed or not enabled"
                elif info.error:
                    spec.error = f"plugin '{plugin}' failed to load: {info.error}"
                self.components[(kind, name)] = spec
        for plugin, kind, name, cls, defaults, tiny in registered:
            if kind not in KINDS:
                raise ReaudioError(f"plugin '{plugin}' registered unknown kind '{kind}'. {closest(kind, KINDS)}")
            if not issubclass(cls, BASES[kind]):
                raise ReaudioError(f"plugin '{plugin}': {cls.__name__} does not implement {BASES[kind].__name__}")
            info = by_plugin[plugin]
            spec = self.components.get((kind, name))
            if spec is None:
                spec = ComponentSpec(kind, name, plugin, dict(defaults or {}))
                self.components[(kind, name)] = spec
            elif spec.plugin != plugin:
                raise ReaudioError(f"{kind} '{name}' is provided by both '{spec.plugin}' and '{plugin}'")
            spec.cls, spec.distribution, spec.version, spec.error = cls, info.distribution, info.version, None
            spec.tiny = None if tiny is None else dict(tiny)
        for spec in self.components.values():
            if spec.cls is None and spec.error is None:
                spec.error = f"plugin '{spec.plugin}' loaded but did not register it"

    # -- lookup ---------------------------------------------------------------------
    def names(self, kind: str, available_only: bool = True) -> list[str]:
        return sorted(n for (k, n), s in self.components.items()
                      if k == kind and (s.cls is not None or not available_only))

    def spec(self, kind: str, name: str, available: bool = True) -> ComponentSpec:
        """The catalogue entry; with ``available`` its plugin must have loaded (to build it)."""
        if kind not in KINDS:
            raise UnknownName(f"Unknown component kind '{kind}'. {closest(kind, KINDS)}")
        spec = self.components.get((kind, name))
        if spec is None:
            raise UnknownName(f"Unknown {kind} '{name}'. {closest(name, self.names(kind, False))}")
        if available and spec.cls is None:
            raise ReaudioError(f"{kind} '{name}' is unavailable: {spec.error}")
        return spec

    def resolve_params(self, kind: str, name: str, params: dict | None) -> dict:
        """Defaults overlaid with ``params``; unknown keys are an error naming the known ones, a value of
        another type than its default a :class:`ParamTypeError` (:func:`param_type_problem`). Works for a
        catalogued component whose plugin is not loaded (checked against registry.yaml's defaults);
        building it is what needs the plugin."""
        spec = self.spec(kind, name, available=False)
        params = dict(params or {})
        known = spec.parameters()
        for key in params:
            if key not in known:
                raise UnknownName(f"{kind} '{name}' has no parameter '{key}'. {closest(key, known)}")
        for key, value in params.items():  # against the registered default's type
            default = spec.default(key)
            problem = param_type_problem(value, default)
            if problem:
                raise ParamTypeError(f"{kind} '{name}' parameter '{key}' must be {problem}, got {value!r} "
                                     f"({type(value).__name__}; the default is {default!r})")
        return {**spec.defaults, **params}

    def create(self, kind: str, name: str, **params):
        """Build a component, its outputs checked against its contract (:func:`wrap`)."""
        spec = self.spec(kind, name)
        return self.wrap(kind, name, spec.cls(**self.resolve_params(kind, name, params)))

    def wrap(self, kind: str, name: str, obj):
        """``obj`` (a component of ``kind`` registered as ``name``, built by :meth:`create` or e.g. by its class's
        ``from_pretrained``) with every output that crosses an interface checked (:mod:`reaudio_core.checks`);
        a violation is a ``ContractViolation`` naming the component and its distribution."""
        from .checks import checked
        spec = self.components.get((kind, name))
        return checked(obj, kind, name, f"{spec.distribution} {spec.version}" if spec else "?")

    def preset(self, name: str) -> dict:
        if name not in self.presets:
            raise UnknownName(f"Unknown preset '{name}'. {closest(name, self.presets)}")
        return self.presets[name]


def build_registry(path: Path | None = None) -> Registry:
    catalogue = yaml.safe_load(Path(path or registry_path()).read_text(encoding="utf-8")) or {}
    pm, infos = load_plugins()
    registered: list[tuple] = []
    for plugin_name, module in pm.list_name_plugin():
        def register(kind, name, cls, defaults=None, tiny=None, _p=plugin_name):
            registered.append((_p, kind, name, cls, defaults, tiny))
        hook = getattr(module, "register_components", None)
        if hook is None:
            continue
        try:
            hook(register=register)
        except Exception as exc:
            info = next(i for i in infos if i.name == plugin_name)
            info.error = f"{type(exc).__name__} in register_components: {exc}"
    return Registry(catalogue, infos, registered)


@lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry (built on first use)."""
    return build_registry()


def create(kind: str, name: str, **params):
    """Construct a registered component: ``create("retriever", "faiss", index="hnsw")``."""
    return get_registry().create(kind, name, **params)
