"""Retriever benchmark: recall against exact search, queries/s, build time, memory, disk, bandwidth.

Datasets
  audiocaps  MiniLM (all-MiniLM-L6-v2) embeddings of the AudioCaps train captions (the index)
             and of the AudioCaps test captions (the queries). Embeddings are cached under
             --cache, keyed by a hash of the two CSVs and the model files.
  synthetic  a clustered set (default 200,000 x 384): overlapping Gaussian clusters with
             low-rank variation plus isotropic noise, L2-normalised (see clustered()); queries
             are fresh draws from the same clusters.

For every registered retriever and a sweep of its search knob (faiss ivf: nprobe; faiss hnsw
and hnswlib: ef_search) it reports recall@1 and recall@10 against exact search, queries/s one
query at a time and batched, build time, index memory and size on disk. A returned item is
a hit when its exact score reaches the k-th exact score (within 1e-6): AudioCaps repeats
captions word for word, and identical vectors tie.

It also measures the machine's memory read bandwidth in the same run (streaming kernels over
a buffer much larger than the CPU caches, on the same number of threads) and reports exact
single-query search as GB/s (matrix bytes / time per query) against it.

    python -m benchmarks.retrievers [--quick] [--out DIR] [--synthetic-size N]
    reaudio bench retrievers [same flags]

Writes DIR/retrievers.md (the printed report), DIR/retrievers.png (recall vs queries/s) and
DIR/retrievers.json (every number).

The package: ``datasets`` (AudioCaps embeddings, the clustered set), ``measure`` (recall, bandwidth, queries/s),
``sweep`` (every retriever, its knob swept), ``report`` (targets, markdown, plot); this module parses the flags,
runs the datasets and writes the files.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from reaudio_core.io import atomic_write_text  # noqa: E402

from .datasets import audiocaps, clustered, local_intrinsic_dimension  # noqa: E402
from .measure import Bandwidth, Truth  # noqa: E402
from .report import HNSW_TARGET_RECALL, markdown, plot, targets  # noqa: E402
from .sweep import families, head_to_head, run_family  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="reaudio bench retrievers", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and short timings: a smoke test")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/results/, with --quick benchmarks/results/quick/)")
    p.add_argument("--synthetic-size", type=int, default=None, help="vectors in the clustered set (default 200000)")
    p.add_argument("--queries", type=int, default=None, help="synthetic queries (default 1000)")
    p.add_argument("--datasets", default="audiocaps,synthetic", help="comma-separated: audiocaps, synthetic")
    p.add_argument("--threads", type=int, default=0, help="threads for every retriever (default: torch's setting)")
    p.add_argument("--time-per-setting", type=float, default=None,
                   help="seconds of one-query-at-a-time timing per setting (default 1, quick 0.2)")
    p.add_argument("--audiocaps", type=Path,
                   default=Path(os.environ.get("REAUDIO_DATA") or REPO.parent / "shared" / "data") / "audiocaps",
                   help="folder with AudioCaps train.csv and test.csv (default: $REAUDIO_DATA/audiocaps)")
    p.add_argument("--cache", type=Path,
                   default=Path(os.environ.get("REAUDIO_CACHE", Path.home() / ".cache" / "reaudio")) / "bench",
                   help="embedding cache folder")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    quick = args.quick
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    out = args.out or (REPO / "benchmarks" / "results" / ("quick" if quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    budget = args.time_per_setting or (0.2 if quick else 1.0)
    wanted = [d.strip() for d in args.datasets.split(",") if d.strip()]
    for d in wanted:
        if d not in ("audiocaps", "synthetic"):
            raise SystemExit(f"unknown dataset {d!r}: choose from audiocaps, synthetic")
    started, load = time.perf_counter(), os.getloadavg()

    bw = Bandwidth(threads, (64 if quick else 1024) << 20)
    bw.measure()
    print(f"# memory read bandwidth ({threads} threads): {bw.best():.1f} GB/s", file=sys.stderr)

    rows: list[dict] = []
    datasets = []
    for name in wanted:
        t0 = time.perf_counter()
        if name == "audiocaps":
            ds = audiocaps(args.audiocaps, args.cache, 2000 if quick else None, 200 if quick else None)
        else:
            n = args.synthetic_size or (5_000 if quick else 200_000)
            ds = clustered(n, args.queries or (100 if quick else 1000))
        truth = Truth(ds.x, ds.q)
        datasets.append({"name": ds.name, "description": ds.description, "note": ds.note, "n": len(ds.x),
                         "dim": ds.x.shape[1],
                         "queries": len(ds.q), "matrix_mb": ds.x.nbytes / 2**20,
                         "lid": local_intrinsic_dimension(ds.x, ds.q), "prepare_s": time.perf_counter() - t0})
        print(f"# {ds.description}", file=sys.stderr)
        exact, hnsw = [], []
        for fam in families(len(ds.x), quick):
            fam_rows, r = run_family(fam, ds, truth, threads, budget, bw, quick)
            for row in fam_rows:
                row["n"] = len(ds.x)
            rows += fam_rows
            if ds.name == "synthetic" and r.exact:
                exact.append(r)
            elif ds.name == "synthetic" and fam.knob == "ef_search":
                hnsw.append((fam_rows, r))
            else:
                del r
        for fam_rows, r in hnsw:  # the HNSW target: the cheapest setting with enough recall, head to head
            good = [row for row in fam_rows if row["recall10"] >= HNSW_TARGET_RECALL]
            if good and exact:
                row = min(good, key=lambda row: row["value"])
                row["head_to_head"] = head_to_head(exact, r, row["value"], "ef_search", ds.q, budget)
        del ds, truth, exact, hnsw
        gc.collect()

    target_lines, status = targets(rows, bw, threads)
    total = time.perf_counter() - started
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    from importlib.metadata import PackageNotFoundError, version
    try:
        hnswlib_version = version("hnswlib")
    except PackageNotFoundError:
        hnswlib_version = "not installed"
    versions = f"torch {torch.__version__}, faiss {faiss.__version__}, hnswlib {hnswlib_version}, numpy {np.__version__}"
    text = markdown(rows, datasets, bw, target_lines, quick, threads, budget, total, load, cpu, versions)
    print(text)
    atomic_write_text(out / "retrievers.md", text)
    plot(rows, out / "retrievers.png")
    result = {"rows": rows, "datasets": datasets, "bandwidth_gbps": bw.best(), "bandwidth_kernels": bw.per_kernel(),
              "bandwidth_single_core_gbps": bw.best_single_core(), "threads": threads, "targets": status,
              "total_s": total, "quick": quick}
    atomic_write_text(out / "retrievers.json", json.dumps(result, indent=1, default=str))
    print(f"# wrote {out / 'retrievers.md'}, {out / 'retrievers.png'}, {out / 'retrievers.json'} "
          f"in {total / 60:.1f} min", file=sys.stderr)
    return result
