"""Rules of the text encoder and audio encoder contracts (they share the ``embed`` rules)."""
from __future__ import annotations

import numpy as np
import torch

from ..registry import ReaudioError
from .base import BUILDS, Rule, _finite, _positive_ints, _raises, _round_trip, _same, _tensor, _unit_rows

# -- text encoder ------------------------------------------------------------------------------------------
TEXTS = ["a dog barks twice", "heavy rain falls on a tin roof while thunder rumbles in the distance", "bells"]


def clips() -> list[np.ndarray]:
    """1 s tone, 12 s noise (longer than a 10.24 s window), 10 ms noise: float32 at 16 kHz."""
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    return [(0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
            (0.05 * rng.standard_normal(16000 * 12)).astype(np.float32),
            (0.2 * rng.standard_normal(160)).astype(np.float32)]


def _embed(ctx):
    data = TEXTS if ctx.spec.kind == "text_encoder" else ctx.once("clips", clips)
    return ctx.once("embed", lambda: ctx.component.embed(data))


def _embed_shape(ctx):
    _tensor(_embed(ctx), (3, ctx.component.dim), torch.float32, "embed(3 inputs)")


def _embed_norm(ctx):
    _unit_rows(_embed(ctx), "embed(3 inputs)")


def _embed_deterministic(ctx):
    data = TEXTS if ctx.spec.kind == "text_encoder" else ctx.once("clips", clips)
    _same(ctx.component.embed(data), _embed(ctx), "embed twice on the same input is not bit-identical")


def _embed_batch_independent(ctx):
    data = TEXTS if ctx.spec.kind == "text_encoder" else ctx.once("clips", clips)
    _same(ctx.component.embed(data[1:2])[0], _embed(ctx)[1], "a row of embed depends on the rest of the batch",
          atol=1e-5)


def _embed_empty_batch(ctx):
    _tensor(ctx.component.embed([]), (0, ctx.component.dim), torch.float32, "embed([])")


def _text_empty_string(ctx):
    e = ctx.component.embed([""])
    _tensor(e, (1, ctx.component.dim), torch.float32, 'embed([""])')
    _unit_rows(e, 'embed([""])')


def _text_not_a_string(ctx):
    _raises((ReaudioError, TypeError, ValueError), lambda: ctx.component.embed(["fine", 3]), 'embed(["fine", 3])')


def _tokens(ctx):
    return ctx.once("tokens", lambda: ctx.component.encode_tokens(TEXTS))


def _text_tokens_shape(ctx):
    states, mask = _tokens(ctx)
    assert isinstance(mask, torch.Tensor) and mask.ndim == 2, "mask is not a [B, L] tensor"
    L = mask.shape[1]
    _tensor(mask, (3, L), torch.bool, "encode_tokens mask")
    _tensor(states, (3, L, ctx.component.token_dim), torch.float32, "encode_tokens states")
    assert L == int(mask.sum(1).max()), f"L = {L}, but the longest text has {int(mask.sum(1).max())} tokens"


def _text_tokens_mask(ctx):
    _, mask = _tokens(ctx)
    lengths = mask.sum(1).tolist()
    assert lengths[1] > lengths[0] > 0 and lengths[2] > 0, f"token counts {lengths} for texts of 4, 12 and 1 words"
    for row, n in enumerate(lengths):
        assert mask[row, :n].all() and not mask[row, n:].any(), f"row {row}: real tokens are not first"


def _text_tokens_padding(ctx):
    states, mask = _tokens(ctx)
    assert not states[~mask].any(), "padding states are not zeros"


def _text_tokens_deterministic(ctx):
    _same(ctx.component.encode_tokens(TEXTS)[0], _tokens(ctx)[0], "encode_tokens twice is not bit-identical")


def _text_max_tokens_pad(ctx):
    free, free_mask = _tokens(ctx)
    states, mask = ctx.component.encode_tokens(TEXTS, max_tokens=50)
    _tensor(states, (3, 50, ctx.component.token_dim), torch.float32, "encode_tokens(max_tokens=50) states")
    _tensor(mask, (3, 50), torch.bool, "encode_tokens(max_tokens=50) mask")
    L = free.shape[1]
    assert torch.equal(mask[:, :L], free_mask) and not mask[:, L:].any(), "padding changed the mask"
    _same(states[:, :L], free, "padding changed the real states", atol=1e-4)
    assert not states[~mask].any(), "padding states are not zeros"


def _text_max_tokens_truncate(ctx):
    states, mask = ctx.component.encode_tokens(TEXTS, max_tokens=3)
    _tensor(states, (3, 3, ctx.component.token_dim), torch.float32, "encode_tokens(max_tokens=3) states")
    _tensor(mask, (3, 3), torch.bool, "encode_tokens(max_tokens=3) mask")
    kept = [min(int(n), 3) for n in _tokens(ctx)[1].sum(1)]
    assert mask.sum(1).tolist() == kept, f"{mask.sum(1).tolist()} real tokens kept of 3, expected {kept}"


def _text_tokens_empty(ctx):
    states, mask = ctx.component.encode_tokens([], max_tokens=5)
    _tensor(states, (0, 5, ctx.component.token_dim), torch.float32, "encode_tokens([], max_tokens=5) states")
    _tensor(mask, (0, 5), torch.bool, "encode_tokens([], max_tokens=5) mask")


def _encoder_round_trip(ctx):
    data = TEXTS if ctx.spec.kind == "text_encoder" else ctx.once("clips", clips)[::2]
    _round_trip(ctx, lambda enc: enc.embed(data))


# the rules text and audio encoders share
EMBED_RULES = [
    Rule("embed-norm", "embed rows are L2-normalised", _embed_norm),
    Rule("embed-deterministic", "embed is deterministic (bit-identical on the same input)", _embed_deterministic),
    Rule("embed-batch", "embed rows do not depend on the rest of the batch", _embed_batch_independent),
]
EMBED_EMPTY_BATCH = Rule("embed-empty-batch", "embed([]) returns [0, dim]", _embed_empty_batch)
ENCODER_SAVE_LOAD = Rule("save-load", "from_pretrained(save_pretrained) gives identical embeddings",
                         _encoder_round_trip)

TEXT_RULES = [
    BUILDS,
    Rule("attributes", "dim and token_dim are positive ints",
         lambda c: _positive_ints(c.component, "dim", "token_dim")),
    Rule("embed-shape", "embed returns [B, dim] float32", _embed_shape),
    *EMBED_RULES,
    Rule("embed-empty-text", 'embed([""]) is one L2-normalised row (the unconditional prompt)', _text_empty_string),
    EMBED_EMPTY_BATCH,
    Rule("embed-not-a-string", "embed raises TypeError, ValueError or ReaudioError for a text that is not a str",
         _text_not_a_string),
    Rule("tokens-shape", "encode_tokens returns states [B, L, token_dim] float32 and mask [B, L] bool, "
         "L the longest text", _text_tokens_shape),
    Rule("tokens-mask", "encode_tokens mask is True for the real tokens, first in each row", _text_tokens_mask),
    Rule("tokens-padding", "encode_tokens padding states are zeros", _text_tokens_padding),
    Rule("tokens-deterministic", "encode_tokens is deterministic", _text_tokens_deterministic),
    Rule("max-tokens-pad", "encode_tokens(max_tokens=50) pads every row to 50 without changing real states",
         _text_max_tokens_pad),
    Rule("max-tokens-truncate", "encode_tokens(max_tokens=3) truncates every row to 3", _text_max_tokens_truncate),
    Rule("tokens-empty-batch", "encode_tokens([], max_tokens=5) returns [0, 5, token_dim]", _text_tokens_empty),
    ENCODER_SAVE_LOAD,
]


# -- audio encoder -----------------------------------------------------------------------------------------
def _audio_tokens(ctx):
    return ctx.once("tokens", lambda: ctx.component.encode_tokens(ctx.once("clips", clips)))


def _audio_tokens_shape(ctx):
    tokens, mask = _audio_tokens(ctx)
    enc = ctx.component
    _tensor(tokens, (3, enc.num_tokens, enc.token_dim), torch.float32, "encode_tokens tokens")
    _tensor(mask, (3, enc.num_tokens), torch.bool, "encode_tokens mask")


def _audio_tokens_values(ctx):
    tokens, mask = _audio_tokens(ctx)
    assert bool(mask.any(1).all()), "a clip has no real token"
    assert not tokens[~mask].any(), "padding tokens are not zeros"
    _finite(tokens, "encode_tokens tokens")


def _audio_tokens_deterministic(ctx):
    tokens, _ = _audio_tokens(ctx)
    _same(ctx.component.encode_tokens(ctx.once("clips", clips)[2:])[0], tokens[2:],
          "encode_tokens is not bit-identical for the same clip in another batch")


def _audio_empty_waveform(ctx):
    _raises((ReaudioError, ValueError), lambda: ctx.component.embed([np.zeros(0, np.float32)]),
            "embed([zero-length waveform])")


AUDIO_RULES = [
    BUILDS,
    Rule("attributes", "dim, token_dim and num_tokens are positive ints",
         lambda c: _positive_ints(c.component, "dim", "token_dim", "num_tokens")),
    Rule("embed-shape", "embed returns [B, dim] float32 for clips of 10 ms to 12 s", _embed_shape),
    *EMBED_RULES,
    EMBED_EMPTY_BATCH,
    Rule("embed-empty-waveform", "embed raises ValueError or ReaudioError for a zero-length waveform",
         _audio_empty_waveform),
    Rule("tokens-shape", "encode_tokens returns tokens [B, num_tokens, token_dim] float32 and mask "
         "[B, num_tokens] bool", _audio_tokens_shape),
    Rule("tokens-values", "encode_tokens: finite, padding tokens zero, at least one real token per clip",
         _audio_tokens_values),
    Rule("tokens-deterministic", "encode_tokens is deterministic whatever the batch", _audio_tokens_deterministic),
    ENCODER_SAVE_LOAD,
]

