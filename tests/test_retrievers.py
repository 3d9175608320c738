"""Retriever contract tests, run over every registered retriever (and the built-in index variants)."""
import warnings

import numpy as np
import pytest

from reaudio_core.registry import get_registry

DIM = 32
N_FIRST, N_SECOND = 700, 500  # two batches; hnswlib's graph must grow past its initial capacity

# every registered retriever with its defaults, plus the built-in variants the defaults do not reach
CASES = [(name, {}) for name in get_registry().names("retriever")] + [
    ("faiss", {"index": "ivf", "nlist": 16, "nprobe": 16}),
    ("faiss", {"index": "hnsw", "ef_search": 200, "threads": 1}),  # 1 thread: faster on tiny data
    ("hnswlib", {"ef_search": 200}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in CASES]


def unit(rng, n, d=DIM):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return unit(rng, N_FIRST + N_SECOND), unit(rng, 25)


def make(name, params, **extra):
    return get_registry().create("retriever", name, **{**params, **extra})


def exact_topk(x, q, k):
    s = q @ x.T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def recall(ids, ref):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, ref)])


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


@pytest.fixture
def built(case, data):
    x, _ = data
    r = make(*case)
    r.add(x[:N_FIRST])
    r.add(x[N_FIRST:])
    return r


def test_two_batches_search_matches_exact(case, built, data):
    x, q = data
    assert len(built) == len(x) and built.dim == DIM and built.metric == "ip"
    scores, ids = built.search(q, 10)
    assert scores.shape == ids.shape == (len(q), 10)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    ref_scores, ref_ids = exact_topk(x, q, 10)
    assert recall(ids, ref_ids) >= 0.99
    # scores are the inner products of the returned ids, best first
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[ids]), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    if built.exact:
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_ids_are_insertion_order(built, data):
    x, _ = data
    probe = [0, 3, N_FIRST - 1, N_FIRST, len(x) - 1]
    scores, ids = built.search(x[probe], 1)
    assert ids[:, 0].tolist() == probe
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:faiss ivf:UserWarning")  # 5 vectors: ivf falls back to nlist=1
def test_k_larger_than_size_pads(case, data):
    x, q = data
    r = make(*case)
    scores, ids = r.search(q[:2], 3)  # empty index
    assert (ids == -1).all() and np.isneginf(scores).all() and scores.dtype == np.float32
    r.add(x[:5])
    scores, ids = r.search(q[:3], 8)
    assert ids.shape == (3, 8)
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
    assert all(sorted(row) == [0, 1, 2, 3, 4] for row in ids[:, :5].tolist())
    assert np.isfinite(scores[:, :5]).all()


def test_wrong_dimension_raises(case, built, data):
    with pytest.raises(ValueError, match="dimension"):
        built.add(np.zeros((3, DIM + 1), np.float32))
    with pytest.raises(ValueError, match="dimension"):
        built.search(np.zeros((1, DIM - 1), np.float32), 3)
    with pytest.raises(ValueError):
        built.search(data[1], 0)
    fixed = make(*case, dim=DIM)
    with pytest.raises(ValueError, match="dimension"):
        fixed.add(np.zeros((2, DIM * 2), np.float32))


def test_save_load_round_trip(case, built, data, tmp_path):
    x, q = data
    built.save(tmp_path / "idx")
    cls = get_registry().spec("retriever", case[0]).cls
    loaded = cls.load(tmp_path / "idx")
    assert len(loaded) == len(built) and loaded.dim == built.dim and loaded.metric == built.metric
    for batch in (q, q[:1]):
        s0, i0 = built.search(batch, 10)
        s1, i1 = loaded.search(batch, 10)
        np.testing.assert_array_equal(i1, i0)
        np.testing.assert_allclose(s1, s0, atol=1e-6)
    # a loaded index keeps growing with the next ids
    extra = unit(np.random.default_rng(1), 3)
    loaded.add(extra)
    assert loaded.search(extra, 1)[1][:, 0].tolist() == [len(x), len(x) + 1, len(x) + 2]
    with pytest.raises(ValueError, match="dim"):
        cls.load(tmp_path / "idx", dim=DIM + 1)
    # an empty index saves and loads too
    make(*case).save(tmp_path / "empty")
    assert len(cls.load(tmp_path / "empty")) == 0


@pytest.mark.parametrize("split", [False, True], ids=["one-scan", "split-across-threads"])
def test_exact_search_is_deterministic_and_breaks_ties_by_lower_id(case, split, monkeypatch):
    r = make(*case)
    if not r.exact:
        pytest.skip("approximate retriever")
    if split:  # force the multi-threaded single-query path that large indexes take
        monkeypatch.setattr(type(r), "SPLIT_MIN_ITEMS", 0, raising=False)
        if hasattr(r, "threads"):
            r.threads = 2
    rng = np.random.default_rng(2)
    v = unit(rng, 1)
    others = unit(rng, 40)
    # ids 5..12 are copies of v, so 8 vectors tie for the best score
    x = np.concatenate([others[:5], np.repeat(v, 8, 0), others[5:]])
    r.add(x)
    s1, i1 = r.search(v, 3)
    assert i1[0].tolist() == [5, 6, 7]
    s2, i2 = r.search(np.repeat(v, 4, 0), 3)  # batched: same answer
    assert (i2 == [5, 6, 7]).all()
    q = unit(rng, 3)
    a, b = r.search(q, 12), r.search(q, 12)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    ids = r.search(v, 10)[1][0]
    assert ids[:8].tolist() == list(range(5, 13))


def test_faiss_ivf_reduces_nlist_with_a_warning_when_data_is_scarce(data):
    x, q = data
    r = make("faiss", {"index": "ivf", "nlist": 1024, "nprobe": 1024})
    r.add(x[:200])  # buffered until first search: training sees both batches
    r.add(x[200:])
    with pytest.warns(UserWarning, match="nlist=1024.*using nlist=30"):
        _, ids = r.search(q, 5)
    assert r.nlist_trained == len(x) // 39
    np.testing.assert_array_equal(ids, exact_topk(x, q, 5)[1])


def test_bad_parameters_are_clear_errors():
    from reaudio_core.registry import ReaudioError
    with pytest.raises(ReaudioError, match="flat, ivf, hnsw"):
        make("faiss", {"index": "ivfpq"})
    with pytest.raises(ReaudioError, match="nprobe must be an integer >= 1"):
        make("faiss", {"nprobe": 0})
    with pytest.raises(ReaudioError, match="m must be an integer >= 2"):
        make("hnswlib", {"m": 1})


def test_loading_another_kind_of_index_is_an_error(data, tmp_path):
    r = make("torch", {})
    r.add(data[0][:10])
    r.save(tmp_path)
    with pytest.raises(ValueError, match="holds a 'torch' index, not 'faiss'"):
        get_registry().spec("retriever", "faiss").cls.load(tmp_path)
    with pytest.raises(ValueError, match="built with index='flat'"):
        r2 = make("faiss", {})
        r2.add(data[0][:10])
        r2.save(tmp_path / "f")
        get_registry().spec("retriever", "faiss").cls.load(tmp_path / "f", index="hnsw")


def test_search_time_knobs_change_on_load(data, tmp_path):
    x, q = data
    r = make("hnswlib", {"ef_search": 10})
    r.add(x)
    r.save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = get_registry().spec("retriever", "hnswlib").cls.load(tmp_path, ef_search=300)
    assert loaded.ef_search == 300
    assert recall(loaded.search(q, 10)[1], exact_topk(x, q, 10)[1]) >= 0.99
