"""hnswlib retriever: an HNSW graph in inner-product space (``space='ip'``, score = dot product).

``m`` links per node, built with ``ef_construction``, searched with ``max(ef_search, k)``
(``ef_search`` is read at every search, so it can be changed on a built or loaded index).
The graph grows as vectors are added (capacity is doubled when full), so incremental ``add``
works without a rebuild. Labels are the insertion order. ``threads=0`` lets hnswlib use every
core for batched adds and searches; a single query always runs on one thread.
Building with more than one thread is not deterministic (neither is any approximate index here).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from reaudio_core import Retriever, hookimpl
from reaudio_core.optional import require

from ._common import as_matrix, atomic_write, check_params, load_params, pad_results, write_meta

INITIAL_CAPACITY = 1024


def _hnswlib():
    return require("hnswlib", None, "the hnswlib retriever")


class HnswlibRetriever(Retriever):
    BUILD_KEYS = ("dim", "m", "ef_construction")

    def __init__(self, *, dim, m, ef_construction, ef_search, threads):
        check_params("hnswlib retriever", dim=(dim, 1), m=(m, 2), ef_construction=(ef_construction, 1),
                     ef_search=(ef_search, 1), threads=(threads, 0))
        self.m, self.ef_construction, self.ef_search = int(m), int(ef_construction), int(ef_search)
        self.threads = int(threads)
        self._dim = int(dim) if dim else None
        self._index = None
        if self._dim:
            self._index = self._new_index(self._dim, INITIAL_CAPACITY)

    def _new_index(self, dim: int, capacity: int):
        index = _hnswlib().Index(space="ip", dim=dim)
        index.init_index(max_elements=capacity, M=self.m, ef_construction=self.ef_construction, random_seed=100)
        return index

    @property
    def _num_threads(self) -> int:
        return self.threads or -1  # hnswlib: -1 = all cores

    @property
    def dim(self) -> int:
        return self._dim or 0

    def __len__(self) -> int:
        return 0 if self._index is None else self._index.get_current_count()

    def add(self, vectors) -> None:
        x = as_matrix(vectors, self._dim)
        if self._dim is None:
            self._dim = x.shape[1]
        if not len(x):
            return
        if self._index is None:
            self._index = self._new_index(self._dim, max(len(x), INITIAL_CAPACITY))
        n = len(self)
        capacity = self._index.get_max_elements()
        if n + len(x) > capacity:
            self._index.resize_index(max(n + len(x), 2 * capacity))
        self._index.add_items(x, np.arange(n, n + len(x), dtype=np.int64), num_threads=self._num_threads)

    def search(self, queries, k: int):
        check_params("search", k=(k, 1))
        q = as_matrix(queries, self._dim, "queries")
        kk = min(k, len(self))
        if kk == 0 or len(q) == 0:
            return pad_results(np.zeros((len(q), 0)), np.zeros((len(q), 0), np.int64), k)
        self._index.set_ef(max(self.ef_search, kk))
        labels, distances = self._index.knn_query(q, k=kk, num_threads=self._num_threads)
        scores = (1.0 - distances).astype(np.float32)  # hnswlib 'ip' distance is 1 - dot
        ids = labels.astype(np.int64)
        order = np.lexsort((ids, -scores), axis=1)
        return pad_results(np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1), k)

    def _params(self) -> dict:
        return {"dim": self._dim, "m": self.m, "ef_construction": self.ef_construction,
                "ef_search": self.ef_search, "threads": self.threads}

    def save(self, directory) -> None:
        directory = Path(directory)
        if len(self):
            atomic_write(directory / "index.hnsw", lambda tmp: self._index.save_index(tmp))
        write_meta(directory, name="hnswlib", dim=self._dim, size=len(self), params=self._params())

    @classmethod
    def load(cls, directory, **params):
        meta, params = load_params(directory, "hnswlib", params, cls.BUILD_KEYS)
        obj = cls(**params)
        if meta["size"]:
            path = Path(directory) / "index.hnsw"
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: the saved hnswlib index is incomplete")
            index = _hnswlib().Index(space="ip", dim=meta["dim"])
            index.load_index(str(path), max_elements=meta["size"])
            if index.get_current_count() != meta["size"]:
                raise ValueError(f"{path} holds {index.get_current_count()} vectors, "
                                 f"retriever.json says {meta['size']}")
            obj._index = index
        return obj

    def nbytes(self) -> int:
        if self._index is None:
            return 0
        # the serialised size covers the stored items; level-0 slots are allocated for the capacity
        n, capacity = len(self), self._index.get_max_elements()
        per_slot = self.dim * 4 + 4 + 2 * self.m * 4 + 8  # vector, link count, 2*M links, label
        return self._index.index_file_size() + (capacity - n) * per_slot


@hookimpl
def register_components(register):
    register("retriever", "hnswlib", HnswlibRetriever, tiny={})
