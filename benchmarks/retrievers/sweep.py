"""What the retriever benchmark measures: every registered retriever with its search knob swept, the HNSW
head to head against exact search, and faiss's own flat single-query search."""
from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from reaudio_core.registry import create, get_registry

from .datasets import Dataset
from .measure import K, Bandwidth, Truth, disk_size, single_query_qps


@dataclass
class Family:
    label: str  #: row label, e.g. "faiss ivf"
    name: str  #: registered retriever
    params: dict = field(default_factory=dict)
    knob: str | None = None
    values: list = field(default_factory=lambda: [None])
    setting: str = ""  #: build-time settings, printed


def families(n: int, quick: bool) -> list[Family]:
    """What is benchmarked: every registered retriever; the built-in ones with their knob swept.
    HNSW graphs keep the registry's build defaults (M, efConstruction)."""
    reg = get_registry()
    nlist = 1 << max(0, min(10, int(np.log2(max(1, n // 39)))))  # <= 1024, >= 39 training points per list
    efs = [8, 16, 32, 64] if quick else [16, 32, 64, 96, 128, 256, 512]
    probes = [1, 4, 16] if quick else [1, 2, 4, 8, 16, 32, 64, 128]
    known = [Family("torch", "torch", setting="exact"),
             Family("faiss flat", "faiss", {"index": "flat"}, setting="exact"),
             Family("faiss ivf", "faiss", {"index": "ivf", "nlist": nlist}, "nprobe",
                    [p for p in probes if p <= nlist], f"nlist={nlist}")]
    if "faiss" in reg.names("retriever"):
        d = reg.spec("retriever", "faiss").defaults
        known.append(Family("faiss hnsw", "faiss", {"index": "hnsw"}, "ef_search", efs,
                            f"M={d['hnsw_m']} efC={d['ef_construction']}"))
    if "hnswlib" in reg.names("retriever"):
        d = reg.spec("retriever", "hnswlib").defaults
        known.append(Family("hnswlib", "hnswlib", {}, "ef_search", efs, f"M={d['m']} efC={d['ef_construction']}"))
    registered = get_registry().names("retriever")
    out = [f for f in known if f.name in registered]
    out += [Family(name, name, setting="registry defaults") for name in registered if name not in {f.name for f in known}]
    return out


def run_family(fam: Family, ds: Dataset, truth: Truth, threads: int, budget: float, bw: Bandwidth | None,
               quick: bool):
    """Build one retriever, sweep its knob; returns ``(rows, retriever)``."""
    gc.collect()
    r = create("retriever", fam.name, **fam.params, threads=threads)
    t0 = time.perf_counter()
    r.add(ds.x)
    r.search(ds.q[:1], 1)  # lazy work (faiss ivf trains on first use) counts as build
    build = time.perf_counter() - t0
    memory, disk = r.nbytes(), disk_size(r)
    rows = []
    for value in fam.values:
        if fam.knob:
            setattr(r, fam.knob, value)
        t0 = time.perf_counter()
        _, ids = r.search(ds.q, K)
        batch_qps = len(ds.q) / (time.perf_counter() - t0)
        r1, r10 = truth.recall(ids)
        if r.exact and bw is not None:
            bw.measure()  # a bandwidth round right before each exact timing: same conditions
        qps, count, latency = single_query_qps(r, ds.q, budget)
        row = {"dataset": ds.name, "retriever": fam.name, "family": fam.label, "exact": bool(r.exact),
               "setting": " ".join(x for x in (fam.setting, f"{fam.knob}={value}" if fam.knob else "") if x),
               "knob": fam.knob, "value": value, "build_s": build, "memory_mb": memory / 2**20,
               "disk_mb": disk / 2**20, "recall1": r1, "recall10": r10, "qps_single": qps,
               "qps_batch": batch_qps, "single_queries_timed": count, "latency_ms": 1e3 * latency}
        if r.exact:
            row["gbps"] = ds.x.nbytes / latency / 1e9  # per the median query, as the bandwidth is a median
        rows.append(row)
        print(f"#   {fam.label:<11} {row['setting']:<26} recall@10 {r10:.4f}  {qps:9.1f} q/s single  "
              f"{batch_qps:9.1f} q/s batched", file=sys.stderr)
    if fam.label == "faiss flat" and bw is not None and not quick:
        rows[-1]["native"] = native_faiss_flat(r, ds, threads, budget)
    return rows, r


def head_to_head(exact: list, approx, value, knob: str, q: np.ndarray, budget: float, rounds: int = 3) -> dict:
    """Single-query QPS of ``approx`` (knob = value) against the fastest exact retriever, timed in
    interleaved rounds so both see the same machine load; the median ratio is reported."""
    setattr(approx, knob, value)
    ratios, fast, slow = [], [], []
    for _ in range(rounds):
        best_exact = max(single_query_qps(r, q, budget)[0] for r in exact)
        qps = single_query_qps(approx, q, budget)[0]
        ratios.append(qps / best_exact)
        fast.append(qps)
        slow.append(best_exact)
    return {"value": value, "ratio": statistics.median(ratios), "qps": statistics.median(fast),
            "exact_qps": statistics.median(slow), "rounds": rounds}


def native_faiss_flat(r, ds: Dataset, threads: int, budget: float) -> dict:
    """faiss's own IndexFlatIP single-query search (what the plugin's split scan replaces)."""
    index = r._index  # the plugin's faiss.IndexFlatIP
    out = {}
    for t in sorted({1, threads}):
        faiss.omp_set_num_threads(t)
        index.search(ds.q[:1], K)
        count, t0, latencies = 0, time.perf_counter(), []
        while time.perf_counter() - t0 < budget or count < 3:
            t1 = time.perf_counter()
            index.search(ds.q[count % len(ds.q)][None], K)
            latencies.append(time.perf_counter() - t1)
            count += 1
        qps, latency = count / (time.perf_counter() - t0), statistics.median(latencies)
        out[t] = {"qps": qps, "latency_ms": 1e3 * latency, "gbps": ds.x.nbytes / latency / 1e9}
    faiss.omp_set_num_threads(threads)
    return out
