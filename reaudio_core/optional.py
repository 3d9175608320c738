"""Third-party modules imported where a feature first needs them.

``require`` is the one place that turns a missing module into an error a user can act on: one
line naming the feature and the ``pip install`` that provides it (an extra of reaudio, or a core
dependency that an install without dependencies left out), never a traceback.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .registry import ReaudioError


def install_hint(extra: str | None, package: str) -> str:
    """The command that provides ``package``: ``pip install "reaudio[EXTRA]"`` for an optional
    extra, else ``pip install PACKAGE`` (a core dependency of reaudio)."""
    if extra:
        return f'pip install "reaudio[{extra}]"'
    return f"pip install {package} (a dependency of reaudio)"


def require(module: str, extra: str | None, feature: str, package: str | None = None,
            alternative: str = "") -> ModuleType:
    """Import and return ``module`` (dotted names allowed). If it cannot be imported, raise
    ``ReaudioError``: ``FEATURE needs PACKAGE (ImportError text): pip install ...[; or ALTERNATIVE]``,
    where ``package`` is the distribution to install (default: the top-level module name) and
    ``extra`` the reaudio extra that lists it (None for a core dependency)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _missing(module, extra, feature, package, alternative, exc) from None


def _missing(module: str, extra: str | None, feature: str, package: str | None, alternative: str,
             exc: Exception) -> ReaudioError:
    package = package or module.partition(".")[0]
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    alternative = f"; or {alternative}" if alternative else ""
    return ReaudioError(f"{feature} needs {package} ({reason}): {install_hint(extra, package)}{alternative}")


class LazyModule:
    """A module imported on first attribute access; :func:`lazy` returns one."""

    def __init__(self, module: str, load):
        self._name, self._load, self._module = module, load, None

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if self._module is None:
            self._module = self._load()
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{' (imported)' if self._module is not None else ''}>"


def lazy(module: str, extra: str | None, feature: str, package: str | None = None,
         alternative: str = "") -> LazyModule:
    """:func:`require` deferred to first use, for a plugin module's top level: whether ``module`` is installed
    is checked now (``importlib.util.find_spec``, nothing is imported), so a plugin whose dependency is
    missing still fails to load with :func:`require`'s one line; the import itself (seconds for a native
    library) happens when an attribute is first read, so listing plugins imports none of them."""
    from importlib.util import find_spec
    try:
        found = find_spec(module) is not None
        error: Exception = ModuleNotFoundError(f"No module named {module!r}")
    except (ImportError, ValueError) as exc:  # a parent package that cannot import
        found, error = False, exc
    if not found:
        raise _missing(module, extra, feature, package, alternative, error)
    return LazyModule(module, lambda: require(module, extra, feature, package, alternative))


def is_tensor(x) -> bool:
    """``torch.is_tensor(x)`` without importing torch: no torch imported yet means ``x`` is not a tensor."""
    import sys
    torch = sys.modules.get("torch")
    return torch is not None and torch.is_tensor(x)
