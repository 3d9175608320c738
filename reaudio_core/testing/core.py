"""Running the rules: :data:`RULES` by kind, :func:`check_component` on one registered component,
:func:`check_distribution` on every component a distribution registers (``reaudio check-plugin``)."""
from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..interfaces import KINDS
from ..registry import ReaudioError, Registry, get_registry
from .base import BUILDS, Context, NotApplicable, Result, Rule, describe
from .encoders import AUDIO_RULES, TEXT_RULES
from .feature_model import FEATURE_RULES
from .generation import DECODER_RULES, DENOISER_RULES, VOCODER_RULES
from .retriever import RETRIEVER_RULES

RULES: dict[str, list[Rule]] = {
    "retriever": RETRIEVER_RULES,
    "text_encoder": TEXT_RULES,
    "audio_encoder": AUDIO_RULES,
    "denoiser": DENOISER_RULES,
    "decoder": DECODER_RULES,
    "vocoder": VOCODER_RULES,
    "feature_model": FEATURE_RULES,
}
"""Every rule, by component kind; the first (``builds``) builds the tiny instance the others use."""


# -- running -----------------------------------------------------------------------------------------------
def _apply(rule: Rule, ctx: Context, tmp: Path) -> None:
    ctx.tmp = Path(tmp)
    with torch.no_grad():
        rule.check(ctx)


def _tiny(spec, params):
    return spec.tiny if params is None else {**(spec.tiny or {}), **params}


def check_component(kind: str, name: str, *, params: dict | None = None,
                    registry: Registry | None = None) -> list[Result]:
    """Every rule of ``kind`` on the registered component ``name``, built from its declared tiny parameters
    (``params`` overlaid on them). Stops after ``builds`` when the component cannot be built."""
    registry = registry or get_registry()
    spec = registry.spec(kind, name)
    ctx = Context(spec, _tiny(spec, params), registry)
    results = []
    for rule in RULES[kind]:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _apply(rule, ctx, Path(tmp))
                results.append(Result(kind, name, rule.text, "pass"))
            except NotApplicable as exc:
                results.append(Result(kind, name, rule.text, "n/a", str(exc)))
            except Exception as exc:  # a broken rule is reported, the next one runs
                results.append(Result(kind, name, rule.text, "fail", " ".join(describe(exc).split())[:400]))
        if rule is BUILDS and results[-1].status == "fail":
            break
    return results


def _canonical(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _specs(registry: Registry, distribution: str | None = None):
    """Loaded components (of ``distribution``), in kind order then by name."""
    specs = [s for s in registry.components.values() if s.cls is not None
             and (distribution is None or _canonical(s.distribution) == _canonical(distribution))]
    return sorted(specs, key=lambda s: (KINDS.index(s.kind), s.name))


def check_distribution(distribution: str, *, registry: Registry | None = None,
                       report: Callable[[Result], None] | None = None) -> list[Result]:
    """:func:`check_component` on every component ``distribution`` registers; ``report`` sees each result as it
    comes. A distribution that registers nothing (or whose plugin failed to load) is a :class:`ReaudioError`."""
    registry = registry or get_registry()
    failed = [p for p in registry.plugins if p.error and _canonical(p.distribution) == _canonical(distribution)]
    if failed:
        raise ReaudioError("; ".join(f"plugin '{p.name}' of {p.distribution} failed to load: {p.error}"
                                     for p in failed))
    specs = _specs(registry, distribution)
    if not specs:
        known = sorted({s.distribution for s in _specs(registry)})
        raise ReaudioError(f"distribution '{distribution}' registers no reaudio components (is it installed, with a "
                           f"'reaudio.plugins' entry point?). Distributions that do: {', '.join(known)}")
    results = []
    for spec in specs:
        for result in check_component(spec.kind, spec.name, registry=registry):
            results.append(result)
            if report:
                report(result)
    return results

