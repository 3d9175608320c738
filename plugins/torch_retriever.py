"""Exact retrieval in torch (matrix product + top-k): the reference every other retriever is measured against.

Memory layout and threading are chosen for the case that dominates a retrieval service, one
query at a time against a matrix far larger than the CPU caches. That search is a
matrix-vector product, bound by memory bandwidth, so:

* the vectors are stored column-wise, ``[dim, capacity]``: ``q @ X`` is then a BLAS gemv that
  streams each row of ``X`` once (the row-major ``X @ q`` path of MKL reads about half as fast);
* a query batch of at most :attr:`TorchRetriever.SPLIT_MAX_QUERIES` is split across ``threads``
  column blocks, each scanned (product + top-k) by one single-threaded torch call on its own
  Python thread (torch releases the GIL), and the blocks' top-k are merged: one core cannot
  draw the machine's full memory bandwidth, and BLAS's own threading of a matrix-vector
  product does not scale (``benchmarks/retrievers/`` measures exact search against the
  measured bandwidth);
* larger batches are one multi-threaded matrix product per block of queries, the block sized
  so the score matrix stays under :attr:`TorchRetriever.BLOCK_BYTES`.

Top-k is exact and deterministic: ties at the k-th score are resolved to the lowest ids and
results are ordered by (score descending, id ascending).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reaudio_core import Retriever, hookimpl

from ._common import (as_matrix, atomic_write, check_params, load_params, pad_results, thread_pool,
                      write_meta)


def topk_lowest_id(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of each row of ``scores [B, n]`` (``k <= n``), best first; among equal
    scores the lower id wins, both inside the result and at the cut-off."""
    top, idx = torch.topk(scores, k, dim=1)
    kth = top[:, -1:]
    cut_ties = torch.nonzero((scores == kth).sum(1) > (top == kth).sum(1)).flatten().tolist()
    top, idx = top.numpy().copy(), idx.numpy().copy()
    for r in cut_ties:  # more items tie with the k-th score than fit: keep the lowest ids
        v = top[r, -1]
        keep = top[r] > v
        tied = torch.nonzero(scores[r] == v).flatten()[: k - int(keep.sum())].numpy()
        idx[r] = np.concatenate([idx[r][keep], tied])
        top[r] = np.concatenate([top[r][keep], np.full(len(tied), v, np.float32)])
    order = np.lexsort((idx, -top), axis=1)
    return np.take_along_axis(top, order, 1), np.take_along_axis(idx, order, 1)


def _scan(q: torch.Tensor, x: torch.Tensor, lo: int, hi: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of ``q`` against columns ``lo:hi`` of ``x``, on the calling (pool) thread alone."""
    torch.set_num_threads(1)  # this thread's ATen/BLAS parallelism: the parts already fill the cores
    with torch.inference_mode():
        top, idx = topk_lowest_id(q @ x[:, lo:hi], min(k, hi - lo))
    return top, idx + lo


class TorchRetriever(Retriever):
    """Brute-force inner product over all vectors. ``threads=0`` uses ``torch.get_num_threads()``."""

    exact = True
    SPLIT_MAX_QUERIES = 8  #: batches up to this size are split across threads by database columns
    SPLIT_MIN_ITEMS = 32_768  #: below this many vectors one thread is fast enough
    BLOCK_BYTES = 256 << 20  #: bound on one block of the score matrix in batched search

    def __init__(self, *, dim, threads):
        check_params("torch retriever", dim=(dim, 1), threads=(threads, 0))
        self._dim = int(dim) if dim else None
        self.threads = int(threads)
        self._buf: torch.Tensor | None = None  # [dim, capacity]; columns [:n] hold the vectors
        self._n = 0

    @property
    def dim(self) -> int:
        return self._dim or 0

    def __len__(self) -> int:
        return self._n

    def add(self, vectors) -> None:
        x = as_matrix(vectors, self._dim)
        if self._dim is None:
            self._dim = x.shape[1]
        need = self._n + len(x)
        if not len(x):
            return
        capacity = 0 if self._buf is None else self._buf.shape[1]
        if need > capacity:  # grow geometrically so repeated small adds stay linear overall
            grown = torch.empty(self._dim, max(need, capacity + capacity // 2))
            if self._n:
                grown[:, :self._n] = self._buf[:, :self._n]
            self._buf = grown
        self._buf[:, self._n:need] = torch.from_numpy(x).T
        self._n = need

    def _columns(self) -> torch.Tensor:
        return self._buf[:, :self._n]

    def search(self, queries, k: int):
        check_params("search", k=(k, 1))
        q = torch.from_numpy(as_matrix(queries, self._dim, "queries"))
        kk = min(k, self._n)
        if kk == 0 or len(q) == 0:
            return pad_results(np.zeros((len(q), 0)), np.zeros((len(q), 0), np.int64), k)
        x = self._columns()
        threads = self.threads or torch.get_num_threads()
        previous = torch.get_num_threads()
        try:
            with torch.inference_mode():
                if len(q) <= self.SPLIT_MAX_QUERIES and threads > 1 and self._n >= self.SPLIT_MIN_ITEMS:
                    torch.set_num_threads(1)
                    bounds = np.linspace(0, self._n, threads + 1).astype(int)
                    parts = list(thread_pool(threads).map(lambda lh: _scan(q, x, lh[0], lh[1], kk),
                                                          zip(bounds[:-1], bounds[1:])))
                    top, idx = np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1)
                    order = np.lexsort((idx, -top), axis=1)[:, :kk]  # each part's ties are its lowest ids
                    top, idx = np.take_along_axis(top, order, 1), np.take_along_axis(idx, order, 1)
                else:
                    torch.set_num_threads(threads)
                    rows = max(1, self.BLOCK_BYTES // (4 * self._n))
                    parts = [topk_lowest_id(q[i:i + rows] @ x, kk) for i in range(0, len(q), rows)]
                    top, idx = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        finally:
            torch.set_num_threads(previous)
        return pad_results(top, idx, k)

    def save(self, directory) -> None:
        directory = Path(directory)
        rows = self._columns().T.contiguous().numpy() if self._n else np.zeros((0, self.dim), np.float32)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.save(f, rows)
        atomic_write(directory / "vectors.npy", write)
        write_meta(directory, name="torch", dim=self.dim, size=len(self),
                   params={"dim": self._dim, "threads": self.threads})

    @classmethod
    def load(cls, directory, **params):
        meta, params = load_params(directory, "torch", params, build_keys=("dim",))
        obj = cls(**params)
        vectors = np.load(Path(directory) / "vectors.npy", allow_pickle=False)
        if vectors.shape != (meta["size"], meta["dim"]) and meta["size"]:
            raise ValueError(f"{directory}: vectors.npy has shape {vectors.shape}, "
                             f"retriever.json says {(meta['size'], meta['dim'])}")
        if len(vectors):
            obj.add(vectors)
        return obj

    def nbytes(self) -> int:
        return 0 if self._buf is None else self._buf.numel() * 4


@hookimpl
def register_components(register):
    register("retriever", "torch", TorchRetriever, tiny={})
