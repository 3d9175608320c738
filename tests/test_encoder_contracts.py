"""Contract tests over every registered text and audio encoder: the rules of reaudio_core/testing/, one test per
encoder and rule, each encoder built at the tiny size its plugin declares (random weights where the real ones
cannot be on this machine; MiniLM is real). Third-party encoders are listed, skipped: check-plugin tests them."""
from component_factories import BUILTIN
from reaudio_core.testing import contract_tests

test_text_encoder_contract = contract_tests(BUILTIN, kinds=["text_encoder"], skip_others=True)
test_audio_encoder_contract = contract_tests(BUILTIN, kinds=["audio_encoder"], skip_others=True)
