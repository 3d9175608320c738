"""Contract tests for reaudio components: the rules of :mod:`reaudio_core.interfaces`, runnable on any
registered component, built-in or a third party's, at the tiny size its plugin declares
(``register(kind, name, cls, tiny={...})``, see :mod:`reaudio_core.hookspecs`).

Three ways to run them:

* ``reaudio check-plugin DISTRIBUTION``: every component an installed distribution registers, one
  ``PASS`` / ``FAIL`` line per rule, exit status 1 when a rule fails.
* a plugin's own pytest suite, in one file (``tests/test_contract.py``)::

      from reaudio_core.testing import contract_tests

      test_contract = contract_tests("my-distribution")   # one test per component and rule

* Python: :func:`check_component` ``(kind, name) -> [Result]``; :data:`RULES` lists the rules by kind.

A component is built from its class (registry defaults overlaid with its tiny parameters), not through
reaudio's run-time wrappers, so each rule reports on the component's own output. Rules that change a
component's state (retrievers) build a fresh instance; the others share one.
"""
from __future__ import annotations

import copy
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .interfaces import BASES, KINDS, Conditioning
from .pretrained import Pretrained
from .registry import ReaudioError, Registry, get_registry

TEXTS = ["a dog barks twice", "heavy rain falls on a tin roof while thunder rumbles in the distance", "bells"]


class NotApplicable(Exception):
    """Raised by a rule that does not apply to a component (a ``save_pretrained`` rule without one)."""


@dataclass(frozen=True)
class Rule:
    id: str  #: short slug (pytest ids)
    text: str  #: the rule as printed
    check: Callable[["Context"], None]  #: raises AssertionError (or any error) when the rule is broken


@dataclass
class Result:
    kind: str
    name: str
    rule: str
    status: str  #: "pass", "fail" or "n/a"
    detail: str = ""

    def line(self) -> str:
        tag = {"pass": "PASS", "fail": "FAIL", "n/a": "N/A "}[self.status]
        return f"{tag} {self.kind} {self.name}: {self.rule}" + (f" -- {self.detail}" if self.detail else "")


class Context:
    """One component under test: its spec, its tiny parameters, a shared instance and memoised outputs."""

    def __init__(self, spec, params: dict | None, registry: Registry):
        self.spec, self.params, self.registry = spec, params, registry
        self.tmp: Path | None = None  #: an empty directory for the current rule
        self._instance = None
        self._error: str | None = None  #: why building failed (not retried for every rule)
        self._memo: dict = {}

    def new(self, **extra):
        """A fresh instance at the tiny size (``extra`` parameters overlaid)."""
        if self.params is None:
            raise AssertionError(f"{self.spec.kind} '{self.spec.name}' declares no tiny parameters: pass "
                                 "tiny={...} to register() ({} when its defaults are small and offline)")
        params = {**copy.deepcopy(self.params), **extra}
        return self.spec.cls(**self.registry.resolve_params(self.spec.kind, self.spec.name, params))

    @property
    def component(self):
        if self._error is not None:
            raise AssertionError(f"it could not be built: {self._error}")
        if self._instance is None:
            try:
                self._instance = self.new()
            except Exception as exc:
                self._error = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
                raise
        return self._instance

    def once(self, key: str, fn: Callable):
        """``fn()`` computed on first use, then remembered (outputs several rules inspect)."""
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]


# -- assertions --------------------------------------------------------------------------------------------
def _positive_ints(obj, *names):
    for n in names:
        v = getattr(obj, n, None)
        assert isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{n} = {v!r}, expected a positive int"


def _tensor(x, shape, dtype, what):
    assert isinstance(x, torch.Tensor), f"{what} returned {type(x).__name__}, expected a torch.Tensor"
    assert tuple(x.shape) == tuple(shape), f"{what} has shape {tuple(x.shape)}, expected {tuple(shape)}"
    assert x.dtype == dtype, f"{what} has dtype {x.dtype}, expected {dtype}"


