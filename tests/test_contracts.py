"""The seven component contracts on every registered component of every kind (retriever, text and audio encoder,
denoiser, decoder, vocoder, feature model): one test per component and rule of reaudio_core/testing/ (the same
rules `reaudio check-plugin` prints), each component built at the tiny size its plugin declares (random weights
where the real ones cannot be on this machine; MiniLM and the shipped esc50-classifier are real). Components of
another installed distribution are listed as skipped: `reaudio check-plugin DIST` tests them. Variants of one
component (faiss index layouts, hnswlib settings) are in tests/test_retrievers.py."""
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


test_contract = contract_tests(BUILTIN, skip_others=True)
