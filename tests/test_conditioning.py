"""The conditioning builder (reaudio_core/conditioning.py) that generation and LDM training share:
unconditional inputs, neighbour features from the encoders or the feature cache, missing neighbours,
assembly into a Conditioning. Small deterministic stand-in encoders keep it fast."""
import zlib

import numpy as np
import pytest
import torch

from conftest import make_clip
from reaudio_core import conditioning as C
from reaudio_core.audio import AudioProblem

D, TD, L = 6, 5, 4  # prompt dim, caption token dim, caption tokens


def _seeded(text: str, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(zlib.crc32(text.encode())))


class TextEnc:
    """Prompt embeddings and caption states that depend on the text alone (not on the batch)."""
    dim, token_dim = D, TD

    def embed(self, texts):
        return torch.nn.functional.normalize(torch.stack([_seeded(t, D) for t in texts]), dim=-1)

    def encode_tokens(self, texts, max_tokens):
        states = torch.stack([_seeded("tok:" + t, max_tokens, TD) for t in texts])
        mask = torch.zeros(len(texts), max_tokens, dtype=torch.bool)
        for i, t in enumerate(texts):
            mask[i, :min(max_tokens, len(t.split()) + 1)] = True
        return states * mask[..., None], mask


class AudioEnc:
    """Three tokens per clip: mean, std and peak of each third of the clip, in 2 dims."""
    num_tokens, token_dim = 3, 2

    def encode_tokens(self, waves):
        out = []
        for w in waves:
            parts = np.array_split(np.asarray(w, dtype=np.float32), 3)
            out.append([[p.mean(), p.std()] for p in parts])
        return torch.tensor(np.array(out, dtype=np.float32)), torch.ones(len(waves), 3, dtype=torch.bool)


class FeatureDb:
    """The part of a Database that :func:`C.cached` reads: memory-mapped arrays per feature name."""

    def __init__(self, folder, name, states, mask):
        np.save(folder / "states.npy", states.numpy())
        np.save(folder / "mask.npy", mask.numpy())
        self.folder, self.name = folder, name

    def features(self, name):
        if name != self.name:
            return None
        return {k: np.load(self.folder / f"{k}.npy", mmap_mode="r") for k in ("states", "mask")}


CAPTIONS = ["a dog barks", "rain", "church bells ring out loud", "a car"]


def test_empty_text_is_the_encoders_own_output_for_the_empty_string():
    enc = TextEnc()
    prompt, caption = C.empty_text(enc, enc, L)
    assert torch.equal(prompt, enc.embed([""])[0]) and prompt.shape == (D,)
    assert torch.equal(caption, enc.encode_tokens([""], L)[0][0]) and caption.shape == (L, TD)
    assert C.empty_text(enc)[1] is None


def test_unconditional_rows_slots_and_masks():
    enc = TextEnc()
    prompt, caption = C.empty_text(enc, enc, L)
    k, B = 3, 2
    u = C.unconditional(prompt, k, caption, audio=(AudioEnc.num_tokens, AudioEnc.token_dim), batch=B)
    assert u.prompt.shape == (B, D) and all(torch.equal(row, prompt) for row in u.prompt)
    assert u.captions.shape == (B, k * L, TD) and u.caption_mask.shape == (B, k * L)
    for b in range(B):
        for slot in range(k):  # the empty caption's states in every slot, every position attended
            assert torch.equal(u.captions[b, slot * L:(slot + 1) * L], caption)
    assert u.caption_mask.all() and u.caption_mask.dtype == torch.bool
    assert u.audio.shape == (B, k * 3, 2) and not u.audio.any()
    assert u.audio_mask.shape == (B, k * 3) and u.audio_mask.all()
    # streams the denoiser lacks stay None; a batch of one by default
    bare = C.unconditional(prompt, k)
    assert bare.prompt.shape == (1, D) and bare.captions is bare.caption_mask is bare.audio is bare.audio_mask is None


def test_gather_lays_k_neighbours_side_by_side_and_fills_missing_slots():
    enc = TextEnc()
    states, mask = C.caption_states(enc, CAPTIONS, L)  # [4, L, TD]
    assert states.shape == (4, L, TD) and mask.shape == (4, L)
    assert not mask.all()  # short captions leave masked positions: they must travel with the states
    ids = torch.tensor([[2, 0], [3, -1]])
    empty = C.empty_text(enc, enc, L)[1]
    s, m = C.gather(states, mask, ids, empty)
    assert s.shape == (2, 2 * L, TD) and m.shape == (2, 2 * L) and s.dtype == torch.float32
    assert torch.equal(s[0, :L], states[2]) and torch.equal(s[0, L:], states[0])
    assert torch.equal(m[0], torch.cat([mask[2], mask[0]]))
    assert torch.equal(s[1, :L], states[3]) and torch.equal(m[1, :L], mask[3])
    # the missing neighbour: the unconditional slot (empty caption states, every position True)
    assert torch.equal(s[1, L:], empty) and m[1, L:].all()
    # without empty states (audio), a missing slot is zeros
    z, zm = C.gather(states, mask, ids)
    assert not z[1, L:].any() and zm[1, L:].all() and torch.equal(z[0], s[0])
    # ids as nested lists (one prompt's neighbours) work the same
    one, one_m = C.gather(states, mask, [[3, 1, 2]])
    assert one.shape == (1, 3 * L, TD) and torch.equal(one[0, L:2 * L], states[1]) and one_m.shape == (1, 3 * L)


