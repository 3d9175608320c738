"""The Denoiser contract (reaudio_core/testing/ rules) on every registered denoiser at its declared tiny size."""
import pytest
import torch

from component_factories import BUILTIN
from reaudio_core.testing import contract_tests


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


test_denoiser_contract = contract_tests(BUILTIN, kinds=["denoiser"], skip_others=True)
