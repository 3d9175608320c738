"""Retrievers: the contract (reaudio_core/testing/ rules) over every registered retriever and the built-in
index variants its defaults do not reach, then component-specific behaviour."""
import warnings

import numpy as np
import pytest

from component_factories import BUILTIN, builtin_names
from reaudio_core.registry import get_registry
from reaudio_core.testing import RULES, check_rule, contract_tests, exact_topk, unit_vectors


test_retriever_contract = contract_tests(BUILTIN, kinds=["retriever"], skip_others=True)

# the built-in variants the defaults do not reach, through the same rules
VARIANTS = {
    "faiss-ivf": ("faiss", {"index": "ivf", "nlist": 16, "nprobe": 16}),
    "faiss-hnsw": ("faiss", {"index": "hnsw", "ef_search": 200, "threads": 1}),  # 1 thread: faster on tiny data
    "hnswlib-ef200": ("hnswlib", {"ef_search": 200}),
}


@pytest.mark.parametrize("rule", RULES["retriever"], ids=lambda r: r.id)
@pytest.mark.parametrize("variant", VARIANTS)
def test_retriever_variant_contract(variant, rule, tmp_path):
    name, params = VARIANTS[variant]
    check_rule("retriever", name, rule, tmp_path, params=params)


@pytest.mark.parametrize("name", builtin_names("retriever"))
def test_exact_search_split_across_threads_breaks_ties_by_lower_id(name, monkeypatch, tmp_path):
    """The multi-threaded single-query path that large indexes take, forced on small data."""
    monkeypatch.setattr(get_registry().spec("retriever", name).cls, "SPLIT_MIN_ITEMS", 0, raising=False)
    ties = next(r for r in RULES["retriever"] if r.id == "exact-ties")
    check_rule("retriever", name, ties, tmp_path, params={"threads": 2})


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return unit_vectors(rng, 1200), unit_vectors(rng, 25)


def make(name, params, **extra):
    return get_registry().create("retriever", name, **{**params, **extra})


def recall(ids, ref):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, ref)])


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