def test_cached_features_equal_the_encoders_and_arrays_equal_tensors(tmp_path):
    """A feature cache computed by the encoder and read back (memory-mapped) gives what the encoder gives
    for the same neighbours, and gathering from the arrays equals gathering from tensors."""
    enc = TextEnc()
    table = C.caption_states(enc, CAPTIONS, L)
    db = FeatureDb(tmp_path, "caption_encoder-x-123", *table)
    got = C.cached(db, "caption_encoder-x-123")
    assert got is not None and C.cached(db, "other") is None and C.cached(None, "caption_encoder-x-123") is None
    ids = [[2, 0, 1]]
    from_cache = C.gather(*got, ids)
    from_encoder = C.flatten(*C.caption_states(enc, [CAPTIONS[i] for i in ids[0]], L))
    assert torch.equal(from_cache[0], from_encoder[0]) and torch.equal(from_cache[1], from_encoder[1])
    from_tensors = C.gather(*table, ids)
    assert torch.equal(from_cache[0], from_tensors[0]) and torch.equal(from_cache[1], from_tensors[1])
    # missing slots too, arrays or tensors alike
    a = C.gather(*got, [[1, -1]], table[0][0])
    b = C.gather(*table, [[1, -1]], table[0][0])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_audio_tokens_batched_or_one_by_one_with_unreadable_clips_as_empty_slots(tmp_path):
    paths = [make_clip(tmp_path / f"c{i}.wav", seconds=0.3, freq=300 + 200 * i, seed=i) for i in range(2)]
    enc = AudioEnc()
    batched = C.audio_tokens(enc, paths)
    each = C.audio_tokens(enc, paths, unreadable_empty=True)
    assert batched[0].shape == (2, 3, 2) and torch.equal(batched[0], each[0]) and torch.equal(batched[1], each[1])
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00")
    tokens, mask = C.audio_tokens(enc, [paths[0], bad, paths[1]], unreadable_empty=True)
    assert torch.equal(tokens[[0, 2]], batched[0]) and not tokens[1].any() and mask.all()
    with pytest.raises(AudioProblem):
        C.audio_tokens(enc, [paths[0], bad])


def test_assemble_uses_retrieved_streams_and_the_unconditional_ones_otherwise():
    enc = TextEnc()
    prompt_u, caption_u = C.empty_text(enc, enc, L)
    k = 2
    uncond = C.unconditional(prompt_u, k, caption_u, audio=(3, 2))  # a batch of one, as training keeps it
    prompt = enc.embed(["a dog", "rain"])
    states, mask = C.caption_states(enc, CAPTIONS, L)
    captions = C.gather(states, mask, [[0, 1], [2, 3]])
    cond = C.assemble(prompt, uncond, captions=captions)
    assert torch.equal(cond.prompt, prompt)
    assert cond.captions is captions[0] and cond.caption_mask is captions[1]
    # audio not retrieved: the unconditional audio slots for every row
    assert cond.audio.shape == (2, k * 3, 2) and not cond.audio.any() and cond.audio_mask.all()
    text_only = C.assemble(prompt, C.unconditional(prompt_u, k, caption_u), captions=captions)
    assert text_only.audio is None and text_only.audio_mask is None
    nothing = C.assemble(prompt, uncond)
    assert torch.equal(nothing.captions, uncond.captions.expand(2, -1, -1)) and nothing.caption_mask.shape == (2, k * L)


def test_feature_key_names_the_encoder_its_parameters_and_weights(tmp_path):
    from reaudio_core import pipeline
    assert pipeline.feature_key is C.feature_key  # its old import path keeps working
    cfg = {"caption_encoder": {"name": "minilm", "params": {"device": "cpu"}}, "generation": {"caption_tokens": 8},
           "audio_encoder": {"name": "vae-latent", "params": {"weights": "/a", "num_tokens": 4}}}
    key = C.feature_key(cfg, "caption_encoder")
    assert key.startswith("caption_encoder-minilm-")
    assert C.feature_key({**cfg, "generation": {"caption_tokens": 9}}, "caption_encoder") != key
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"one")
    a = C.feature_key(cfg, "audio_encoder", [w])
    moved = {**cfg, "audio_encoder": {"name": "vae-latent", "params": {"weights": "/b", "num_tokens": 4}}}
    assert C.feature_key(moved, "audio_encoder", [w]) == a  # where the weights were read from does not count
    w.write_bytes(b"two")
    assert C.feature_key(cfg, "audio_encoder", [w]) != a  # their bytes do