def _unit_rows(e, what):
    norms = e.norm(dim=-1)
    bad = (norms - 1).abs() > 1e-4
    assert not bad.any(), f"{what}: row norms {[round(float(n), 4) for n in norms[bad][:4]]}, expected 1"


def _finite(x, what):
    assert bool(torch.isfinite(torch.as_tensor(x)).all()), f"{what} has NaN or inf values"


def _same(a, b, what, atol=0.0):
    if atol:
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        assert a.shape == b.shape and diff <= atol, f"{what} (max difference {diff:.3g} > {atol})"
    else:
        assert torch.equal(a, b), what


def _raises(types, fn, what):
    names = " or ".join(t.__name__ for t in types)
    try:
        fn()
    except types:
        return
    except Exception as exc:
        raise AssertionError(f"{what} raised {type(exc).__name__} ({exc}), expected {names}") from exc
    raise AssertionError(f"{what} did not raise {names}")


def _round_trip(ctx, outputs, extra=None):
    """``save_pretrained`` then ``from_pretrained`` give bit-identical ``outputs(component)``."""
    comp = ctx.component
    if not isinstance(comp, Pretrained):
        if hasattr(comp, "save_pretrained"):
            raise AssertionError("has save_pretrained but does not subclass reaudio_core.Pretrained: a pipeline "
                                 "neither saves nor loads its weights")
        raise NotApplicable("not Pretrained (no weights of its own)")
    comp.save_pretrained(ctx.tmp / "saved")
    again = type(comp).from_pretrained(ctx.tmp / "saved")
    if extra:
        extra(comp, again)
    _same(outputs(again), outputs(comp), "from_pretrained(save_pretrained) changes the output")


def _builds(ctx):
    comp = ctx.component
    base = BASES[ctx.spec.kind]
    assert isinstance(comp, base), f"{type(comp).__name__} is not a {base.__name__}"


BUILDS = Rule("builds", "builds from the tiny parameters its plugin declares", _builds)


# -- text encoder ------------------------------------------------------------------------------------------
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


# -- retriever ---------------------------------------------------------------------------------------------
DIM, N_FIRST, N_SECOND = 32, 700, 500  # two batches; a graph index must grow past its first capacity


def unit_vectors(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    """``[n, d]`` float32 random unit vectors."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _vectors(ctx):
    def make():
        rng = np.random.default_rng(0)
        return unit_vectors(rng, N_FIRST + N_SECOND), unit_vectors(rng, 25)
    return ctx.once("vectors", make)


def _filled(ctx):
    """The shared index holding the 1200 vectors, added in two batches (rules only search it)."""
    def make():
        x, _ = _vectors(ctx)
        r = ctx.new()
        r.add(x[:N_FIRST])
        r.add(x[N_FIRST:])
        return r
    return ctx.once("filled", make)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact inner-product top-``k`` (scores, ids), ties broken by the lower id."""
    s = q @ x.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def _retriever_attributes(ctx):
    r = _filled(ctx)
    assert len(r) == N_FIRST + N_SECOND, f"len = {len(r)} after adding {N_FIRST} + {N_SECOND} vectors"
    assert r.dim == DIM, f"dim = {r.dim} after adding {DIM}-d vectors"
    assert r.metric == "ip", f"metric = {r.metric!r}, expected 'ip'"


def _retriever_search_shape(ctx):
    x, q = _vectors(ctx)
    scores, ids = _filled(ctx).search(q, 10)
    assert isinstance(scores, np.ndarray) and isinstance(ids, np.ndarray), "search must return numpy arrays"
    assert scores.shape == ids.shape == (len(q), 10), f"shapes {scores.shape}, {ids.shape}, expected ({len(q)}, 10)"
    assert scores.dtype == np.float32 and ids.dtype == np.int64, f"dtypes {scores.dtype}, {ids.dtype}"
    expected = np.einsum("qd,qkd->qk", q, x[ids])
    assert np.allclose(scores, expected, atol=1e-5), "scores are not the inner products of the returned ids"
    assert np.all(np.diff(scores, axis=1) <= 1e-6), "results are not best first"


def _retriever_recall(ctx):
    x, q = _vectors(ctx)
    r = _filled(ctx)
    scores, ids = r.search(q, 10)
    ref_scores, ref_ids = exact_topk(x, q, 10)
    if r.exact:
        assert np.array_equal(ids, ref_ids), "an exact retriever returned other ids than the exact top-10"
    else:
        recall = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, ref_ids)])
        assert recall >= 0.99, f"recall@10 {recall:.3f} < 0.99 on {len(x)} vectors"


