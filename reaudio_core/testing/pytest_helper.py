"""The pytest helper: :func:`contract_tests` (one test per component and rule) and :func:`check_rule`."""
from __future__ import annotations

from pathlib import Path

from ..registry import Registry, get_registry
from .base import Context, NotApplicable, Rule
from .core import RULES, _apply, _canonical, _specs, _tiny

_current: list = [None, None]  # (key, Context): the component under test, built once for its rules


def _context(kind: str, name: str, params: dict | None, registry: Registry) -> Context:
    key = (id(registry), kind, name, repr(params))
    if _current[0] != key:  # tests run component by component: keep one instance, not every one
        spec = registry.spec(kind, name)
        _current[:] = [key, Context(spec, _tiny(spec, params), registry)]
    return _current[1]


def check_rule(kind: str, name: str, rule: Rule, tmp: Path, *, params: dict | None = None,
               registry: Registry | None = None) -> None:
    """Apply one rule inside a pytest test: a broken rule raises (with its traceback), a rule that does not
    apply skips the test. ``params`` overlay the declared tiny parameters (variants of one component)."""
    import pytest
    ctx = _context(kind, name, params, registry or get_registry())
    try:
        _apply(rule, ctx, tmp)
    except NotApplicable as exc:
        pytest.skip(str(exc))


def contract_tests(distribution: str | None = None, *, kinds=None, skip_others: bool = False,
                   registry: Registry | None = None):
    """A pytest test function: every rule on every component ``distribution`` registers (every registered
    component when ``None``), one test per component and rule. Assign it to a ``test_`` name::

        test_contract = contract_tests("my-distribution")

    ``kinds`` restricts the kinds; ``skip_others`` lists the components of other distributions as skipped
    tests (reaudio's own suite: an installed plugin is named there but never fails it).
    """
    import pytest
    registry = registry or get_registry()
    cases = []
    for spec in _specs(registry):
        if kinds is not None and spec.kind not in kinds:
            continue
        ours = distribution is None or _canonical(spec.distribution) == _canonical(distribution)
        if not ours and not skip_others:
            continue
        marks = () if ours else pytest.mark.skip(
            reason=f"{spec.kind} '{spec.name}' comes from {spec.distribution}: `reaudio check-plugin "
                   f"{spec.distribution}` tests it")
        cases += [pytest.param(spec.kind, spec.name, rule, marks=marks, id=f"{spec.kind}-{spec.name}-{rule.id}")
                  for rule in RULES[spec.kind]]
    if not cases:
        def test_contract():
            pytest.fail(f"no registered components{f' of {distribution}' if distribution else ''}"
                        f"{f' of kinds {list(kinds)}' if kinds else ''}: is the distribution installed?")
        return test_contract

    @pytest.mark.parametrize("kind,name,rule", cases)
    def test_contract(kind, name, rule, tmp_path):
        check_rule(kind, name, rule, tmp_path, registry=registry)
    return test_contract
