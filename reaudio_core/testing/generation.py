"""Rules of the generation contracts: denoiser, decoder (mel autoencoder) and vocoder."""
from __future__ import annotations

import torch

from ..interfaces import Conditioning
from ..registry import ReaudioError
from .base import BUILDS, Rule, _finite, _positive_ints, _raises, _round_trip, _same, _tensor


# -- denoiser ----------------------------------------------------------------------------------------------
def _den_inputs(ctx):
    def make():
        den = ctx.component
        g = torch.Generator().manual_seed(0)
        B, T, F = 2, 2 * den.downsample, den.downsample
        x = torch.randn(B, den.in_channels, T, F, generator=g)
        t = torch.tensor([5, 900], dtype=torch.int64)
        cond = Conditioning(prompt=torch.nn.functional.normalize(torch.randn(B, den.prompt_dim, generator=g), dim=-1))
        if den.text_dim is not None:
            cond.captions = torch.randn(B, 6, den.text_dim, generator=g)
            cond.caption_mask = torch.ones(B, 6, dtype=torch.bool)
            cond.caption_mask[0, 3:] = False
        if den.audio_dim is not None:
            cond.audio = torch.randn(B, 4, den.audio_dim, generator=g)
            cond.audio_mask = torch.ones(B, 4, dtype=torch.bool)
        return x, t, cond
    return ctx.once("inputs", make)


def _den_out(ctx):
    x, t, cond = _den_inputs(ctx)
    return ctx.once("out", lambda: ctx.component(x, t, cond))


def _den_attributes(ctx):
    den = ctx.component
    _positive_ints(den, "in_channels", "downsample", "prompt_dim")
    for attr in ("text_dim", "audio_dim"):
        v = getattr(den, attr, "missing")
        assert v is None or (isinstance(v, int) and v > 0), f"{attr} = {v!r}, expected None or a positive int"


def _den_shape(ctx):
    x, _, _ = _den_inputs(ctx)
    eps = _den_out(ctx)
    _tensor(eps, x.shape, torch.float32, "denoiser(latents [2, C, T, F])")
    _finite(eps, "the prediction")


def _den_deterministic(ctx):
    x, t, cond = _den_inputs(ctx)
    _same(ctx.component(x, t, cond), _den_out(ctx), "two calls on the same input differ")


def _den_batch(ctx):
    x, t, cond = _den_inputs(ctx)
    _same(ctx.component(x[:1], t[:1], cond.rows(torch.tensor([0]))), _den_out(ctx)[:1],
          "a row depends on the rest of the batch", atol=1e-5)


def _den_timesteps(ctx):
    x, t, cond = _den_inputs(ctx)
    assert not torch.allclose(ctx.component(x, t.flip(0), cond), _den_out(ctx)), "the timesteps are ignored"


def _den_prompt(ctx):
    x, t, cond = _den_inputs(ctx)
    other = Conditioning(**{**vars(cond), "prompt": -cond.prompt})
    assert not torch.allclose(ctx.component(x, t, other), _den_out(ctx)), "Conditioning.prompt is ignored"


def _den_guidance_layout(ctx):
    x, t, cond = _den_inputs(ctx)
    both = ctx.component(torch.cat([x, x]), torch.cat([t, t]), cond.cat(cond))
    _same(both[:len(x)], _den_out(ctx), "a doubled batch (Conditioning.cat) changes the rows", atol=1e-5)


def _den_route(ctx):
    x, t, cond = _den_inputs(ctx)
    for i in range(len(x)):
        route = ctx.component.route(int(t[i]))
        _same(route(x[i:i + 1], t[i:i + 1], cond.rows(torch.tensor([i]))), _den_out(ctx)[i:i + 1],
              f"route({int(t[i])}) computes other values than the denoiser at timestep {int(t[i])}", atol=1e-5)


def _den_bad_size(ctx):
    x, t, cond = _den_inputs(ctx)
    for axis, cut in (("T", x[:, :, :-1]), ("F", x[..., :-1])):
        _raises((ReaudioError,), lambda: ctx.component(cut, t, cond),
                f"latents with {axis} not a multiple of downsample")


def _den_round_trip(ctx):
    x, t, cond = _den_inputs(ctx)
    _round_trip(ctx, lambda den: den(x, t, cond))


