"""Test-size instances of registered components.

Each plugin declares its component's tiny parameters in its ``register(..., tiny={...})`` call (built-ins
exactly like a third party's); :func:`tiny` builds a component with them. The contract rules themselves
live in :mod:`reaudio_core.testing`; this repository's contract tests run them on every component of the
``reaudio`` distribution and list an installed third-party plugin's components as skipped.
"""
from __future__ import annotations

import copy

from reaudio_core import create, get_registry

BUILTIN = "reaudio"  #: the distribution whose components this repository's suite tests

#: ``(kind, name) -> tiny parameters`` of every registered component that declares them
TINY_PARAMS: dict[tuple[str, str], dict] = {key: spec.tiny for key, spec in get_registry().components.items()
                                            if spec.tiny is not None}


def tiny(kind: str, name: str, **extra):
    """Build the registered component ``(kind, name)`` at its declared tiny size."""
    spec = get_registry().spec(kind, name)
    if spec.tiny is None:
        raise AssertionError(f"{kind} '{name}' declares no tiny parameters (register(..., tiny={{...}}))")
    return create(kind, name, **{**copy.deepcopy(spec.tiny), **extra})


def builtin_names(kind: str) -> list[str]:
    """The loaded components of ``kind`` this repository provides (not a third party's)."""
    return sorted(s.name for s in get_registry().components.values()
                  if s.kind == kind and s.cls is not None and s.distribution == BUILTIN)
