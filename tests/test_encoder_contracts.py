"""Contract tests over every registered text and audio encoder (reaudio_core/interfaces.py).

Each is built at its tiny size from tests/component_factories.py (random weights where the real
ones cannot be on this machine; MiniLM is real). A registered encoder without a tiny entry there
fails here, so a new plugin is tested by being registered.
"""
import numpy as np
import pytest
import torch

from component_factories import TINY_PARAMS, tiny
from reaudio_core import ReaudioError
from reaudio_core.registry import get_registry

TEXT = sorted(get_registry().names("text_encoder"))
AUDIO = sorted(get_registry().names("audio_encoder"))
TEXTS = ["a dog barks twice", "heavy rain falls on a tin roof while thunder rumbles in the distance", "bells"]

_built: dict = {}


def encoder(kind, name):
    if (kind, name) not in TINY_PARAMS:
        pytest.fail(f"registered {kind} '{name}' has no tiny instance in tests/component_factories.py TINY_PARAMS")
    if (kind, name) not in _built:
        _built[(kind, name)] = tiny(kind, name)
    return _built[(kind, name)]


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    noise = (0.05 * rng.standard_normal(16000 * 12)).astype(np.float32)  # longer than 10.24 s
    short = (0.2 * rng.standard_normal(160)).astype(np.float32)  # 10 ms
    return [tone, noise, short]


@pytest.mark.parametrize("kind", ["text_encoder", "audio_encoder"])
def test_every_registered_encoder_has_a_tiny_instance(kind):
    missing = [n for n in get_registry().names(kind) if (kind, n) not in TINY_PARAMS]
    assert not missing, f"add tiny constructor params for {kind} {missing} to tests/component_factories.py"


# -- text ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEXT)
def test_text_embed_shape_norm_determinism(name):
    enc = encoder("text_encoder", name)
    assert isinstance(enc.dim, int) and isinstance(enc.token_dim, int)
    e = enc.embed(TEXTS)
    assert e.shape == (3, enc.dim) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(e, enc.embed(TEXTS)), "same input must give bit-identical output"
    alone = enc.embed(TEXTS[:1])
    assert torch.allclose(alone[0], e[0], atol=1e-5), "an embedding must not depend on the rest of the batch"
    assert enc.embed([""]).shape == (1, enc.dim)  # the unconditional input of guidance
    assert enc.embed([]).shape == (0, enc.dim)


@pytest.mark.parametrize("name", TEXT)
def test_text_tokens_mask_semantics(name):
    enc = encoder("text_encoder", name)
    states, mask = enc.encode_tokens(TEXTS)
    B, L = mask.shape
    assert states.shape == (3, L, enc.token_dim) and states.dtype == torch.float32 and mask.dtype == torch.bool
    lengths = mask.sum(1)
    assert L == int(lengths.max()), "without max_tokens L is the longest text of the batch"
    assert lengths[1] > lengths[0] > 0 and lengths[2] > 0
    for row, n in enumerate(lengths.tolist()):
        assert mask[row, :n].all() and not mask[row, n:].any(), "real tokens first, padding after"
    assert not states[~mask].any(), "padding states are zeros"
    assert torch.equal(states, enc.encode_tokens(TEXTS)[0])


@pytest.mark.parametrize("name", TEXT)
def test_text_max_tokens_pads_and_truncates(name):
    enc = encoder("text_encoder", name)
    free, free_mask = enc.encode_tokens(TEXTS)
    padded, pmask = enc.encode_tokens(TEXTS, max_tokens=50)
    assert padded.shape == (3, 50, enc.token_dim) and pmask.shape == (3, 50)
    assert torch.equal(pmask[:, :free.shape[1]], free_mask) and not pmask[:, free.shape[1]:].any()
    assert torch.allclose(padded[:, :free.shape[1]], free, atol=1e-4), "padding must not change real states"
    assert not padded[~pmask].any()
    cut, cmask = enc.encode_tokens(TEXTS, max_tokens=3)
    assert cut.shape == (3, 3, enc.token_dim) and cmask.all(), "every text has >= 3 tokens, truncated to 3"
    assert enc.encode_tokens([], max_tokens=5)[0].shape == (0, 5, enc.token_dim)


@pytest.mark.parametrize("name", TEXT)
def test_text_bad_input(name):
    enc = encoder("text_encoder", name)
    with pytest.raises((ReaudioError, TypeError, ValueError)):
        enc.embed(["fine", 3])


# -- audio -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", AUDIO)
def test_audio_embed_shape_norm_determinism(name, clips):
    enc = encoder("audio_encoder", name)
    assert isinstance(enc.dim, int) and isinstance(enc.token_dim, int) and isinstance(enc.num_tokens, int)
    e = enc.embed(clips)
    assert e.shape == (3, enc.dim) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(e, enc.embed(clips)), "same input must give bit-identical output"
    assert torch.allclose(enc.embed(clips[1:2])[0], e[1], atol=1e-5), "must not depend on the rest of the batch"
    assert enc.embed([]).shape == (0, enc.dim)


@pytest.mark.parametrize("name", AUDIO)
def test_audio_tokens(name, clips):
    enc = encoder("audio_encoder", name)
    tokens, mask = enc.encode_tokens(clips)
    assert tokens.shape == (3, enc.num_tokens, enc.token_dim) and tokens.dtype == torch.float32
    assert mask.shape == (3, enc.num_tokens) and mask.dtype == torch.bool and mask.any(1).all()
    assert not tokens[~mask].any()
    assert torch.isfinite(tokens).all()
    assert torch.equal(tokens[2:], enc.encode_tokens(clips[2:])[0]), "deterministic, whatever the batch"


@pytest.mark.parametrize("name", AUDIO)
def test_audio_bad_input(name):
    enc = encoder("audio_encoder", name)
    with pytest.raises((ReaudioError, ValueError)):  # the contract: any length > 0
        enc.embed([np.zeros(0, np.float32)])


@pytest.mark.parametrize("kind,name", [("audio_encoder", n) for n in AUDIO] + [("text_encoder", n) for n in TEXT])
def test_save_pretrained_round_trip(kind, name, tmp_path, clips):
    enc = encoder(kind, name)
    if not hasattr(enc, "save_pretrained"):
        pytest.skip(f"{kind} {name} has no weights of its own to save")
    enc.save_pretrained(tmp_path / "saved")
    again = type(enc).from_pretrained(tmp_path / "saved")
    data = clips[::2] if kind == "audio_encoder" else TEXTS
    assert torch.equal(again.embed(data), enc.embed(data))
