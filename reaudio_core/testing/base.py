"""The kit's building blocks: a :class:`Rule`, its :class:`Result`, the component under test (:class:`Context`),
the assertions the rules of every kind share, and :data:`BUILDS`, every kind's first rule."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..interfaces import BASES
from ..registry import Registry
from ..pretrained import Pretrained



class NotApplicable(Exception):
    """Raised by a rule that does not apply to a component (a ``save_pretrained`` rule without one)."""


@dataclass(frozen=True)
class Rule:
    id: str  #: short slug (pytest ids)
    text: str  #: the rule as printed
    check: Callable[["Context"], None]  #: raises AssertionError (or any error) when the rule is broken


@dataclass
class Result:
    kind: str
    name: str
    rule: str
    status: str  #: "pass", "fail" or "n/a"
    detail: str = ""

    def line(self) -> str:
        tag = {"pass": "PASS", "fail": "FAIL", "n/a": "N/A "}[self.status]
        return f"{tag} {self.kind} {self.name}: {self.rule}" + (f" -- {self.detail}" if self.detail else "")


def describe(exc: Exception) -> str:
    """A broken rule as reported: an assertion's own message, any other error's type and message."""
    return str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"


class Context:
    """One component under test: its spec, its tiny parameters, a shared instance and memoised outputs."""

    def __init__(self, spec, params: dict | None, registry: Registry):
        self.spec, self.params, self.registry = spec, params, registry
        self.tmp: Path | None = None  #: an empty directory for the current rule
        self._instance = None
        self._error: str | None = None  #: why building failed (not retried for every rule)
        self._memo: dict = {}

    def new(self, **extra):
        """A fresh instance at the tiny size (``extra`` parameters overlaid)."""
        if self.params is None:
            raise AssertionError(f"{self.spec.kind} '{self.spec.name}' declares no tiny parameters: pass "
                                 "tiny={...} to register() ({} when its defaults are small and offline)")
        params = {**copy.deepcopy(self.params), **extra}
        return self.spec.cls(**self.registry.resolve_params(self.spec.kind, self.spec.name, params))

    @property
    def component(self):
        if self._error is not None:
            raise AssertionError(f"it could not be built: {self._error}")
        if self._instance is None:
            try:
                self._instance = self.new()
            except Exception as exc:
                self._error = describe(exc)
                raise
        return self._instance

    def once(self, key: str, fn: Callable):
        """``fn()`` computed on first use, then remembered (outputs several rules inspect)."""
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]


# -- assertions --------------------------------------------------------------------------------------------
def _positive_ints(obj, *names):
    for n in names:
        v = getattr(obj, n, None)
        assert isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{n} = {v!r}, expected a positive int"


def _tensor(x, shape, dtype, what):
    assert isinstance(x, torch.Tensor), f"{what} returned {type(x).__name__}, expected a torch.Tensor"
    assert tuple(x.shape) == tuple(shape), f"{what} has shape {tuple(x.shape)}, expected {tuple(shape)}"
    assert x.dtype == dtype, f"{what} has dtype {x.dtype}, expected {dtype}"


def _unit_rows(e, what):
    norms = e.norm(dim=-1)
    bad = (norms - 1).abs() > 1e-4
    assert not bad.any(), f"{what}: row norms {[round(float(n), 4) for n in norms[bad][:4]]}, expected 1"


def _finite(x, what):
    assert bool(torch.isfinite(torch.as_tensor(x)).all()), f"{what} has NaN or inf values"


def _same(a, b, what, atol=0.0):
    if atol:
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        assert a.shape == b.shape and diff <= atol, f"{what} (max difference {diff:.3g} > {atol})"
    else:
        assert torch.equal(a, b), what


def _raises(types, fn, what):
    names = " or ".join(t.__name__ for t in types)
    try:
        fn()
    except types:
        return
    except Exception as exc:
        raise AssertionError(f"{what} raised {type(exc).__name__} ({exc}), expected {names}") from exc
    raise AssertionError(f"{what} did not raise {names}")


def _round_trip(ctx, outputs, extra=None):
    """``save_pretrained`` then ``from_pretrained`` give bit-identical ``outputs(component)``."""
    comp = ctx.component
    if not isinstance(comp, Pretrained):
        if hasattr(comp, "save_pretrained"):
            raise AssertionError("has save_pretrained but does not subclass reaudio_core.Pretrained: a pipeline "
                                 "neither saves nor loads its weights")
        raise NotApplicable("not Pretrained (no weights of its own)")
    comp.save_pretrained(ctx.tmp / "saved")
    again = type(comp).from_pretrained(ctx.tmp / "saved")
    if extra:
        extra(comp, again)
    _same(outputs(again), outputs(comp), "from_pretrained(save_pretrained) changes the output")


def _builds(ctx):
    comp = ctx.component
    base = BASES[ctx.spec.kind]
    assert isinstance(comp, base), f"{type(comp).__name__} is not a {base.__name__}"


BUILDS = Rule("builds", "builds from the tiny parameters its plugin declares", _builds)
