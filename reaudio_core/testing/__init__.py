"""Contract tests for reaudio components: the rules of :mod:`reaudio_core.interfaces`, runnable on any
registered component, built-in or a third party's, at the tiny size its plugin declares
(``register(kind, name, cls, tiny={...})``, see :mod:`reaudio_core.hookspecs`).

Three ways to run them:

* ``reaudio check-plugin DISTRIBUTION``: every component an installed distribution registers, one
  ``PASS`` / ``FAIL`` line per rule, exit status 1 when a rule fails.
* a plugin's own pytest suite, in one file (``tests/test_contract.py``)::

      from reaudio_core.testing import contract_tests

      test_contract = contract_tests("my-distribution")   # one test per component and rule

* Python: :func:`check_component` ``(kind, name) -> [Result]``; :data:`RULES` lists the rules by kind.

A component is built from its class (registry defaults overlaid with its tiny parameters), not through
reaudio's run-time wrappers, so each rule reports on the component's own output. Rules that change a
component's state (retrievers) build a fresh instance; the others share one.

Modules: ``base`` (:class:`Rule`, :class:`Result`, the component under test, the shared assertions),
``encoders`` (text and audio encoder rules), ``retriever``, ``generation`` (denoiser, decoder, vocoder),
``feature_model``, ``core`` (:data:`RULES`, :func:`check_component`, :func:`check_distribution`) and
``pytest_helper`` (:func:`contract_tests`, :func:`check_rule`). This package re-exports their public names.
"""
from .base import BUILDS, Context, NotApplicable, Result, Rule
from .core import RULES, check_component, check_distribution
from .encoders import TEXTS, clips
from .pytest_helper import check_rule, contract_tests
from .retriever import exact_topk, unit_vectors

__all__ = ["BUILDS", "Context", "NotApplicable", "RULES", "Result", "Rule", "TEXTS", "check_component",
           "check_distribution", "check_rule", "clips", "contract_tests", "exact_topk", "unit_vectors"]
