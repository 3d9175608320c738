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
        package = package or module.partition(".")[0]
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        alternative = f"; or {alternative}" if alternative else ""
        raise ReaudioError(f"{feature} needs {package} ({reason}): {install_hint(extra, package)}{alternative}") from None
