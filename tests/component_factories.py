"""Test-size instances of registered components.

Each plugin declares its component's tiny parameters in its ``register(..., tiny={...})`` call (built-ins
exactly like a third party's); :func:`tiny` builds a component with them. The contract rules themselves
live in :mod:`reaudio_core.testing`; this repository's contract tests run them on every component of the
``reaudio`` distribution and list an installed third-party plugin's components as skipped.
"""
from __future__ import annotations

from reaudio_core import get_registry
from reaudio_core.testing import Context

BUILTIN = "reaudio"  #: the distribution whose components this repository's suite tests

#: ``(kind, name) -> tiny parameters`` of every registered component that declares them
TINY_PARAMS: dict[tuple[str, str], dict] = {key: spec.tiny for key, spec in get_registry().components.items()
                                            if spec.tiny is not None}


def tiny(kind: str, name: str, **extra):
    """Build the registered component ``(kind, name)`` at its declared tiny size (``extra`` overlaid), the way
    the kit builds it: one guard, :meth:`reaudio_core.testing.Context.new`, for a component without them."""
    registry = get_registry()
    spec = registry.spec(kind, name)
    return Context(spec, spec.tiny, registry).new(**extra)


def builtin_names(kind: str) -> list[str]:
    """The loaded components of ``kind`` this repository provides (not a third party's)."""
    return sorted(s.name for s in get_registry().components.values()
                  if s.kind == kind and s.cls is not None and s.distribution == BUILTIN)
