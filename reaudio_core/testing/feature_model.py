"""Rules of the feature model contract (evaluation)."""
from __future__ import annotations

import numpy as np
import torch

from .base import BUILDS, NotApplicable, Rule, _finite, _positive_ints, _raises, _tensor


def _fm_wavs(ctx):
    sr = ctx.component.sample_rate
    rng = np.random.default_rng(0)
    return ctx.once("wavs", lambda: [rng.normal(0, 0.1, int(sr * s)).astype(np.float32) for s in (0.5, 2.1, 0.01)])


def _fm_frames(ctx):
    return ctx.once("frames", lambda: ctx.component.embed_frames(_fm_wavs(ctx)))


def _fm_empty_batch(ctx):
    frames = ctx.component.embed_frames([])
    assert frames == [], f"embed_frames([]) returned {frames!r}, expected []"


def _fm_attributes(ctx):
    m = ctx.component
    assert m.name == ctx.spec.name, f"name = {m.name!r}, expected the registered name {ctx.spec.name!r}"
    assert isinstance(m.fingerprint, str) and m.fingerprint, f"fingerprint = {m.fingerprint!r}"
    _positive_ints(m, "sample_rate")
    assert isinstance(m.num_classes, int) and m.num_classes >= 0, f"num_classes = {m.num_classes!r}"


def _fm_frames_shape(ctx):
    frames = _fm_frames(ctx)
    assert isinstance(frames, list) and len(frames) == 3, "expected a list of one array per clip"
    for i, f in enumerate(frames):
        assert isinstance(f, np.ndarray) and f.ndim == 2 and f.shape[0] >= 1, f"clip {i}: not an [n >= 1, d] array"
        assert f.dtype == np.float32 and np.isfinite(f).all(), f"clip {i}: {f.dtype}, or NaN / inf values"
    assert len({f.shape[1] for f in frames}) == 1, f"widths differ: {[f.shape for f in frames]}"


def _fm_deterministic(ctx):
    again = ctx.component.embed_frames(_fm_wavs(ctx))
    assert all(np.array_equal(a, b) for a, b in zip(_fm_frames(ctx), again)), "embed_frames is not deterministic"


def _fm_logits(ctx):
    m, wavs = ctx.component, _fm_wavs(ctx)
    if m.num_classes:
        logits = m.logits(wavs)
        _tensor(logits, (len(wavs), m.num_classes), torch.float32, "logits")
        _finite(logits, "logits")
    else:
        _raises((NotImplementedError,), lambda: m.logits(wavs), "logits with num_classes == 0")


def _fm_text(ctx):
    m = ctx.component
    if not hasattr(m, "embed_text"):
        raise NotApplicable("no embed_text (no text tower)")
    t = torch.as_tensor(m.embed_text(["a dog barks", "rain"]))
    assert tuple(t.shape) == (2, _fm_frames(ctx)[0].shape[1]), f"embed_text gave {tuple(t.shape)}, expected [2, d]"


FEATURE_RULES = [
    BUILDS,
    Rule("attributes", "name is the registered name, fingerprint a non-empty str, sample_rate > 0, num_classes >= 0",
         _fm_attributes),
    Rule("frames-shape", "embed_frames gives one float32 [n >= 1, d] array per clip (10 ms to 2.1 s), finite",
         _fm_frames_shape),
    Rule("frames-deterministic", "embed_frames is deterministic", _fm_deterministic),
    Rule("frames-empty-batch", "embed_frames([]) returns []", _fm_empty_batch),
    Rule("logits", "logits: [B, num_classes] float32, finite (NotImplementedError when num_classes == 0)", _fm_logits),
    Rule("embed-text", "embed_text, where provided, gives [B, d] in the frames' space", _fm_text),
]