def _retriever_insertion_ids(ctx):
    x, _ = _vectors(ctx)
    probe = [0, 3, N_FIRST - 1, N_FIRST, len(x) - 1]
    scores, ids = _filled(ctx).search(x[probe], 1)
    assert ids[:, 0].tolist() == probe, f"the vectors added as {probe} were found as {ids[:, 0].tolist()}"
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5), "a stored vector does not score 1 against itself"


def _retriever_padding(ctx):
    x, q = _vectors(ctx)
    r = ctx.new()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an index trained on 5 vectors may warn
        scores, ids = r.search(q[:2], 3)
        assert ids.shape == (2, 3) and (ids == -1).all() and np.isneginf(scores).all(), "empty index: not padded"
        assert scores.dtype == np.float32 and ids.dtype == np.int64, f"dtypes {scores.dtype}, {ids.dtype}"
        r.add(x[:5])
        scores, ids = r.search(q[:3], 8)
    assert ids.shape == (3, 8), f"shape {ids.shape}, expected (3, 8)"
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all(), "the tail is not score -inf, id -1"
    assert all(sorted(row) == [0, 1, 2, 3, 4] for row in ids[:, :5].tolist()), "the 5 items are not all returned"
    assert np.isfinite(scores[:, :5]).all(), "real results have non-finite scores"


def _retriever_wrong_dim(ctx):
    r = _filled(ctx)
    _raises((ValueError,), lambda: r.add(np.zeros((3, DIM + 1), np.float32)), f"add([3, {DIM + 1}])")
    _raises((ValueError,), lambda: r.search(np.zeros((1, DIM - 1), np.float32), 3), f"search([1, {DIM - 1}])")
    fixed = ctx.new(dim=DIM)
    _raises((ValueError,), lambda: fixed.add(np.zeros((2, 2 * DIM), np.float32)),
            f"dim={DIM}, then add([2, {2 * DIM}])")


def _retriever_k0(ctx):
    _raises((ValueError,), lambda: _filled(ctx).search(_vectors(ctx)[1], 0), "search(queries, k=0)")


def _retriever_save_load(ctx):
    x, q = _vectors(ctx)
    r = _filled(ctx)
    r.save(ctx.tmp / "index")
    loaded = type(r).load(ctx.tmp / "index")
    assert len(loaded) == len(r) and loaded.dim == r.dim, f"loaded: len {len(loaded)}, dim {loaded.dim}"
    for batch in (q, q[:1]):
        s0, i0 = r.search(batch, 10)
        s1, i1 = loaded.search(batch, 10)
        assert np.array_equal(i0, i1) and np.allclose(s0, s1, atol=1e-6), "the loaded index answers differently"
    extra = unit_vectors(np.random.default_rng(1), 3)
    loaded.add(extra)
    got = loaded.search(extra, 1)[1][:, 0].tolist()
    assert got == [len(x), len(x) + 1, len(x) + 2], f"vectors added after load got ids {got}"
    _raises((ValueError,), lambda: type(r).load(ctx.tmp / "index", dim=DIM + 1), f"load(dir, dim={DIM + 1})")
    ctx.new().save(ctx.tmp / "empty")
    assert len(type(r).load(ctx.tmp / "empty")) == 0, "an empty index does not load empty"


