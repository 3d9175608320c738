"""The reaudio contract on every component this distribution registers, one test per component and rule, at
the tiny size declared in ``register(..., tiny=...)``. Run: ``pip install -e . && pytest``."""
from reaudio_core.testing import contract_tests

test_contract = contract_tests("reaudio-hashtext")
