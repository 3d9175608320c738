"""Rules of the retriever contract, and the vectors they use (``unit_vectors``, ``exact_topk``)."""
from __future__ import annotations

import warnings

import numpy as np

from .base import BUILDS, NotApplicable, Rule, _raises

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