def _retriever_ties(ctx):
    r = ctx.new()
    if not r.exact:
        raise NotApplicable("approximate retriever (exact = False)")
    rng = np.random.default_rng(2)
    v, others = unit_vectors(rng, 1), unit_vectors(rng, 40)
    r.add(np.concatenate([others[:5], np.repeat(v, 8, 0), others[5:]]))  # ids 5..12 tie for the best score
    assert r.search(v, 3)[1][0].tolist() == [5, 6, 7], "ties are not broken by the lower id"
    assert (r.search(np.repeat(v, 4, 0), 3)[1] == [5, 6, 7]).all(), "a batch of queries breaks ties differently"
    assert r.search(v, 10)[1][0][:8].tolist() == list(range(5, 13)), "ties are not broken by the lower id"
    q = unit_vectors(rng, 3)
    (s0, i0), (s1, i1) = r.search(q, 12), r.search(q, 12)
    assert np.array_equal(i0, i1) and np.array_equal(s0, s1), "exact search is not deterministic"


RETRIEVER_RULES = [
    BUILDS,
    Rule("attributes", "len counts the vectors added, dim is fixed by the first add, metric is 'ip'",
         _retriever_attributes),
    Rule("search-shape", "search returns scores [Q, k] float32 and ids [Q, k] int64, best first, "
         "scores the inner products", _retriever_search_shape),
    Rule("search-recall", "search finds the true top-k (exact: the same ids; approximate: recall >= 0.99)",
         _retriever_recall),
    Rule("insertion-ids", "ids are the insertion order, across add calls", _retriever_insertion_ids),
    Rule("padding", "k beyond the index size pads with score -inf and id -1", _retriever_padding),
    Rule("wrong-dim", "a vector of another dimension raises ValueError in add and search", _retriever_wrong_dim),
    Rule("k-zero", "search with k = 0 raises ValueError", _retriever_k0),
    Rule("save-load", "load(save) answers identically, continues the ids, refuses another dim", _retriever_save_load),
    Rule("exact-ties", "exact search is deterministic and breaks ties by the lower id", _retriever_ties),
]


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


# -- feature model -----------------------------------------------------------------------------------------
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


RULES: dict[str, list[Rule]] = {
    "retriever": RETRIEVER_RULES,
    "text_encoder": TEXT_RULES,
    "audio_encoder": AUDIO_RULES,
    "denoiser": DENOISER_RULES,
    "decoder": DECODER_RULES,
    "vocoder": VOCODER_RULES,
    "feature_model": FEATURE_RULES,
}
"""Every rule, by component kind; the first (``builds``) builds the tiny instance the others use."""


# -- running -----------------------------------------------------------------------------------------------
def _apply(rule: Rule, ctx: Context, tmp: Path) -> None:
    ctx.tmp = Path(tmp)
    with torch.no_grad():
        rule.check(ctx)


def _tiny(spec, params):
    return spec.tiny if params is None else {**(spec.tiny or {}), **params}


def check_component(kind: str, name: str, *, params: dict | None = None,
                    registry: Registry | None = None) -> list[Result]:
    """Every rule of ``kind`` on the registered component ``name``, built from its declared tiny parameters
    (``params`` overlaid on them). Stops after ``builds`` when the component cannot be built."""
    registry = registry or get_registry()
    spec = registry.spec(kind, name)
    ctx = Context(spec, _tiny(spec, params), registry)
    results = []
    for rule in RULES[kind]:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _apply(rule, ctx, Path(tmp))
                results.append(Result(kind, name, rule.text, "pass"))
            except NotApplicable as exc:
                results.append(Result(kind, name, rule.text, "n/a", str(exc)))
            except Exception as exc:  # a broken rule is reported, the next one runs
                detail = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
                results.append(Result(kind, name, rule.text, "fail", " ".join(detail.split())[:400]))
        if rule is BUILDS and results[-1].status == "fail":
            break
    return results


