"""How the retriever benchmark measures: exact ground truth and recall (ties count as hits), the machine's
memory read bandwidth, single-query queries/s and size on disk."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

K = 10
TIE_EPS = 1e-6  # float32 dot products of unit 384-d vectors are accurate to ~1e-7


# -- ground truth and recall -------------------------------------------------------------------
class Truth:
    """Exact top-k thresholds; recall counts ties with the k-th exact score as hits."""

    def __init__(self, x: np.ndarray, q: np.ndarray, k: int = K):
        self.x, self.q, self.k = x, q, k
        xt = torch.from_numpy(x)
        ids = []
        for i in range(0, len(q), 256):
            ids.append(torch.topk(torch.from_numpy(q[i:i + 256]) @ xt.T, k, dim=1).indices.numpy())
        self.ids = np.concatenate(ids)
        exact = self.scores(self.ids)
        self.kth = exact[:, k - 1]
        self.first = exact[:, 0]

    def scores(self, ids: np.ndarray) -> np.ndarray:
        """float64 inner products of each query with its ``ids`` (-inf for -1)."""
        out = np.full(ids.shape, -np.inf)
        for i in range(0, len(ids), 512):
            block = ids[i:i + 512]
            valid = block >= 0
            vecs = self.x[np.where(valid, block, 0)].astype(np.float64)
            s = np.einsum("qd,qkd->qk", self.q[i:i + 512].astype(np.float64), vecs)
            out[i:i + 512] = np.where(valid, s, -np.inf)
        return out

    def recall(self, ids: np.ndarray) -> tuple[float, float]:
        s = self.scores(ids[:, :self.k])
        r1 = float(np.mean(s[:, 0] >= self.first - TIE_EPS))
        rk = float(np.mean(s >= self.kth[:, None] - TIE_EPS))
        return r1, rk


# -- measurements ------------------------------------------------------------------------------
class Bandwidth:
    """Memory read bandwidth: streaming kernels over a buffer far larger than the caches, split
    over ``threads`` Python threads (one BLAS/ATen thread each, as the exact search runs).

    Each kernel's rate is the median of all its timed passes (rounds are interleaved with the
    exact-search timings, which are medians too, so both see the same machine load); the
    machine's bandwidth is the fastest kernel's median.
    """

    KERNELS = {
        "sum": lambda b: b.sum(),
        "max": lambda b: b.amax(),
        "gemv": lambda b: torch.ones(1, b.shape[0]) @ b,  # a dot product per column: one FMA per float
    }

    def __init__(self, threads: int, nbytes: int):
        self.threads = threads
        cols = nbytes // (4 * 384 * threads)
        self.buf = torch.ones(threads, 384, cols)  # touched: pages are resident
        self.nbytes = self.buf.numel() * 4
        from reaudio_plugins._common import thread_pool
        self.pool = thread_pool(threads)
        self.samples: dict[str, list[float]] = {name: [] for name in self.KERNELS}
        self.single_core: dict[str, list[float]] = {name: [] for name in self.KERNELS}

    def measure(self, reps: int = 3) -> float:
        """One round: every kernel ``reps`` times on all threads and once on one core."""
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for name, kernel in self.KERNELS.items():
                def one_thread(block, kernel=kernel):
                    torch.set_num_threads(1)  # this pool thread: no nested ATen/BLAS team
                    return kernel(block)
                for _ in range(reps):
                    t0 = time.perf_counter()
                    list(self.pool.map(one_thread, list(self.buf)))
                    self.samples[name].append(self.nbytes / (time.perf_counter() - t0) / 1e9)
                t0 = time.perf_counter()
                kernel(self.buf[0])
                self.single_core[name].append(self.nbytes / self.threads / (time.perf_counter() - t0) / 1e9)
        finally:
            torch.set_num_threads(previous)
        return self.best()

    def per_kernel(self) -> dict[str, float]:
        return {name: statistics.median(v) for name, v in self.samples.items() if v}

    def best(self) -> float:
        """The machine's bandwidth: the fastest kernel's median rate."""
        return max(self.per_kernel().values())

    def peak(self) -> float:
        return max(max(v) for v in self.samples.values() if v)

    def best_single_core(self) -> float:
        return max(statistics.median(v) for v in self.single_core.values() if v)


def single_query_qps(r, q: np.ndarray, budget: float) -> tuple[float, int, float]:
    """Issue one query per call, cycling through ``q`` for about ``budget`` seconds.
    Returns (queries/s, queries timed, median seconds per query)."""
    r.search(q[:1], K)  # warm-up
    count, t0, latencies = 0, time.perf_counter(), []
    while True:
        t1 = time.perf_counter()
        r.search(q[count % len(q)][None], K)
        latencies.append(time.perf_counter() - t1)
        count += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= budget and count >= min(len(q), 3):
            return count / elapsed, count, statistics.median(latencies)


def disk_size(r) -> int:
    with tempfile.TemporaryDirectory(prefix="reaudio-bench-") as d:
        r.save(d)
        return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())
