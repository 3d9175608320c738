"""FAISS retriever: exact flat, IVF or HNSW index, inner product on L2-normalised vectors.

``index``:

* ``flat`` - exhaustive ``IndexFlatIP``; exact and deterministic. A batch of fewer queries than
  ``threads`` is scanned with the database split across threads (faiss's sequential SIMD scan
  on each part, run in parallel, parts merged): faiss's own single-query path either runs on
  one core or, with several OpenMP threads, switches to a BLAS path that is slower still, and
  one core cannot draw the machine's memory bandwidth.
* ``ivf`` - ``IndexIVFFlat`` with ``nlist`` lists (spherical k-means), searched over ``nprobe``
  lists. The index is trained lazily: added vectors are buffered until the first search or save
  (or until ``256 * nlist`` are buffered, faiss's sampling cap), then k-means runs on all of them
  and later adds go straight into the trained lists. If fewer than ``39 * nlist`` vectors are
  there to train on (faiss's minimum of 39 per centroid), ``nlist`` is reduced to
  ``n // 39`` (at least 1) with a warning rather than failing; the value used is saved.
* ``hnsw`` - ``IndexHNSWFlat`` with ``hnsw_m`` links per node, built with ``ef_construction``,
  searched with ``max(ef_search, k)``.

``nprobe`` and ``ef_search`` are read at every search, so they can be changed on a built or
loaded index (``load(dir, ef_search=256)``). ``threads=0`` keeps faiss's OpenMP setting.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from reaudio_core import Retriever, hookimpl
from reaudio_core.optional import lazy

from ._common import (ParamError, as_matrix, atomic_write, check_params, load_params, pad_results, thread_pool,
                      write_meta)

faiss = lazy("faiss", None, "the faiss retriever", "faiss-cpu")  # imported on first use, not when listed

INDEXES = ("flat", "ivf", "hnsw")
MIN_POINTS_PER_LIST = 39  # faiss's k-means warns below this many training points per centroid
MAX_POINTS_PER_LIST = 256  # faiss samples at most this many per centroid for training


@contextmanager
def omp_threads(n: int):
    """Run faiss with ``n`` OpenMP threads (``n <= 0``: leave the setting alone)."""
    if n <= 0:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def order_by_score_then_id(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((ids, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


class FaissRetriever(Retriever):
    BUILD_KEYS = ("dim", "index", "nlist", "hnsw_m", "ef_construction")
    SPLIT_MIN_ITEMS = 32_768  #: flat: below this many vectors a single-thread scan is fast enough

    def __init__(self, *, dim, index, nlist, nprobe, hnsw_m, ef_construction, ef_search, threads):
        if index not in INDEXES:
            raise ParamError(f"faiss retriever: index must be one of {', '.join(INDEXES)}, got {index!r}")
        check_params("faiss retriever", dim=(dim, 1), nlist=(nlist, 1), nprobe=(nprobe, 1), hnsw_m=(hnsw_m, 2),
                     ef_construction=(ef_construction, 1), ef_search=(ef_search, 1), threads=(threads, 0))
        self.index_type = index
        self.exact = index == "flat"
        self.nlist, self.nprobe = int(nlist), int(nprobe)
        self.hnsw_m, self.ef_construction, self.ef_search = int(hnsw_m), int(ef_construction), int(ef_search)
        self.threads = int(threads)
        self._dim = int(dim) if dim else None
        self._index: faiss.Index | None = None
        self._pending: list[np.ndarray] = []  # ivf: vectors waiting for training
        self.nlist_trained: int | None = None
        if self._dim and index != "ivf":
            self._index = self._new_index(self._dim)

    # -- building ----------------------------------------------------------------------
    def _new_index(self, dim: int) -> faiss.Index:
        if self.index_type == "flat":
            return faiss.IndexFlatIP(dim)
        index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        return index

    def _train_ivf(self, x: np.ndarray) -> None:
        nlist = min(self.nlist, max(1, len(x) // MIN_POINTS_PER_LIST))
        if nlist < self.nlist:
            warnings.warn(f"faiss ivf: {len(x)} vectors are too few to train nlist={self.nlist} lists "
                          f"(faiss needs {MIN_POINTS_PER_LIST} per list); using nlist={nlist}", stacklevel=3)
        index = faiss.index_factory(self.dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.spherical = True  # centroids on the unit sphere, as the data
        ivf.cp.max_points_per_centroid = MAX_POINTS_PER_LIST
        with omp_threads(self.threads):
            index.train(x)
        self._index, self.nlist_trained = index, nlist

    def _flush(self) -> None:
        """ivf: train on the buffered vectors (first time) and move them into the index."""
        if not self._pending:
            return
        x = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending = []
        if self._index is None:
            self._train_ivf(x)
        with omp_threads(self.threads):
            self._index.add(x)

    def add(self, vectors) -> None:
        x = as_matrix(vectors, self._dim)
        if self._dim is None:
            self._dim = x.shape[1]
        if not len(x):
            return
        if self.index_type == "ivf" and self._index is None:
            self._pending.append(x.copy())
            if sum(len(p) for p in self._pending) >= MAX_POINTS_PER_LIST * self.nlist:
                self._flush()
            return
        if self._index is None:
            self._index = self._new_index(self._dim)
        with omp_threads(self.threads):
            self._index.add(x)

    # -- queries -----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim or 0

    def __len__(self) -> int:
        return (self._index.ntotal if self._index is not None else 0) + sum(len(p) for p in self._pending)

    def search(self, queries, k: int):
        check_params("search", k=(k, 1))
        q = as_matrix(queries, self._dim, "queries")
        self._flush()
        n = len(self)
        kk = min(k, n)
        if kk == 0 or len(q) == 0:
            return pad_results(np.zeros((len(q), 0)), np.zeros((len(q), 0), np.int64), k)
        threads = self.threads or faiss.omp_get_max_threads()
        if self.index_type == "flat" and len(q) < threads and n >= self.SPLIT_MIN_ITEMS:
            scores, ids = self._split_flat_search(q, kk, threads)
        else:
            if self.index_type == "ivf":
                faiss.extract_index_ivf(self._index).nprobe = min(self.nprobe, self.nlist_trained)
            elif self.index_type == "hnsw":
                self._index.hnsw.efSearch = max(self.ef_search, kk)
            with omp_threads(self.threads):
                scores, ids = self._index.search(q, kk)
        scores, ids = pad_results(scores, ids, k)
        return order_by_score_then_id(scores, ids)

    def _split_flat_search(self, q: np.ndarray, k: int, threads: int):
        n, d = self._index.ntotal, self.dim
        xb = faiss.rev_swig_ptr(self._index.get_xb(), n * d).reshape(n, d)  # a view, no copy
        bounds = np.linspace(0, n, threads + 1).astype(np.int64)

        def part(i):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            faiss.omp_set_num_threads(1)  # this worker thread only: faiss's sequential SIMD scan
            scores, ids = faiss.knn(q, xb[lo:hi], min(k, hi - lo), metric=faiss.METRIC_INNER_PRODUCT)
            return scores, ids + lo

        parts = list(thread_pool(threads).map(part, range(threads)))
        scores, ids = order_by_score_then_id(np.concatenate([p[0] for p in parts], 1),
                                             np.concatenate([p[1] for p in parts], 1))
        return scores[:, :k], ids[:, :k]

    # -- persistence -------------------------------------------------------------------
    def _params(self) -> dict:
        return {"dim": self._dim, "index": self.index_type, "nlist": self.nlist, "nprobe": self.nprobe,
                "hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction, "ef_search": self.ef_search,
                "threads": self.threads}

    def save(self, directory) -> None:
        directory = Path(directory)
        self._flush()
        if self._index is not None:
            atomic_write(directory / "index.faiss", lambda tmp: faiss.write_index(self._index, tmp))
        write_meta(directory, name="faiss", dim=self._dim, size=len(self), nlist_trained=self.nlist_trained,
                   params=self._params())

    @classmethod
    def load(cls, directory, **params):
        meta, params = load_params(directory, "faiss", params, cls.BUILD_KEYS)
        obj = cls(**params)
        path = Path(directory) / "index.faiss"
        if meta["size"] or path.exists():
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: the saved faiss index is incomplete")
            index = faiss.read_index(str(path))
            if index.d != meta["dim"] or index.ntotal != meta["size"]:
                raise ValueError(f"{path} holds {index.ntotal} vectors of dimension {index.d}, "
                                 f"retriever.json says {meta['size']} of dimension {meta['dim']}")
            obj._index = index
            obj.nlist_trained = meta.get("nlist_trained")
        return obj

    def nbytes(self) -> int:
        self._flush()
        index = self._index
        if index is None:
            return 0
        d = index.d
        if self.index_type == "flat":
            return index.ntotal * d * 4
        if self.index_type == "ivf":
            ivf = faiss.extract_index_ivf(index)
            return ivf.invlists.compute_ntotal() * (ivf.code_size + 8) + ivf.nlist * d * 4
        hnsw = index.hnsw
        return (index.ntotal * d * 4 + hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8
                + hnsw.levels.size() * 4)


@hookimpl
def register_components(register):
    register("retriever", "faiss", FaissRetriever, tiny={})
