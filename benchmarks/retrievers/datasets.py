"""The retriever benchmark's datasets: MiniLM embeddings of the AudioCaps captions (cached) and a clustered
synthetic set, with a local-intrinsic-dimension estimate of how hard each is."""
from __future__ import annotations

import csv
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from reaudio_core.io import atomic_write
from reaudio_core.registry import create

EMBED_VERSION = "minilm-mean-pool-v1"  # bump when the caption embedding recipe changes


@dataclass
class Dataset:
    name: str
    description: str
    x: np.ndarray  # [N, d] float32, unit rows: the index
    q: np.ndarray  # [Q, d] float32, unit rows: the queries
    note: str = ""


def read_captions(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return [row["caption"] for row in csv.DictReader(f)]


def file_digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def embed_captions(encoder, texts: list[str], desc: str) -> np.ndarray:
    """Embed each distinct caption once (shortest first, so batches pad little)."""
    unique = sorted(set(texts), key=lambda t: (len(t), t))
    out = np.empty((len(unique), encoder.dim), np.float32)
    step = 512
    with tqdm(total=len(unique), desc=desc, unit="caption", file=sys.stderr) as bar:
        for i in range(0, len(unique), step):
            out[i:i + step] = encoder.embed(unique[i:i + step]).numpy()
            bar.update(len(unique[i:i + step]))
    row = {t: i for i, t in enumerate(unique)}
    return out[[row[t] for t in texts]]


def audiocaps(root: Path, cache: Path, n_train: int | None, n_test: int | None) -> Dataset:
    train_csv, test_csv = root / "train.csv", root / "test.csv"
    for p in (train_csv, test_csv):
        if not p.exists():
            raise SystemExit(f"AudioCaps captions not found: {p} (pass --audiocaps DIR)")
    from reaudio_plugins.minilm import default_model_path
    model_dir = Path(default_model_path())
    model_files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    key = hashlib.sha256(f"{file_digest([train_csv, test_csv])}|{file_digest(model_files)}|{EMBED_VERSION}|"
                         f"{n_train}|{n_test}".encode()).hexdigest()[:16]
    path = cache / f"audiocaps-minilm-{key}.npz"
    started = time.perf_counter()
    if path.exists():
        print(f"# audiocaps: cached MiniLM embeddings {path}", file=sys.stderr)
        z = np.load(path)
        x, q = z["train"], z["test"]
        note = "embeddings read from the cache"
    else:
        train, test = read_captions(train_csv)[:n_train], read_captions(test_csv)[:n_test]
        encoder = create("text_encoder", "minilm")
        x = embed_captions(encoder, train, "embed AudioCaps train")
        q = embed_captions(encoder, test, "embed AudioCaps test")
        del encoder
        cache.mkdir(parents=True, exist_ok=True)

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, train=x, test=q)
        atomic_write(path, write)
        print(f"# audiocaps: embeddings cached in {path}", file=sys.stderr)
        note = f"embedded in {time.perf_counter() - started:.0f} s, now cached"
    distinct = len(np.unique(x, axis=0))
    return Dataset("audiocaps", f"AudioCaps train captions ({len(x):,}, {distinct:,} distinct) x {x.shape[1]}-d "
                   f"MiniLM; queries: {len(q):,} test captions", x, q, note)


def clustered(n: int, n_queries: int, dim: int = 384, per_cluster: int = 200, n_super: int = 20,
              tau: float = 0.5, common: float = 0.5, rank: int = 64, decay: float = 0.5, spread: float = 1.0,
              noise: float = 0.3, seed: int = 0) -> Dataset:
    """Gaussian clusters, L2-normalised.

    ``n // per_cluster`` cluster centres are drawn around ``n_super`` random super-centres (offset
    ``tau``) and pulled towards one common direction (``common``), so clusters overlap and every
    vector lies in a cone, as sentence embeddings do. A point is its centre plus Gaussian
    variation in a random rank-``rank`` subspace of the cluster (spectrum falling as
    ``i ** -decay``, total norm ``spread``) plus isotropic noise (norm ``noise``).
    The defaults make the set at least as hard as the MiniLM AudioCaps caption embeddings: at
    50k vectors its local intrinsic dimension (MLE, 20 neighbours) is about 19 against 13 for
    the captions, and an HNSW graph (M=16, efC=100) reaches a similar recall@10 at each
    ef_search. IVF finds it easier, since its clusters are more separable than real captions.
    """
    gen = torch.Generator().manual_seed(seed)
    total = n + n_queries
    n_clusters = max(1, n // per_cluster)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)

    supers, towards = unit(n_super, dim), unit(dim)
    centres = supers[torch.randint(0, n_super, (n_clusters,), generator=gen)] + tau * unit(n_clusters, dim)
    centres = torch.nn.functional.normalize(torch.nn.functional.normalize(centres, dim=1) + common * towards, dim=1)
    assign = torch.randint(0, n_clusters, (total,), generator=gen)
    spectrum = torch.arange(1, rank + 1, dtype=torch.float32) ** -decay
    spectrum *= spread / spectrum.norm()
    out = torch.randn(total, dim, generator=gen) * (noise / dim ** 0.5)
    order = torch.argsort(assign, stable=True)
    start = 0
    for c, count in enumerate(torch.bincount(assign, minlength=n_clusters).tolist()):
        rows = order[start:start + count]
        start += count
        basis = torch.randn(rank, dim, generator=gen) / dim ** 0.5  # near-orthonormal rows in high dimension
        out[rows] += centres[c] + (torch.randn(count, rank, generator=gen) * spectrum) @ basis
    out = torch.nn.functional.normalize(out, dim=1).numpy()
    return Dataset("synthetic", f"synthetic clustered {n:,} x {dim}-d ({n_clusters:,} overlapping Gaussian clusters "
                   f"around {n_super} super-centres, rank-{rank} variation + isotropic noise, normalised); "
                   f"queries: {n_queries:,} fresh draws from the same clusters",
                   np.ascontiguousarray(out[:n]), np.ascontiguousarray(out[n:]))


def local_intrinsic_dimension(x: np.ndarray, q: np.ndarray, k: int = 20, n_queries: int = 500) -> float:
    """Median maximum-likelihood (Levina-Bickel) intrinsic dimension around the queries, from the
    distances to their ``k`` nearest neighbours in ``x`` (exact duplicates skipped): how hard
    the set is for graph and partition indexes."""
    xt, estimates = torch.from_numpy(x), []
    for i in range(0, min(n_queries, len(q)), 100):
        top = torch.topk(torch.from_numpy(q[i:min(i + 100, n_queries)]) @ xt.T, min(k + 10, len(x)), dim=1).values
        for row in torch.sqrt(torch.clamp(2 - 2 * top.double(), min=0)):
            row = row[row > 1e-4][:k]
            if len(row) == k:
                mean_log = torch.log(row[:-1] / row[-1]).mean().item()
                if mean_log < 0:
                    estimates.append(-1.0 / mean_log)
    return float(np.median(estimates)) if estimates else float("nan")
