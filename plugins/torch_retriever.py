"""Exact retrieval with one matmul + top-k in torch: the reference every other retriever is measured against."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reaudio_core import Retriever, hookimpl

from ._common import as_matrix, pad_results, read_meta, write_meta


class TorchRetriever(Retriever):
    """Brute-force inner product. Deterministic: ties are ordered by lower id."""

    def __init__(self, *, dim, threads):
        self._dim = dim
        self.threads = threads
        self._chunks: list[torch.Tensor] = []
        self._matrix: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self._dim or 0

    def __len__(self) -> int:
        return sum(len(c) for c in self._chunks)

    def _data(self) -> torch.Tensor:
        if self._matrix is None or len(self._matrix) != len(self):
            self._matrix = (torch.cat(self._chunks) if self._chunks
                            else torch.zeros(0, self.dim)).contiguous()
            self._chunks = [self._matrix]
        return self._matrix

    def add(self, vectors) -> None:
        x = as_matrix(vectors, self._dim)
        self._dim = x.shape[1]
        self._chunks.append(torch.from_numpy(x.copy()))

    def search(self, queries, k: int):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = torch.from_numpy(as_matrix(queries, self.dim, "queries"))
        data = self._data()
        n = len(data)
        kk = min(k, n)
        if kk == 0:
            return pad_results(np.zeros((len(q), 0)), np.zeros((len(q), 0), np.int64), k)
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                scores = torch.mv(data, q[0])[None] if len(q) == 1 else q @ data.T
                top, idx = torch.topk(scores, kk, dim=1)
        finally:
            torch.set_num_threads(previous)
        # order ties by id so results do not depend on top-k internals
        order = np.lexsort((idx.numpy(), -top.numpy()), axis=1)
        top = np.take_along_axis(top.numpy(), order, 1)
        idx = np.take_along_axis(idx.numpy(), order, 1)
        return pad_results(top, idx, k)

    def save(self, directory) -> None:
        directory = Path(directory)
        write_meta(directory, name="torch", dim=self.dim, size=len(self))
        np.save(directory / "vectors.npy", self._data().numpy())

    @classmethod
    def load(cls, directory, **params):
        meta = read_meta(directory)
        params.setdefault("threads", 0)
        obj = cls(dim=meta["dim"], **params)
        vectors = np.load(Path(directory) / "vectors.npy", allow_pickle=False)
        if len(vectors):
            obj.add(vectors)
        return obj

    def nbytes(self) -> int:
        return self._data().numel() * 4


@hookimpl
def register_components(register):
    register("retriever", "torch", TorchRetriever)
