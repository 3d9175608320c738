"""Plugin discovery: entry points of group ``reaudio.plugins`` loaded through pluggy.

``REAUDIO_PLUGINS`` (comma-separated entry-point names) restricts which plugins load;
unset means all. A plugin that fails to import is recorded with its error and skipped.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from . import hookspecs

GROUP = "reaudio.plugins"
ENV_VAR = "REAUDIO_PLUGINS"


@dataclass
class PluginInfo:
    name: str  #: entry-point name
    module: str
    distribution: str
    version: str
    error: str | None = None  #: one-line import/registration error, None when loaded
    detail: str | None = field(default=None, repr=False)  #: full traceback


def _allowed() -> set[str] | None:
    value = os.environ.get(ENV_VAR)
    if value is None:
        return None
    return {v.strip() for v in value.split(",") if v.strip()}


def load_plugins(manager: pluggy.PluginManager | None = None) -> tuple[pluggy.PluginManager, list[PluginInfo]]:
    """Create a plugin manager and load every allowed entry point into it."""
    pm = manager or pluggy.PluginManager("reaudio")
    pm.add_hookspecs(hookspecs)
    allowed = _allowed()
    infos: list[PluginInfo] = []
    seen: set[str] = set()
    for ep in sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name):
        if ep.name in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(ep.name)
        if allowed is not None and ep.name not in allowed:
            continue
        dist = ep.dist.metadata["Name"] if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        info = PluginInfo(ep.name, ep.value, dist, version)
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must not break the others
            info.error = f"{type(exc).__name__}: {exc}"
            info.detail = traceback.format_exc()
        infos.append(info)
    return pm, infos
