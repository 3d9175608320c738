"""Reproduce, package and check the offline preset: ``python -m research.offline_preset STAGE [options]``
(``--help`` lists the stages; research/README.md says what each reproduces).

Modules: settings (paths and constants, read by every stage at call time), stages (train, package,
experts), checks (check, demo, ceiling, vae-l1 and the shared classifier helpers), experiments (heldout,
conditional, renoise, diagnose), fast (fast, fast-check: the offline-fast student), cli (the argument parser; ``__main__`` runs it)."""
from __future__ import annotations

from . import checks, experiments, fast, settings, stages
from .checks import ceiling, check, demo, vae_l1
from .experiments import conditional, diagnose, heldout, renoise
from .fast import fast_check
from .stages import experts, package, train

__all__ = ["settings", "stages", "checks", "experiments", "train", "package", "experts", "check", "demo",
           "ceiling", "vae_l1", "heldout", "conditional", "renoise", "diagnose", "fast", "fast_check"]