def _canonical(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _specs(registry: Registry, distribution: str | None = None):
    """Loaded components (of ``distribution``), in kind order then by name."""
    specs = [s for s in registry.components.values() if s.cls is not None
             and (distribution is None or _canonical(s.distribution) == _canonical(distribution))]
    return sorted(specs, key=lambda s: (KINDS.index(s.kind), s.name))


def check_distribution(distribution: str, *, registry: Registry | None = None,
                       report: Callable[[Result], None] | None = None) -> list[Result]:
    """:func:`check_component` on every component ``distribution`` registers; ``report`` sees each result as it
    comes. A distribution that registers nothing (or whose plugin failed to load) is a :class:`ReaudioError`."""
    registry = registry or get_registry()
    failed = [p for p in registry.plugins if p.error and _canonical(p.distribution) == _canonical(distribution)]
    if failed:
        raise ReaudioError("; ".join(f"plugin '{p.name}' of {p.distribution} failed to load: {p.error}"
                                     for p in failed))
    specs = _specs(registry, distribution)
    if not specs:
        known = sorted({s.distribution for s in _specs(registry)})
        raise ReaudioError(f"distribution '{distribution}' registers no reaudio components (is it installed, with a "
                           f"'reaudio.plugins' entry point?). Distributions that do: {', '.join(known)}")
    results = []
    for spec in specs:
        for result in check_component(spec.kind, spec.name, registry=registry):
            results.append(result)
            if report:
                report(result)
    return results


# -- pytest ------------------------------------------------------------------------------------------------
_current: list = [None, None]  # (key, Context): the component under test, built once for its rules


def _context(kind: str, name: str, params: dict | None, registry: Registry) -> Context:
    key = (id(registry), kind, name, repr(params))
    if _current[0] != key:  # tests run component by component: keep one instance, not every one
        spec = registry.spec(kind, name)
        _current[:] = [key, Context(spec, _tiny(spec, params), registry)]
    return _current[1]


def check_rule(kind: str, name: str, rule: Rule, tmp: Path, *, params: dict | None = None,
               registry: Registry | None = None) -> None:
    """Apply one rule inside a pytest test: a broken rule raises (with its traceback), a rule that does not
    apply skips the test. ``params`` overlay the declared tiny parameters (variants of one component)."""
    import pytest
    ctx = _context(kind, name, params, registry or get_registry())
    try:
        _apply(rule, ctx, tmp)
    except NotApplicable as exc:
        pytest.skip(str(exc))


def contract_tests(distribution: str | None = None, *, kinds=None, skip_others: bool = False,
                   registry: Registry | None = None):
    """A pytest test function: every rule on every component ``distribution`` registers (every registered
    component when ``None``), one test per component and rule. Assign it to a ``test_`` name::

        test_contract = contract_tests("my-distribution")

    ``kinds`` restricts the kinds; ``skip_others`` lists the components of other distributions as skipped
    tests (reaudio's own suite: an installed plugin is named there but never fails it).
    """
    import pytest
    registry = registry or get_registry()
    cases = []
    for spec in _specs(registry):
        if kinds is not None and spec.kind not in kinds:
            continue
        ours = distribution is None or _canonical(spec.distribution) == _canonical(distribution)
        if not ours and not skip_others:
            continue
        marks = () if ours else pytest.mark.skip(
            reason=f"{spec.kind} '{spec.name}' comes from {spec.distribution}: `reaudio check-plugin "
                   f"{spec.distribution}` tests it")
        cases += [pytest.param(spec.kind, spec.name, rule, marks=marks, id=f"{spec.kind}-{spec.name}-{rule.id}")
                  for rule in RULES[spec.kind]]
    if not cases:
        def test_contract():
            pytest.fail(f"no registered components{f' of {distribution}' if distribution else ''}"
                        f"{f' of kinds {list(kinds)}' if kinds else ''}: is the distribution installed?")
        return test_contract

    @pytest.mark.parametrize("kind,name,rule", cases)
    def test_contract(kind, name, rule, tmp_path):
        check_rule(kind, name, rule, tmp_path, registry=registry)
    return test_contract