DENOISER_RULES = [
    BUILDS,
    Rule("attributes", "in_channels, downsample, prompt_dim are positive ints; text_dim, audio_dim None or positive",
         _den_attributes),
    Rule("shape", "returns [B, C, T, F] float32, finite, for latents [B, C, T, F] and timesteps [B] int64",
         _den_shape),
    Rule("deterministic", "is deterministic", _den_deterministic),
    Rule("batch", "batch rows are independent", _den_batch),
    Rule("timesteps", "the output depends on the timesteps", _den_timesteps),
    Rule("prompt", "the output depends on Conditioning.prompt", _den_prompt),
    Rule("guidance-layout", "a batch doubled with Conditioning.cat gives the same rows", _den_guidance_layout),
    Rule("route", "route(t) alone gives the denoiser's output at timestep t (what the ONNX export traces)", _den_route),
    Rule("bad-size", "latents whose T or F is not a multiple of downsample raise ReaudioError", _den_bad_size),
    Rule("save-load", "from_pretrained(save_pretrained) gives identical outputs", _den_round_trip),
]


# -- decoder / vocoder -------------------------------------------------------------------------------------
def _mel(batch, frames, seed=0):
    return torch.randn(batch, frames, 64, generator=torch.Generator().manual_seed(seed)) - 4


def _dec_mel(ctx):
    return ctx.once("mel", lambda: _mel(2, 4 * ctx.component.compression))


def _dec_latents(ctx):
    return ctx.once("latents", lambda: ctx.component.encode(_dec_mel(ctx)))


def _dec_attributes(ctx):
    dec = ctx.component
    _positive_ints(dec, "latent_channels", "compression")
    assert isinstance(dec.scale_factor, (int, float)) and dec.scale_factor > 0, f"scale_factor = {dec.scale_factor!r}"


def _dec_encode(ctx):
    dec = ctx.component
    z = _dec_latents(ctx)
    _tensor(z, (2, dec.latent_channels, 4, 64 // dec.compression), torch.float32,
            f"encode(mel [2, {4 * dec.compression}, 64])")
    _same(dec.encode(_dec_mel(ctx)), z, "encode is not deterministic")


def _dec_decode(ctx):
    out = ctx.component.decode(_dec_latents(ctx))
    _tensor(out, _dec_mel(ctx).shape, torch.float32, "decode(encode(mel))")
    _finite(out, "decode")


def _dec_round_trip(ctx):
    z = _dec_latents(ctx)

    def scale(a, b):
        assert a.scale_factor == b.scale_factor, f"scale_factor {a.scale_factor} came back as {b.scale_factor}"
    _round_trip(ctx, lambda dec: dec.decode(z), extra=scale)


DECODER_RULES = [
    BUILDS,
    Rule("attributes", "latent_channels and compression are positive ints, scale_factor > 0", _dec_attributes),
    Rule("encode", "encode: mel [B, T, 64] -> latents [B, C, T/compression, 64/compression] float32, deterministic",
         _dec_encode),
    Rule("decode", "decode: latents -> mel [B, T, 64] float32, finite", _dec_decode),
    Rule("save-load", "from_pretrained(save_pretrained) keeps scale_factor and decodes identically", _dec_round_trip),
]


def _voc_out(ctx):
    return ctx.once("wav", lambda: ctx.component(_mel(2, 6)))


def _voc_attributes(ctx):
    voc = ctx.component
    assert voc.sample_rate == 16000 and voc.hop_length == 160, f"{voc.sample_rate} Hz, hop {voc.hop_length}"


def _voc_shape(ctx):
    wav = _voc_out(ctx)
    _tensor(wav, (2, 6 * ctx.component.hop_length), torch.float32, "vocoder(mel [2, 6, 64])")
    _finite(wav, "the waveform")


VOCODER_RULES = [
    BUILDS,
    Rule("attributes", "sample_rate is 16000 and hop_length 160", _voc_attributes),
    Rule("shape", "mel [B, T, 64] -> waveform [B, T * hop_length] float32, finite", _voc_shape),
    Rule("deterministic", "is deterministic",
         lambda c: _same(c.component(_mel(2, 6)), _voc_out(c), "two calls on the same mel differ")),
    Rule("batch", "batch rows are independent",
         lambda c: _same(c.component(_mel(2, 6)[:1]), _voc_out(c)[:1], "a row depends on the batch", atol=1e-5)),
    Rule("save-load", "from_pretrained(save_pretrained) gives identical waveforms",
         lambda c: _round_trip(c, lambda voc: voc(_mel(2, 6)))),
]
