"""Helpers shared by built-in plugins (not part of the public contract)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def as_matrix(x, dim: int | None = None, what: str = "vectors") -> np.ndarray:
    """``x`` as a C-contiguous float32 ``[N, dim]`` array, with a clear error on a wrong shape."""
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{what} must be [N, dim], got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} have dimension {x.shape[1]}, the index holds dimension {dim}")
    return x


def pad_results(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``[Q, k']`` results to ``[Q, k]`` with -inf / -1 (faiss pads with -1 ids already)."""
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    if ids.shape[1] < k:
        q = ids.shape[0]
        scores = np.concatenate([scores, np.full((q, k - ids.shape[1]), -np.inf, np.float32)], 1)
        ids = np.concatenate([ids, np.full((q, k - ids.shape[1]), -1, np.int64)], 1)
    return scores, ids


def write_meta(directory: Path, **meta) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "retriever.json").write_text(json.dumps(meta, indent=2))


def read_meta(directory: Path) -> dict:
    path = Path(directory) / "retriever.json"
    if not path.exists():
        raise FileNotFoundError(f"no retriever.json in {directory}: not a saved index")
    return json.loads(path.read_text())
